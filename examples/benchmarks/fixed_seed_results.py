"""Results on a fixed seed, as JSON: run it on two commits and compare, to show a refactoring changed nothing.

Trains each model on an ml-100k slice (the first 300 users; max length 10, hidden 32, 2 epochs, PAD 1 epoch
per phase) with seed 2020 and writes ``{model: {"valid": {...}, "test": {...}}}``.

    python examples/benchmarks/fixed_seed_results.py --out after.json --models FastSASRec,PAD,FAERec,MoRec,SASRec
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import recbole_llmfuse
from recbole_llmfuse.data import write_ml100k_slice


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="FastSASRec,PAD,FAERec,MoRec,SASRec")
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "llmfuse-fixed-seed"))
    args = parser.parse_args(argv)
    write_ml100k_slice(os.path.join(args.work, "data"), "ml-small", users=300)
    out = {}
    for model in args.models.split(","):
        cfg = {"data_path": os.path.join(args.work, "data"), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
               "MAX_ITEM_LIST_LENGTH": 10, "hidden_size": 32, "inner_size": 64, "n_heads": 2, "train_batch_size": 256,
               "eval_batch_size": 1024, "epochs": 1 if model == "PAD" else 2, "stopping_step": 100,
               "show_progress": False, "seed": 2020, "state": "WARNING",
               "checkpoint_dir": os.path.join(args.work, "saved"), "item_text_embedding": {"device": "cpu"}}
        result = recbole_llmfuse.run_recbole(model=model, dataset="ml-small", config_dict=cfg, argv=[])
        out[model] = {"valid": dict(result["best_valid_result"]), "test": dict(result["test_result"])}
        print(model, out[model]["test"], flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
