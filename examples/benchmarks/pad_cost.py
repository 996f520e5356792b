"""PAD's cost at LLM scale: a synthetic dataset with a 4096-d text table (LLM2Vec-Llama-3-8B size).

Writes ``<out>/data/synth/synth.{inter,item,itememb.npz}`` (long-tailed item popularity, random 4096-d
vectors), then runs ``recbole-llmfuse bench`` over FastSASRec (BCE, = PAD's phase 1) and PAD with one epoch
per phase, and prints: PAD phase-3 epoch time / SASRec epoch time (the same PAD process: its phase-1
epoch), PAD full-ranking test time / FastSASRec's, and each run's peak memory.

    python examples/benchmarks/pad_cost.py --items 10000 --dim 4096 --users 3000 --out bench_out/pad_cost
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys

import numpy as np


def write_dataset(folder: str, n_users: int, n_items: int, per_user: int, dim: int, seed: int = 0) -> None:
    from recbole_llmfuse.dataset_prep.itememb import write_item_embeddings

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8  # long tail
    popularity /= popularity.sum()
    with open(os.path.join(folder, "synth.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in range(n_users):
            items = rng.choice(n_items, size=per_user, replace=False, p=popularity)
            for t, i in enumerate(items):
                f.write(f"u{u}\ti{i}\t{t}\n")
    with open(os.path.join(folder, "synth.item"), "w") as f:
        f.write("item_id:token\ttitle:token_seq\n")
        for i in range(n_items):
            f.write(f"i{i}\titem {i}\n")
    vectors = rng.standard_normal((n_items, dim)).astype(np.float32)
    write_item_embeddings(folder, "synth", [f"i{i}" for i in range(n_items)], vectors, formats=["npz"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--per_user", type=int, default=20)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--out", default="bench_out/pad_cost")
    args = parser.parse_args()
    data = os.path.abspath(os.path.join(args.out, "data"))
    write_dataset(os.path.join(data, "synth"), args.users, args.items, args.per_user, args.dim)
    overrides = [
        f"--data_path={data}", "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}", "--epochs=1",
        "--loss_type=BCE", "--train_neg_sample_args={'distribution': 'uniform', 'sample_num': 1}",
        f"--hidden_size={args.hidden_size}", "--MAX_ITEM_LIST_LENGTH=20", "--prep_auto_run=false",
        "--mlp_hidden_sizes=[512]", "--train_batch_size=2048", "--eval_batch_size=1024", "--item_emb_missing=error",
    ]
    out = os.path.join(args.out, "bench")
    subprocess.run([sys.executable, "-m", "recbole_llmfuse.cli", "bench", "--dataset", "synth",
                    "--models", "FastSASRec,PAD", "--seeds", "0", "--out", out] + overrides, check=True)
    with open(os.path.join(out, "results.csv")) as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    pad, sasrec = rows["PAD"], rows["FastSASRec"]
    phase = {k: float(pad[f"epoch_s_{k}"]) for k in ("pretrain", "align", "finetune")}
    print(f"\n{args.items} items, {args.dim}-d text table, {args.users} users x {args.per_user}")
    print("PAD epoch time by phase / its phase-1 (SASRec) epoch: "
          + ", ".join(f"{k} {v / phase['pretrain']:.2f}" for k, v in phase.items()))
    print(f"PAD phase-3 epoch / FastSASRec (BCE) epoch, separate runs: {phase['finetune'] / float(sasrec['epoch_s']):.2f}")
    print(f"full-ranking test time PAD / FastSASRec: {float(pad['eval_s']) / float(sasrec['eval_s']):.2f}")
    print(f"peak memory (RSS): FastSASRec {float(sasrec['peak_mem_mb']):.0f} MB, PAD {float(pad['peak_mem_mb']):.0f} MB "
          f"(the table alone: {args.items * args.dim * 4 / 2**20:.0f} MB float32)")


if __name__ == "__main__":
    main()
