"""Which model ``hpcseg segment`` runs when the user names none, and why (a sentence the CLI prints).

The server lists its models in ``/info/`` in discovery order: the user's models dir first, the built-ins last. The
first segmentation model is therefore whatever the user added last week (a brain-MRI model, say), so it is no
default. The choice, in order:

1. the profile's ``default_model`` (``hpcseg config set default_model NAME``; a site may set it too);
2. for CT-like input (Hounsfield units: air near -1000, bone above 300), the built-in ``ct-body``;
3. the first segmentation model that declares the input's modality (``extra.expect.modality`` in its manifest,
   ``network_data_format.inputs.image.modality`` in a MONAI bundle);
4. the first segmentation model, with a reason that says no model declares the input's modality.

The server then checks the image against the chosen model's declared modality and warns on a mismatch (an MR
model given a CT and the other way round, :func:`hpcseg.imaging.check_input`), with ``-m`` too.

Example::

    choice = choose_model(client.info()["models"], image, profile.default_model)
    print(f"model: {choice.name} ({choice.reason})")
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import SimpleITK as sitk

from .errors import ConfigError
from .imaging import declared_modality, intensity_range, looks_like_ct

#: the built-in model for CT-like input when nothing else is configured
CT_DEFAULT = "ct-body"


@dataclass(frozen=True)
class ModelChoice:
    """A model name and the reason it was chosen (for the user: printed beside the result)."""

    name: str
    reason: str


def choose_model(models: Mapping[str, Mapping[str, Any]], image: sitk.Image, configured: str | None = None,
                 *, configured_by: str = "the profile's default_model", kind: str = "segmentation") -> ModelChoice:
    """The model to run on ``image`` when the user named none (see the module docstring for the order).

    ``models`` is ``/info/``'s ``models`` (name -> {type, modality, ...}). Raises ConfigError when ``configured``
    names a model the server does not serve, and when it serves no model of ``kind``.
    """
    if configured:
        if configured not in models:
            raise ConfigError(f"{configured_by} is {configured!r}, which this server does not serve (it serves: "
                              f"{', '.join(models) or 'none'})",
                              hint="hpcseg config set default_model NAME, or pick one with -m NAME")
        return ModelChoice(configured, configured_by)
    usable = [n for n, m in models.items() if m.get("type", "segmentation") == kind]
    if not usable:
        raise ConfigError(f"the server serves no {kind} model (it serves: {', '.join(models) or 'none'})",
                          hint="add one to the models dir (hpcseg config show says where) or pick one with -m")
    lo, hi = intensity_range(image)
    ct = looks_like_ct(image)
    looks = f"intensities {lo:g} to {hi:g}"
    if ct and CT_DEFAULT in usable:
        return ModelChoice(CT_DEFAULT, f"the built-in default for CT-like input ({looks} HU)")
    wanted = "CT" if ct else "MR"
    for name in usable:
        if declared_modality(models[name].get("modality")) == wanted:
            return ModelChoice(name, f"the first {kind} model declaring modality {wanted}, as the input looks "
                                     f"({looks})")
    return ModelChoice(usable[0], f"the server's first {kind} model: none declares modality {wanted}, which the "
                                  f"input looks like ({looks})")
