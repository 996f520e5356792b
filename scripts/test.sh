#!/usr/bin/env bash
# The test command (README "Tests"). Sets up .venv (the package installed as a wheel would be, non-editable), then:
#   bash scripts/test.sh                   # the default tier: every test not marked slow or integration, then the
#                                          # editable-install checks in their own editable virtualenv (.venv-dev)
#   bash scripts/test.sh -m integration    # benches, budget-matched tuning, a Ray cluster, DDP sync, ml-100k runs
#   bash scripts/test.sh -m slow           # the real SmolLM2 on ml-100k slices (minutes each)
# Measured times are in the README ("Tests"). Extra arguments go to pytest as they are.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
# The console script, not `python -m pytest`: that would put ./recbole_llmfuse (the source tree) on
# sys.path ahead of the installed package.
if [ "$#" -gt 0 ]; then exec "$VENV/bin/pytest" "$@"; fi
"$VENV/bin/pytest" -m "not slow and not integration and not editable" --durations=15
# An editable install serves the working tree (README "Develop"): checked through one, as contributors use it.
VENV=.venv-dev EDITABLE=1 EXTRAS=dev bash scripts/setup_env.sh
exec .venv-dev/bin/pytest -m editable -p no:cacheprovider tests/test_editable.py
