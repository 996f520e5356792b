"""Does the unified run path cost training time? RecBole's own ``Trainer`` epoch loop vs
``recbole_llmfuse.trainer.Trainer`` (step-level loop, callbacks, timing) on the same model and data.

One process, one built dataset; each pair trains one epoch with RecBole's trainer and one with ours, on
fresh models of the same seed, alternating which goes first (drift on a shared machine hits both alike).
Prints the per-pair epoch-time ratio ours / RecBole's and its median.

    python examples/benchmarks/run_overhead.py --pairs 4 --MAX_ITEM_LIST_LENGTH=20
"""
from __future__ import annotations

import argparse
import statistics
import time

from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import init_seed

import recbole_llmfuse  # noqa: F401
from recbole_llmfuse import registry
from recbole_llmfuse.config import Config
from recbole_llmfuse.quick_start import build
from recbole_llmfuse.trainer import Trainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="FastSASRec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--pairs", type=int, default=4)
    args, overrides = parser.parse_known_args(argv)
    config = Config(args.model, args.dataset, config_dict={"show_progress": False, "seed": 0}, argv=overrides)
    _, _, train_data, _, _ = build(config)
    times = {"recbole": [], "ours": []}
    for pair in range(args.pairs):
        order = [("recbole", RecBoleTrainer), ("ours", Trainer)]
        for name, trainer_class in order if pair % 2 == 0 else order[::-1]:
            init_seed(config["seed"], config["reproducibility"])
            model = registry.get_model(args.model)(config, train_data._dataset).to(config["device"])
            trainer = trainer_class(config, model)
            start = time.perf_counter()
            trainer._train_epoch(train_data, 0)
            times[name].append(time.perf_counter() - start)
        print(f"pair {pair}: RecBole {times['recbole'][-1]:.2f}s, ours {times['ours'][-1]:.2f}s, "
              f"ratio {times['ours'][-1] / times['recbole'][-1]:.3f}", flush=True)
    ratios = [a / b for a, b in zip(times["ours"], times["recbole"])]
    print(f"epoch-time ratio ours/RecBole per pair: {', '.join(f'{r:.3f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.3f})")


if __name__ == "__main__":
    main()
