"""The job's secret: every request but two must carry it.

A server inside a batch job listens on a port every user of the cluster can reach (schedulers.md, "Servers
inside jobs"), so each job makes a random token (``secrets.token_urlsafe(32)``) in its own process and writes it
only to its 0600 connection file. This module checks it on every request, before any route runs, so no route can
forget: ``/docs``, ``/openapi.json``, unknown paths and future routes alike answer 401 without it.

Two ways to present it:

- ``Authorization: Bearer <token>`` (the hpcseg client; MONAI Label's ``MONAILabelClient`` after
  ``update_auth(auth_token(user, token))``, as its Slicer plugin does after its login dialog, user name anything,
  password the token; the scheme word is case-insensitive, as RFC 7235 says, and that plugin sends ``bearer``).
- a path prefix ``/token/<token>/...`` for clients that cannot add a header or log in (older MONAI Label Slicer
  plugins, a browser): give ``http://127.0.0.1:PORT/token/<token>`` as the server address; every path it builds
  keeps the prefix. The prefix becomes the ASGI ``root_path``, so ``/docs`` works in a browser too, and the logged
  path never has it. ``GET /auth/`` under the prefix answers ``enabled: false``, so MONAI Label's Slicer plugin
  does not ask for a login it does not need.

Open without a token, because MONAI Label's clients call them before they have one, and they reveal nothing:
``GET /auth/`` (a constant: auth is enabled) and ``POST /auth/token`` (the OAuth2 password form: any username,
the token as password; a wrong one is a 401 like everywhere else).

Comparisons are constant-time (``hmac.compare_digest``). The token is never logged: the request log line is
written from the path after the prefix is stripped, never from headers or the query.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths open without a token (method, path), because MONAI Label's clients ask them first.
PUBLIC = frozenset({("GET", "/auth/"), ("GET", "/auth"), ("POST", "/auth/token")})
PATH_PREFIX = "/token/"
REALM = "hpcseg"


def tokens_equal(given: str | None, token: str) -> bool:
    """Constant-time comparison of a presented token with the job's."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode("utf-8"))


def bearer_from_headers(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The credentials of an ``Authorization: Bearer ...`` header, or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, cred = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and cred.strip():
                return cred.strip()
            return None
    return None


def split_path_token(path: str) -> tuple[str | None, str]:
    """``/token/<tok>/info/`` -> (``<tok>``, ``/info/``); a path without the prefix -> (None, path)."""
    if not path.startswith(PATH_PREFIX):
        return None, path
    rest = path[len(PATH_PREFIX):]
    tok, slash, tail = rest.partition("/")
    return tok, slash + tail if slash else "/"


async def send_401(send: Send, detail: str, error: str | None = None) -> None:
    """A 401 with a ``WWW-Authenticate: Bearer`` challenge (RFC 6750 section 3)."""
    challenge = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": 401,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", challenge.encode()),
        ],
    })
    await send({"type": "http.response.body", "body": body})


class TokenAuthMiddleware:
    """Pure ASGI middleware: refuse every HTTP request without the job's token, except :data:`PUBLIC`.

    On success it records ``scope["hpcseg.authenticated"] = True``; with a path token it moves the prefix into
    ``root_path`` (``scope["path"]`` keeps the full path, as ASGI expects, and Starlette routes on the rest).
    """

    def __init__(self, app: ASGIApp, token: str, *, allow_path_token: bool = True) -> None:
        if not token or len(token) < 16:
            raise ValueError("the server token must be a random string of at least 16 characters")
        self.app = app
        self.token = token
        self.allow_path_token = allow_path_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan passes; websockets are not served
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        path_token, route_path = split_path_token(scope["path"])
        if path_token is not None and self.allow_path_token:
            if not tokens_equal(path_token, self.token):
                scope["hpcseg.route_path"] = "/token/***" + route_path
                await send_401(send, "invalid token", "invalid_token")
                return
            scope["root_path"] = scope.get("root_path", "") + PATH_PREFIX + path_token
            scope["hpcseg.route_path"] = route_path
            scope["hpcseg.authenticated"] = True
            scope["hpcseg.path_token"] = True  # GET /auth/ then says "not enabled": the address is the credential
            await self.app(scope, receive, send)
            return
        scope["hpcseg.route_path"] = route_path
        if (scope["method"], route_path) in PUBLIC:
            await self.app(scope, receive, send)
            return
        given = bearer_from_headers(scope.get("headers", []))
        if given is None:
            await send_401(send, "this server needs its token: Authorization: Bearer <token>")
            return
        if not tokens_equal(given, self.token):
            await send_401(send, "invalid token", "invalid_token")
            return
        scope["hpcseg.authenticated"] = True
        await self.app(scope, receive, send)
