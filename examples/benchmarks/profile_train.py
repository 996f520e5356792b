"""CPU profile of training steps (cProfile, top functions by cumulative time) plus loader and eval costs.

    python examples/benchmarks/profile_train.py --model SASRec --steps 5 --anomaly   # as stock RecBole runs
    python examples/benchmarks/profile_train.py --model FastSASRec --steps 5

``--anomaly`` turns PyTorch's autograd anomaly mode back on, which stock RecBole 1.2.1 leaves enabled for
the whole process (its ``sine.py`` sets it at import); recbole_llmfuse turns it off.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import recbole_llmfuse
from recbole_llmfuse.quick_start import build


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="FastSASRec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--anomaly", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    config = recbole_llmfuse.Config(args.model, args.dataset, config_dict={"show_progress": False}, argv=overrides)
    _, model, train_data, _, test_data = build(config)
    trainer = recbole_llmfuse.get_trainer(config["MODEL_TYPE"], args.model)(config, model)
    torch.autograd.set_detect_anomaly(args.anomaly)

    start = time.perf_counter()
    batches = []
    for batch in train_data:
        batches.append(batch)
        if len(batches) > args.steps:
            break
    loader_s = (time.perf_counter() - start) / len(batches)

    model.train()

    def step(batch):
        trainer.optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        trainer.optimizer.step()

    step(batches[0])  # warm-up
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for batch in batches[1:]:
        step(batch)
    profiler.disable()
    step_s = (time.perf_counter() - start) / args.steps

    start = time.perf_counter()
    trainer.evaluate(test_data, load_best_model=False)
    eval_s = time.perf_counter() - start

    print(f"{args.model} anomaly={args.anomaly}: {step_s:.3f} s/step, loader {loader_s * 1000:.1f} ms/batch, "
          f"full-ranking test eval {eval_s:.2f} s, {len(train_data)} steps/epoch")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
