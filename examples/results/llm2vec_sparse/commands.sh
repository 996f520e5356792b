#!/usr/bin/env bash
# Reproduces this folder (CPU, ~75 min on 2 cores): the four item-vector variants on ml-100k-sparse, consumed by
# MoRec and PAD, 3 seeds, with the values the strong-baseline sweep chose (variants take their model's values).
set -euo pipefail
D=${DATA:-dataset}
recbole-llmfuse prep sparsify --dataset ml-100k --name ml-100k-sparse --data_path $D
recbole-llmfuse prep embed --dataset ml-100k-sparse --data_path $D backend=hf model=SmolLM2-135M-Instruct suffix=itememb_smol_causal
recbole-llmfuse prep embed --dataset ml-100k-sparse --data_path $D backend=llm2vec model=SmolLM2-135M-Instruct suffix=itememb_smol_l2v
recbole-llmfuse prep embed --dataset ml-100k-sparse --data_path $D
recbole-llmfuse prep hook item_encoder_lora --dataset ml-100k-sparse --data_path $D --model MoRec \
   --config_files examples/bench_sparse.yaml epochs=2
python examples/results/llm2vec_sparse/throughput.py 512 > throughput.json
L2V='item_text_embedding={backend: llm2vec, model: SmolLM2-135M-Instruct, suffix: itememb_smol_l2v}'
CAU='item_text_embedding={backend: hf, model: SmolLM2-135M-Instruct, suffix: itememb_smol_causal}'
LORA='item_emb_hook=item_encoder_lora,item_encoder_lora={epochs: 2}'
recbole-llmfuse bench --dataset ml-100k-sparse --seeds 0,1,2 --jobs 1 --data_path=$D \
  --models "MoRec;MoRec[$CAU];MoRec[$L2V];MoRec[$LORA];PAD;PAD[$CAU];PAD[$L2V];PAD[$LORA]" \
  --config_files examples/bench_sparse.yaml --tuned examples/results/strong_baselines/sparse/tune --out llm2vec_sparse
