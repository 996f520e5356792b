#!/usr/bin/env bash
# End-to-end demo on the embedded ml-100k (offline, a few minutes on 2 CPU cores): sets up .venv, then
# trains FastSASRec and RecBole's SASRec with the same small config through our `run_recbole` command.
# Full size: drop --config_files (RecBole defaults: max length 50, up to 300 epochs, early stopping).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
mkdir -p demo_out && cd demo_out
for model in FastSASRec SASRec; do
  "../$VENV/bin/run_recbole" --model="$model" --dataset=ml-100k --config_files=../examples/ml100k_quick.yaml
done
