#!/usr/bin/env bash
# Second GPU run: the subsidiary strategy only, after its optimiser was fixed (see prune_fashion_mnist.md).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD BNNSLIM_OFFLINE=1 PYTHONUNBUFFERED=1
timeout "${PRUNE_SECONDS:-150}" python3 benchmarks/prune_fashion_mnist.py --device cuda --width 1.0 --epochs 3 \
    --strategies subsidiary --data-root .gpudata --out "$OUT/prune_fashion_mnist_subsidiary_v2.md" \
    --work /tmp/bench-prune 2>&1 | grep -v Warning
