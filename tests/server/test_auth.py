"""The token on every route: 401 without it or with a wrong one, everywhere but MONAI Label's two auth routes."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from starlette.routing import Route

from hpcseg.server import ServerSettings, create_app
from hpcseg.server.auth import PUBLIC, bearer_from_headers, split_path_token, tokens_equal

from .conftest import TOKEN, standard_models

WRONG = "test-token-" + "w" * 32


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    models = standard_models(tmp_path_factory.mktemp("auth") / "models")
    return create_app(ServerSettings(models_dirs=[models], token=TOKEN, device="cpu"))


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app) as c:
        app.state.runtime.registry.wait(30)
        yield c


def _requests(app):
    """(method, path) for every route the app has, path parameters filled in."""
    for route in app.routes:
        if not isinstance(route, Route):
            continue
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for method in sorted(route.methods or ["GET"]):
            if method != "HEAD":
                yield method, path


def test_the_app_has_the_routes_we_promise(app):
    paths = {p for _, p in _requests(app)}
    for p in ("/info/", "/infer/x", "/session/", "/session/x", "/health/live", "/health/ready", "/reload",
              "/models/reload", "/auth/", "/auth/token", "/docs", "/openapi.json"):
        assert p in paths


@pytest.mark.parametrize("auth", [None, f"Bearer {WRONG}", "Basic dXNlcjpwYXNz", f"Bearer {TOKEN[:-1]}", "Bearer"])
def test_every_route_refuses_a_missing_or_wrong_token(app, http, auth):
    headers = {"Authorization": auth} if auth else {}
    checked = 0
    for method, path in _requests(app):
        if (method, path) in PUBLIC:
            continue
        r = http.request(method, path, headers=headers)
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "detail" in r.json()
        checked += 1
    assert checked >= 12
    # unknown paths too: a stranger learns nothing, not even what exists
    assert http.get("/no/such/path", headers=headers).status_code == 401


def test_open_routes_reveal_nothing_and_token_form_checks_the_password(http):
    assert http.get("/auth/").json()["enabled"] is True
    bad = http.post("/auth/token", data={"username": "anyone", "password": WRONG, "grant_type": "password"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"].startswith("Bearer")
    assert http.post("/auth/token", data={"username": "anyone"}).status_code == 401
    assert http.post("/auth/token").status_code == 401
    assert "x-hpcseg-server-version" not in bad.headers
    ok = http.post("/auth/token", data={"username": "anyone", "password": TOKEN, "grant_type": "password"})
    assert ok.status_code == 200
    tok = ok.json()
    assert tok["token_type"] == "bearer"
    # MONAILabelClient.update_auth() sends "<token_type> <access_token>"
    r = http.get("/auth/token/valid", headers={"Authorization": f"{tok['token_type']} {tok['access_token']}"})
    assert r.status_code == 200


def test_the_right_token_opens_every_route(app, http):
    h = {"Authorization": f"Bearer {TOKEN}"}
    assert http.get("/info/", headers=h).status_code == 200
    assert http.get("/docs", headers=h).status_code == 200
    assert http.get("/openapi.json", headers=h).status_code == 200
    assert http.get("/health/live", headers=h).status_code == 200
    assert http.get("/session/nope", headers=h).status_code == 404
    assert http.get("/info/", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200  # RFC 7235: any case


def test_path_token_for_clients_without_headers(http):
    """MONAI Label's Slicer plugin sends no auth header: its server address can carry the token instead."""
    r = http.get(f"/token/{TOKEN}/info/")
    assert r.status_code == 200 and "thr" in r.json()["models"]
    assert http.get(f"/token/{WRONG}/info/").status_code == 401
    assert http.get("/token//info/").status_code == 401
    docs = http.get(f"/token/{TOKEN}/docs")
    assert docs.status_code == 200 and f"/token/{TOKEN}/openapi.json" in docs.text  # works in a browser


def test_helpers():
    assert tokens_equal(TOKEN, TOKEN) and not tokens_equal(WRONG, TOKEN) and not tokens_equal(None, TOKEN)
    assert not tokens_equal("", TOKEN) and not tokens_equal("é", TOKEN)
    assert bearer_from_headers([(b"authorization", b"Bearer abc ")]) == "abc"
    assert bearer_from_headers([(b"Authorization", b"Basic abc")]) is None
    assert split_path_token("/token/abc/info/") == ("abc", "/info/")
    assert split_path_token("/token/abc") == ("abc", "/")
    assert split_path_token("/info/") == (None, "/info/")


def test_settings_never_show_the_token():
    s = ServerSettings(models_dirs=["m"], token=TOKEN)
    assert TOKEN not in repr(s) and TOKEN not in str(s)
    with pytest.raises(ValueError):
        ServerSettings(models_dirs=["m"], token="short")
