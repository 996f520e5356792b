#!/usr/bin/env bash
# The default test suite (15-35 minutes of tests on 2 CPU cores, README "Tests"): sets up .venv, then runs every test not
# marked slow against the installed (non-editable) package. Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m slow        # the minutes-long benchmarks-as-tests
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
# The console script, not `python -m pytest`: that would put ./recbole_llmfuse (the source tree) on
# sys.path ahead of the installed package.
if [ "$#" -eq 0 ]; then set -- -m "not slow" --durations=10; fi
exec "$VENV/bin/pytest" "$@"
