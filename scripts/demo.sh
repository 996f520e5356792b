#!/usr/bin/env bash
# End-to-end demo on the embedded ml-100k (offline, a few minutes on 2 CPU cores): sets up .venv, then,
# through our `run_recbole` command and with the same small config, trains
#   FastSASRec - RecBole's SASRec on the fast shared encoder (ID only), and
#   MoRec      - text-only SASRec over LLM item embeddings; its preparation hook first encodes the
#                1,682 movie texts with all-MiniLM-L6-v2 into dataset/ml-100k/ml-100k.itememb(.npz).
# Full size: drop --config_files (RecBole defaults: max length 50, up to 300 epochs, early stopping).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
mkdir -p demo_out && cd demo_out
for model in FastSASRec MoRec; do
  "../$VENV/bin/run_recbole" --model="$model" --dataset=ml-100k --config_files=../examples/ml100k_quick.yaml
done
