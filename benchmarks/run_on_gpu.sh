#!/usr/bin/env bash
# The GPU benchmarks, as run on a lent GPU machine (no network there): torch-pruning travels as a
# wheel in .whl/, the Fashion-MNIST IDX files in .gpudata/FashionMNIST/raw/. Results go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD BNNSLIM_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/train_throughput.py --device cuda --width 1.0 --batch-size 256 --steps 100 --repeats 3 \
    --out "$OUT/train_throughput_cuda.md" 2>&1 | tail -3
timeout "${PRUNE_SECONDS:-480}" python3 benchmarks/prune_fashion_mnist.py --device cuda --width 1.0 --epochs 3 \
    --data-root .gpudata --out "$OUT/prune_fashion_mnist.md" --work /tmp/bench-prune 2>&1 | grep -v Warning
