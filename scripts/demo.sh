#!/usr/bin/env bash
# The mission in a few minutes on 2 CPU cores, offline: RecBole's own SASRec (full-softmax CE, the strong ID
# baseline a RecBole user runs) against two of the LLM-fusion methods, PAD and FAERec, on a sparse long-tail
# variant of the embedded MovieLens-100K (`prep sparsify`: 8 interactions per user on average, the sparsity
# these methods were made for). PAD's and FAERec's preparation hook first embeds the movie texts with
# all-MiniLM-L6-v2 (offline). Settings: examples/bench_sparse.yaml plus each model's values from the budget-matched
# sweep in examples/results/strong_baselines/). Prints the comparison table; plots are named at the end.
# Dense ml-100k instead: DEMO_DATASET=ml-100k bash scripts/demo.sh (slower: ~13x the interactions).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
BIN="$PWD/$VENV/bin"
DATASET=${DEMO_DATASET:-ml-100k-sparse}
mkdir -p demo_out && cd demo_out
if [ "$DATASET" = ml-100k-sparse ] && [ ! -f dataset/ml-100k-sparse/ml-100k-sparse.inter ]; then
  "$BIN/recbole-llmfuse" prep sparsify --dataset ml-100k --name ml-100k-sparse
fi
"$BIN/recbole-llmfuse" bench --dataset "$DATASET" --seeds 0 --jobs 2 --config_files ../examples/bench_sparse.yaml --tuned ../examples/results/strong_baselines/sparse/tune \
  --models "SASRec[loss_type=CE];PAD;FAERec" --baseline "SASRec[loss_type=CE]" --out "bench_$DATASET"
echo
echo "Table: demo_out/bench_$DATASET/results.md; NDCG@10 per popularity bucket (warm -> cold):"
echo "demo_out/bench_$DATASET/buckets.png; validation curves: demo_out/bench_$DATASET/valid_curves.png"
