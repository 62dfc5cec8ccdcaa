#!/usr/bin/env bash
# Check that the lower bounds pyproject.toml declares for timm and accelerate really work.
#
# Builds a throwaway virtual environment with timm and accelerate at exactly those bounds (the torch /
# torchvision pair from constraints.txt), installs this project into it, imports every module, and runs a tiny
# pretraining: 2 steps on generated images, then a resume that extends it to 3 (Accelerate's save_state /
# load_state at that version). Needs the package registry; takes a few minutes, mostly the torch install.
#
#   scripts/check_lower_bounds.sh                      # timm 1.0.21, accelerate 1.1.0
#   TIMM=1.0.22 ACCELERATE=1.2.0 scripts/check_lower_bounds.sh
#   FCMAE_CHECK_LOWER_BOUNDS=1 python -m pytest -m slow tests/test_lower_bounds.py   # the same, as a test
#
# Exit status 0 and a last line "lower bounds OK: ..." when everything ran.
set -euo pipefail
cd "$(dirname "$0")/.."
TIMM=${TIMM:-1.0.21}
ACCELERATE=${ACCELERATE:-1.1.0}
SIMPLEJPEG=${SIMPLEJPEG:-1.7.6}
PYTHON=${PYTHON:-python3}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { echo "check_lower_bounds: $*" >&2; }

# The exact versions under test, and the torch pair the project is tested with.
{ grep -E '^(torch|torchvision)==' constraints.txt
  echo "timm==$TIMM"; echo "accelerate==$ACCELERATE"; echo "simplejpeg==$SIMPLEJPEG"; } \
    > "$work/constraints.txt"
say "venv with $(tr '\n' ' ' < "$work/constraints.txt")"
"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
# A copy of the project, so that the build leaves nothing in this checkout.
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$work" --one-top-level=src
"$py" -m pip install -q -c "$work/constraints.txt" "$work/src"
"$py" - <<EOF
import accelerate, timm, torch
assert timm.__version__ == "$TIMM" and accelerate.__version__ == "$ACCELERATE", (timm.__version__, accelerate.__version__)
print(f"torch {torch.__version__}, timm {timm.__version__}, accelerate {accelerate.__version__}")
EOF

cd "$work"  # run the installed package, not this checkout
"$py" - <<'EOF'
import importlib, pkgutil

import fcmae

for module in pkgutil.walk_packages(fcmae.__path__, "fcmae."):
    if not module.name.endswith(".__main__"):  # those run their command line when imported
        importlib.import_module(module.name)  # minkowski imports MinkowskiEngine only when asked for
EOF

# Tiny pretraining on generated images (pictures of gradients and stripes; nothing downloaded).
"$py" - <<'EOF'
from pathlib import Path

import numpy as np
from PIL import Image

folder = Path("images")
folder.mkdir()
y, x = np.mgrid[0:96, 0:96]
for i in range(8):
    rgb = np.stack([(x * (i + 1)) % 256, (y * 3 + i * 20) % 256, ((x + y) // (i + 1)) % 256], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(folder / f"img_{i}.{'jpg' if i % 2 else 'png'}")  # both decoders
EOF
run=(src/pretrain.py --data-path images --output-dir out --input-size 64 --batch-size 4 --num-workers 0
     --depths 1 1 1 1 --dims 8 16 24 32 --decoder-embed-dim 16 --warmup-steps 1 --log-every 1 --save-every 2
     --vis-every 0)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$py" "${run[@]}" --max-steps 2
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$py" "${run[@]}" --max-steps 3 --resume auto
"$py" - <<'EOF'
import json

import fcmae

records = [json.loads(line) for line in open("out/metrics.jsonl")]
assert [r["step"] for r in records] == [1, 2, 3], records
model = fcmae.load_model("out/fcmae_model.safetensors")
assert model.config.dims == (8, 16, 24, 32), model.config
EOF
say "lower bounds OK: timm $TIMM, accelerate $ACCELERATE import, pretrain 2 steps and resume to 3"
echo "lower bounds OK: timm $TIMM, accelerate $ACCELERATE"
