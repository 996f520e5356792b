"""Overhead of a Ray Tune sweep: a 2-trial sweep vs the same two configs run one after the other.

Both halves run in this process, back to back, ``--rounds`` times (alternating which goes first):
``recbole-llmfuse tune`` (a local Ray; by default one CPU per trial, both trials at once) and
``recbole_llmfuse.run_recbole`` on each grid point in turn. Prints the wall-time ratio sweep / sequential,
and the validation metric of each trial next to its sequential twin (same seed).

    python examples/benchmarks/tune_overhead.py --model FastSASRec --epochs 2 --rounds 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import recbole_llmfuse  # noqa: F401
from recbole_llmfuse import run_recbole
from recbole_llmfuse.tune import run_tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="FastSASRec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lrs", default="0.001,0.003")
    parser.add_argument("--cpus-per-trial", type=float, default=1)
    args = parser.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    fixed = {"epochs": args.epochs, "MAX_ITEM_LIST_LENGTH": 20, "seed": 7, "valid_metric": "NDCG@10",
             "stopping_step": 100, "show_progress": False, "state": "WARNING"}
    overrides = [f"--{k}={v}" for k, v in fixed.items() if k not in ("show_progress", "state")]
    work = tempfile.mkdtemp(prefix="tune-overhead-")
    os.chdir(work)
    ratios = []
    for r in range(args.rounds):
        order = ["sweep", "sequential"] if r % 2 == 0 else ["sequential", "sweep"]
        times, metrics = {}, {}
        for half in order:
            start = time.perf_counter()
            if half == "sweep":
                with open("space.yaml", "w") as f:
                    f.write(f"learning_rate: {{grid_search: {lrs}}}\n")
                result = run_tune(args.model, args.dataset, "space.yaml", f"sweep{r}", [], overrides, scheduler="fifo",
                                  cpus_per_trial=args.cpus_per_trial)
                metrics["sweep"] = {row["learning_rate"]: row["best_ndcg@10"] for row in result["rows"]}
            else:
                metrics["sequential"] = {
                    lr: run_recbole(model=args.model, dataset=args.dataset, config_dict={**fixed, "learning_rate": lr},
                                    saved=False, argv=[])["best_valid_result"]["ndcg@10"]
                    for lr in lrs
                }
            times[half] = time.perf_counter() - start
        ratios.append(times["sweep"] / times["sequential"])
        print(f"round {r}: sweep {times['sweep']:.1f} s, sequential {times['sequential']:.1f} s, "
              f"ratio {ratios[-1]:.2f}; valid ndcg@10 sweep {metrics['sweep']} vs sequential {metrics['sequential']}")
    print(f"sweep / sequential wall time: median {statistics.median(ratios):.2f} over {len(ratios)} rounds")


if __name__ == "__main__":
    main()
