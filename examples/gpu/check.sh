#!/usr/bin/env bash
# The GPU check (examples/gpu/check.py) on a machine that has torch, transformers and peft but not this package,
# RecBole or its small dependencies, and no package registry: they travel as wheels in .whl/ (about 3 MB).
#   bash examples/gpu/check.sh --prepare   # here, with a registry: our wheel + recbole + what it imports, cp312
#   bash examples/gpu/check.sh             # there: install the wheels into /tmp/site, run, results in $OUT
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ "${1:-}" = --prepare ]; then
  rm -rf .whl && mkdir -p .whl
  python3 -m pip wheel -q --no-deps -w .whl .
  # RecBole and the pure-Python packages its modules import that the GPU image lacks (it has torch, transformers,
  # peft, pandas, scipy, scikit-learn, tensorboard, colorama: carrying another version of those could clash)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    recbole==1.2.1 colorlog texttable thop
  du -sh .whl
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 examples/gpu/check.py --out "${OUT:-gpu_out}" "$@"
