"""Checkpoint size of a model with a large frozen module: RecBole's full ``state_dict`` vs our lean checkpoint.

A FastSASRec on ml-100k with a frozen ``--frozen_params`` parameter module beside it (standing in for an LLM
decoder, as in HDRec) is saved once by RecBole's ``Trainer._save_checkpoint`` (everything) and once by
``recbole_llmfuse.trainer.Trainer`` (frozen tensors left out, :mod:`recbole_llmfuse.checkpoint`); prints both
sizes in MB and checks that the lean one reloads to the same scores.

    python examples/benchmarks/checkpoint_size.py --frozen_params 100000000
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from recbole.trainer import Trainer as RecBoleTrainer
from torch import nn

import recbole_llmfuse  # noqa: F401
from recbole_llmfuse import checkpoint, registry
from recbole_llmfuse.config import Config
from recbole_llmfuse.model.fast_sasrec import FastSASRec
from recbole_llmfuse.quick_start import build
from recbole_llmfuse.trainer import Trainer


class WithFrozenModule(FastSASRec):
    config_file = registry.model_config_file(FastSASRec)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        width = 10_000
        self.frozen = nn.Embedding(config["frozen_params"] // width, width)
        checkpoint.freeze(self, self.frozen)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frozen_params", type=int, default=100_000_000)
    args, overrides = parser.parse_known_args(argv)
    real = registry.get_model
    registry.get_model = lambda name: WithFrozenModule if name == "WithFrozenModule" else real(name)
    out = tempfile.mkdtemp()
    config = Config("WithFrozenModule", "ml-100k", argv=overrides, config_dict={
        "frozen_params": args.frozen_params, "checkpoint_dir": out, "show_progress": False,
        "model_log_max_params": 0, "MAX_ITEM_LIST_LENGTH": 20,
        "allow_unknown_keys": True})  # frozen_params: a setting of this file's own model, declared in no YAML
    _, model, _, _, test_data = build(config)
    total, trainable, frozen = checkpoint.parameter_summary(model)
    sizes = {}
    for name, trainer_class in (("RecBole (full state_dict)", RecBoleTrainer), ("recbole_llmfuse (lean)", Trainer)):
        trainer = trainer_class(config, model)
        trainer.saved_model_file = os.path.join(out, f"{trainer_class.__module__}.pth")
        trainer._save_checkpoint(0, verbose=False)
        sizes[name] = os.path.getsize(trainer.saved_model_file) / 2**20
    model.eval()
    inter = next(iter(test_data))[0]
    with torch.no_grad():
        before = model.full_sort_predict(inter)
        fresh = WithFrozenModule(config, test_data._dataset)
        fresh.frozen.load_state_dict(model.frozen.state_dict())  # rebuilt from its source in a real model
        checkpoint.load_weights(fresh, trainer.saved_model_file)
        fresh.eval()
        assert torch.equal(before, fresh.full_sort_predict(inter))
    print(f"model: {total:,} parameters, {trainable:,} trainable, {frozen:,} in the frozen module")
    for name, mb in sizes.items():
        print(f"{name}: {mb:.1f} MB")
    full, lean = sizes.values()
    print(f"lean / full: {lean / full:.4f}; reloaded lean checkpoint scores equal: True")


if __name__ == "__main__":
    main()
