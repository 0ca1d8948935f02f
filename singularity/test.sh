#!/bin/sh
# The image's self-test (the .def's %test; for the OCI image: `docker run --rm --network none IMAGE sh
# /opt/hpcseg/test.sh`, which singularity/build.sh runs after every build). It checks, with no network:
#   - the server's and training's command lines start (python3 -m hpcseg.server / hpcseg.training --help);
#   - every built-in model is baked into the image and loads from it (weights included), on the CPU;
#   - ct-body and phantom-unet segment synthetic CT phantoms: a mask on the input's grid with every structure;
#   - the user's ~/.local site-packages are kept out (PYTHONNOUSERSITE=1 from the image's environment).
# A site's own models come from the models dir bound at run time; nothing is downloaded at run time.
set -eu
python3 -m hpcseg.server --help >/dev/null
python3 -m hpcseg.training --help >/dev/null
python3 - <<'PY'
import sys

import numpy as np
import SimpleITK as sitk

from hpcseg.phantoms import make_phantom
from hpcseg.server.models import builtin_models_dir, load_model

assert sys.flags.no_user_site, "PYTHONNOUSERSITE=1 is not set in the image's environment"
folders = sorted(p for p in builtin_models_dir().iterdir() if (p / "hpcseg-model.json").is_file())
names = [p.name for p in folders]
for want in ("ct-body", "phantom-unet", "deepgrow-regiongrow", "dextr3d-geodesic"):
    assert want in names, f"built-in model {want} is missing from the image ({names})"
models = {p.name: load_model(p, device="cpu") for p in folders}
# ct-body on a torso that fills a small view; phantom-unet at the adult size it is trained for (a 320 mm torso
# in a 160 mm view, 64x64x48 voxels at 2.5 mm)
images = {"ct-body": make_phantom(3, shape=(64, 64, 48), spacing=(1.5, 1.5, 2.0))[0],
          "phantom-unet": make_phantom(5011, shape=(64, 64, 48), spacing=(2.5, 2.5, 2.5), body_mm=320.0)[0]}
for name, image in images.items():
    mask = models[name].infer(image, {})
    assert mask.GetSize() == image.GetSize() and mask.GetSpacing() == image.GetSpacing(), name
    found = set(np.unique(sitk.GetArrayViewFromImage(mask)).tolist()) - {0}
    want = set(models[name].manifest.labels.values())
    assert found == want, f"{name}: labels {sorted(found)} in the mask, {sorted(want)} expected"
print("hpcseg image test: passed (" + ", ".join(names) + ")")
PY
