"""HDRec's training cost against the decoder work it cannot avoid, measured in one process.

For the same batch (the same text and ID rows), alternately: (A) one full HDRec training step on the trunk's
trainer — a no-grad text forward (the KL teacher), the ID forward/backward/step and the text
forward/backward/step, IPL, CE and KL included — and (B) a plain forward+backward of the same decoder with
one LoRA adapter on the same text tokens plus the same on the ID tokens (the work any two-process model
needs). Prints the per-pair ratio A/B and its median, the same without the no-grad text forward that gives
the KL teacher (timed on its own in each pair), the trainable-parameter count, the checkpoint size
and the peak memory.

    python examples/benchmarks/hdrec_cost.py --dataset ml-100k --pairs 5 --llm_path=SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

import torch

import recbole_llmfuse  # noqa: F401
from recbole_llmfuse import checkpoint
from recbole_llmfuse.config import Config
from recbole_llmfuse.quick_start import build, make_trainer


class OneBatch:
    shuffle = False

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return iter([self.batch])

    def __len__(self):
        return 1


def plain_step(model, rows_text, rows_id):
    """Forward+backward of the decoder with one adapter on both processes' tokens (no IPL, no KL)."""
    for rows, adapter in ((rows_text, "text"), (rows_id, model.adapter_of["id"])):
        model.states(rows, adapter).float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--pairs", type=int, default=5)
    args, overrides = parser.parse_known_args(argv)
    config = Config("HDRec", args.dataset, argv=overrides, config_dict={
        "show_progress": False, "checkpoint_dir": tempfile.mkdtemp(), "lora_dropout": 0.0, "ipl_dropout": 0.0})
    _, model, train_data, _, _ = build(config)
    trainer = make_trainer(config, model)
    model.train()
    batch = next(iter(train_data)).to(model.special_offset.device)
    histories, align, _ = model.batch_rows(batch)
    rows_text, rows_id = model.rows(histories, align, "text"), model.rows(histories, align, "id")
    tokens = sum(len(p) if k == 0 else 1 for r in rows_text for k, p in r)
    a_times, b_times, c_times = [], [], []
    plain_step(model, rows_text, rows_id)  # warm-up
    trainer._epoch_body(OneBatch(batch), 0)
    for pair in range(args.pairs):
        order = ("A", "B") if pair % 2 == 0 else ("B", "A")
        for which in order:
            start = time.perf_counter()
            if which == "A":
                model._align_next = 0  # the same alignment rows every time
                trainer._epoch_body(OneBatch(batch), 0)
                a_times.append(time.perf_counter() - start)
            else:
                plain_step(model, rows_text, rows_id)
                b_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():  # the KL teacher: the text forward the algorithm runs before the ID step (§4.2)
            model.logits(rows_text, "text")
        c_times.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(a_times, b_times)]
    per_process = [(a - c) / b for a, b, c in zip(a_times, b_times, c_times)]
    total, trainable, frozen = checkpoint.parameter_summary(model)
    trainable += sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad)
    path = os.path.join(config["checkpoint_dir"], "hdrec.pth")
    size = checkpoint.write(path, model, config)
    print(f"batch: {len(histories)} sequences + {len(align)} alignment rows, {tokens} text-process tokens")
    print(f"HDRec step / plain fwd+bwd of both processes, per pair: {', '.join(f'{r:.3f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.3f})")
    print(f"the same without the no-grad teacher forward (the two update steps alone): "
          f"{', '.join(f'{r:.3f}' for r in per_process)} (median {statistics.median(per_process):.3f})")
    print(f"parameters: {total:,} total, {trainable:,} trained (both adapters, IPL, Proj, offsets), "
          f"{frozen:,} frozen; checkpoint {size / 2**20:.1f} MB; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
