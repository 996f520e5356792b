"""Trainers shared by the package's multi-phase models.

:class:`StagedTrainer` runs a model's training phases in order inside one ``fit`` call (one
``run_recbole``): each phase gets a fresh optimizer over the parameters the phase trains, its own early
stopping on validation, its own checkpoint file, and hands its *best* checkpoint to the next phase. The
test evaluation afterwards uses the last phase's best checkpoint, as for any RecBole model.

A staged model (PAD today; HDRec's alternating LoRA updates fit the same shape) provides:

* ``train_stages`` — the phases to run, in order (from the config);
* ``enter_stage(name)`` — switch scoring/loss to that phase, copy weights handed over from the previous
  phase, set ``requires_grad`` of what the phase trains;
* config ``stage_learning_rate`` (optional): ``{phase: lr}`` for phases that train at another rate;
* ``load_pretrained(path)`` (optional) — load a previous run's checkpoint before the first phase
  (config key ``pretrained_checkpoint``), so one phase can be run or resumed on its own.
"""
from __future__ import annotations

import os
import time
from logging import getLogger
from typing import Dict

import numpy as np
from recbole.trainer import Trainer
from recbole.utils import get_local_time, set_color

from recbole_llmfuse.compat import trusted_torch_load


class StagedTrainer(Trainer):
    """RecBole ``Trainer`` that runs ``model.train_stages`` one after another (see module docstring).

    After ``fit``: ``stage_results[name]`` = ``{"best_valid_score", "best_valid_result", "epochs",
    "epoch_s" (mean training-epoch seconds), "checkpoint"}``.
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self.stage_results: Dict[str, dict] = {}
        self._stage_epoch_times = []

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        start = time.perf_counter()
        try:
            return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        finally:
            self._stage_epoch_times.append(time.perf_counter() - start)

    def _start_stage(self, stage: str) -> None:
        self.model.enter_stage(stage)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        learning_rate = (self.config["stage_learning_rate"] or {}).get(stage, self.learning_rate)
        self.optimizer = self._build_optimizer(params=trainable, learning_rate=learning_rate)
        self.start_epoch, self.cur_step = 0, 0
        self.best_valid_score = -np.inf if self.valid_metric_bigger else np.inf
        self.best_valid_result = None
        self.train_loss_dict = {}
        self._stage_epoch_times = []
        name = f"{self.config['model']}-{stage}-{get_local_time()}.pth"
        self.saved_model_file = os.path.join(self.checkpoint_dir, name)
        self.logger.info(
            set_color(f"{self.config['model']} phase '{stage}'", "pink")
            + f": training {sum(p.numel() for p in trainable)} parameters, learning rate {learning_rate}"
        )

    def load_checkpoint_weights(self, path: str) -> None:
        """Load the model weights (and stage) of a checkpoint written by this trainer."""
        checkpoint = trusted_torch_load(path, map_location=self.device)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        stages = list(self.model.train_stages)
        pretrained = self.config["pretrained_checkpoint"]
        if pretrained:
            self.model.load_pretrained(pretrained)
        result = (self.best_valid_score, self.best_valid_result)
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            self._start_stage(stage)
            # every phase but the last keeps its best checkpoint, whatever `saved` says: it is the hand-off
            keep = saved or not last
            result = super().fit(train_data, valid_data, verbose=verbose, saved=keep, show_progress=show_progress,
                                 callback_fn=callback_fn)
            if keep and valid_data and os.path.isfile(self.saved_model_file):
                self.load_checkpoint_weights(self.saved_model_file)  # hand the best epoch on, not the last
            self.stage_results[stage] = {
                "best_valid_score": float(result[0]),
                "best_valid_result": dict(result[1] or {}),
                "epochs": len(self._stage_epoch_times),
                "epoch_s": float(np.mean(self._stage_epoch_times)) if self._stage_epoch_times else float("nan"),
                "checkpoint": self.saved_model_file if keep else None,
            }
            getLogger().info(
                set_color(f"phase '{stage}' best valid", "yellow") + f": {dict(result[1] or {})}"
            )
        return result


class EpochAwareTrainer(Trainer):
    """RecBole ``Trainer`` that tells the model which epoch starts (``model.on_epoch_start(epoch_idx)``).

    RecBole never passes the epoch into ``calculate_loss``; curriculum schedules (FAERec) need it.
    """

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.model.on_epoch_start(epoch_idx)
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
