"""Does our layer add cost? RecBole's ``quick_start.run_recbole`` vs ``recbole_llmfuse.run_recbole``.

Same model, data, config and seed, alternately in one process (A B A B ...); reports the training-epoch
time ratio ours / RecBole's per pair and the whole-call ratio.

    python examples/benchmarks/cli_overhead.py --pairs 2 --MAX_ITEM_LIST_LENGTH=20
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import recbole_llmfuse
from recbole.quick_start import run_recbole as recbole_run_recbole
from recbole_llmfuse.timing import EpochTimer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SASRec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--pairs", type=int, default=2)
    args, overrides = parser.parse_known_args(argv)
    # RecBole's function reads sys.argv; ours takes argv: both see the same overrides.
    sys.argv = [sys.argv[0], *overrides]
    config_dict = {"epochs": 1, "show_progress": False, "train_neg_sample_args": None, "seed": 0}
    runs = {"recbole": recbole_run_recbole, "recbole_llmfuse": recbole_llmfuse.run_recbole}
    epoch, wall = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(args.pairs):
        for name, fn in runs.items():
            kwargs = {"argv": overrides} if name == "recbole_llmfuse" else {}
            start = time.perf_counter()
            with EpochTimer() as timer:
                fn(model=args.model, dataset=args.dataset, config_dict=dict(config_dict), **kwargs)
            wall[name].append(time.perf_counter() - start)
            epoch[name].append(timer.train[0])
            print(f"{name}: epoch {timer.train[0]:.1f}s, call {wall[name][-1]:.1f}s", flush=True)
    e = [a / b for a, b in zip(epoch["recbole_llmfuse"], epoch["recbole"])]
    w = [a / b for a, b in zip(wall["recbole_llmfuse"], wall["recbole"])]
    print(f"epoch-time ratio ours/RecBole per pair: {', '.join(f'{x:.3f}' for x in e)} (median {statistics.median(e):.3f})")
    print(f"whole-call ratio ours/RecBole per pair: {', '.join(f'{x:.3f}' for x in w)} (median {statistics.median(w):.3f})")


if __name__ == "__main__":
    main()
