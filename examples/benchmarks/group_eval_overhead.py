"""Full-ranking evaluation time with group metrics on vs off, alternately in one process.

    python examples/benchmarks/group_eval_overhead.py --model FastSASRec --rounds 10
"""
from __future__ import annotations

import argparse
import statistics
import time

import recbole_llmfuse
from recbole_llmfuse.evaluation import enable_group_metrics
from recbole_llmfuse.quick_start import build


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="FastSASRec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--rounds", type=int, default=10)
    args, overrides = parser.parse_known_args(argv)
    config = recbole_llmfuse.Config(args.model, args.dataset, config_dict={"show_progress": False, "group_metrics": True}, argv=overrides)
    _, model, train_data, _, test_data = build(config)
    plain = recbole_llmfuse.get_trainer(config["MODEL_TYPE"], args.model)(config, model)
    grouped = recbole_llmfuse.get_trainer(config["MODEL_TYPE"], args.model)(config, model)
    enable_group_metrics(grouped)
    for trainer in (plain, grouped):
        trainer.eval_collector.data_collect(train_data)
        trainer.evaluate(test_data, load_best_model=False)  # warm-up
    times = {"off": [], "on": []}
    for _ in range(args.rounds):
        for name, trainer in (("off", plain), ("on", grouped)):
            start = time.perf_counter()
            result = trainer.evaluate(test_data, load_best_model=False)
            times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["on"], times["off"])]
    print(f"{args.model} on {args.dataset}: {len(result)} result keys with groups; "
          f"eval time on/off median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}) "
          f"over {args.rounds} pairs")


if __name__ == "__main__":
    main()
