#!/usr/bin/env bash
# Build bnnslim's wheel, install it in a clean virtualenv with the newest torch pip offers,
# and run the README's quick start from outside the repository (no examples/ folder there).
# Usage: bash scripts/check_wheel.sh [WORKDIR]   (default: a fresh temporary directory, removed afterwards:
# its virtualenv holds a full torch, about 5.5 GB, and repeated runs filled a disk)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -ge 1 ]; then
    work=$1
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$work/dist" "$repo"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$work"/dist/bnnslim-*.whl
"$work/venv/bin/python" -c "import torch, torchvision, bnnslim; print('installed: bnnslim', bnnslim.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
cd "$work"
export PATH="$work/venv/bin:$PATH"
bnnslim binarize bnnslim:small-cnn-tiny --data fashion-mnist-mini --epochs 1 --steps-per-epoch 20 --overwrite
bnnslim prune --keep 0.8 --select-steps 5 --retrain-steps 5
bnnslim export
python -c "import bnnslim; m = bnnslim.load('bnnslim-run/model.safetensors'); print('reloaded', type(m).__name__)"
echo "wheel check passed"
