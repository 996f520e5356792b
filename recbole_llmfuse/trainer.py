"""Trainers: RecBole's ``Trainer`` with step-level training, callbacks, timing and lean checkpoints.

Every model run through :mod:`recbole_llmfuse` gets one of these (``registry.get_trainer``):

* :class:`Trainer` — for every model whose RecBole trainer would be RecBole's plain ``Trainer`` (ours and
  RecBole's SASRec, GRU4Rec, ...). Its epoch loop is RecBole's (same order of operations, same results
  on a fixed seed) plus what models with a live LLM need:

  - **step-level training**: a model may define ``train_steps(interaction)``, a generator that yields
    ``(group, {name: loss})`` one or more times per batch. After each yield the trainer back-propagates
    that step's summed losses into the parameters of optimizer ``group`` only and steps it, then resumes
    the generator: alternating updates within one batch (HDRec's ID step, then its text step) are two
    yields. ``optimizer_groups() -> {group: params | {"params", "lr", "weight_decay"}}`` declares the
    optimizers (default: one, ``main``, over every parameter, as RecBole). Named loss terms are averaged
    per epoch and logged (``trainer.epoch_loss_terms``);
  - ``lr_scheduler`` (``none`` | ``constant`` | ``linear`` | ``cosine``), stepped once per batch (per
    accumulation window) for each optimizer that stepped, after ``warmup_steps``; ``grad_accum_steps``; RecBole's ``clip_grad_norm`` per group; ``precision: bf16``
    (autocast on CUDA; ``auto`` = bf16 on CUDA, fp32 on CPU) besides RecBole's ``enable_amp``;
  - ``model.on_epoch_start(epoch)`` when a model has it (curricula, FAERec).

* any other RecBole trainer (KG, pre-training, decision trees) runs as it is, with the same
  :class:`TrainerMixin` added: callbacks, timing, lean checkpoints and group metrics.

:class:`TrainerMixin` gives every trainer: ``callbacks`` (objects with any of ``on_epoch_end(trainer,
epoch, loss, seconds)``, ``on_valid(trainer, epoch, score, result)``, ``on_fit_end(trainer)``; the run
path calls the last), ``epoch_times``/``eval_times`` (seconds), and checkpoints written and read through
:mod:`recbole_llmfuse.checkpoint` (frozen tensors left out; one loader for resume, best-model reload,
phase hand-off and ``load_data_and_model``).

:class:`StagedTrainer` runs a model's training phases in order inside one ``fit`` (PAD): each phase gets
fresh optimizers over what the phase trains, its own early stopping and checkpoint, and hands its best
checkpoint to the next phase. A staged model provides ``train_stages``, ``enter_stage(name)``,
optionally ``load_pretrained(path)`` (config ``pretrained_checkpoint``); config ``stage_learning_rate``
gives phases their own rate.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import time
from collections import defaultdict
from logging import getLogger
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import get_local_time, set_color
from torch.nn.utils.clip_grad import clip_grad_norm_
from tqdm import tqdm

from recbole_llmfuse import checkpoint, registry
from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.evaluation import enable_group_metrics

SCHEDULES = ("none", "constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "auto")


class RunHooks:
    """What the run path needs from every trainer: callbacks (``add_callback``, ``emit``) and the timings
    ``epoch_times`` / ``eval_times``."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.callbacks: List[object] = []
        self.epoch_times: List[float] = []
        self.eval_times: List[float] = []

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self, *args)

    def _timed_evaluate(self, eval_data, **kwargs):
        """The wrapped RecBole trainer's ``evaluate``, its seconds appended to ``eval_times``."""
        start = time.perf_counter()
        result = super().evaluate(eval_data, **kwargs)
        self.eval_times.append(time.perf_counter() - start)
        return result


class TrainerMixin(RunHooks):
    """Callbacks, timing, lean checkpoints and group metrics for any RecBole trainer (module docstring)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        writer = getattr(self, "tensorboard", None)
        if writer is not None and not os.path.isabs(writer.log_dir):
            # RecBole's writer keeps a path relative to the working folder of its creation and appends to it
            # later; reopened at the absolute path under output_dir (quick_start.in_output_dir)
            from torch.utils.tensorboard import SummaryWriter

            writer.close()
            self.tensorboard = SummaryWriter(os.path.join(config["output_dir"] or os.getcwd(), writer.log_dir))
        if not config["single_spec"] and getattr(self, "saved_model_file", None):
            # DDP: every rank names the checkpoint by its own clock, but only rank 0 writes it; all use rank 0's
            import torch.distributed as dist

            name = [self.saved_model_file]
            dist.broadcast_object_list(name, src=0)
            self.saved_model_file = name[0]
        self._epoch = -1
        enable_group_metrics(self)

    @property
    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {"main": self.optimizer}

    # -- timing and events around RecBole's loop ----------------------------------------------------
    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self._epoch = epoch_idx
        start = time.perf_counter()
        loss = self._epoch_body(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        seconds = time.perf_counter() - start
        self.epoch_times.append(seconds)
        self.emit("on_epoch_end", epoch_idx, loss, seconds)
        return loss

    def _epoch_body(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    def _valid_epoch(self, valid_data, show_progress=False):
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        self.emit("on_valid", self._epoch, score, result)
        return score, result

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return None
        if load_best_model:
            if not self.config["single_spec"]:
                import torch.distributed as dist

                dist.barrier()  # rank 0 has finished writing the checkpoint
            path = model_file or self.saved_model_file
            checkpoint.load_weights(self.model, path, map_location=self.device)
            self.logger.info(f"Loading model structure and parameters from {path}")
        return self._timed_evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    # -- lean checkpoints ---------------------------------------------------------------------------
    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        path = kwargs.pop("saved_model_file", self.saved_model_file)
        checkpoint.write(path, self.model, self.config, self.optimizers, epoch=epoch, cur_step=self.cur_step,
                         best_valid_score=self.best_valid_score, **self._extra_checkpoint_state())
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {path}")

    def _extra_checkpoint_state(self) -> dict:
        return {}

    def resume_checkpoint(self, resume_file):
        resume_file = str(resume_file)
        self.saved_model_file = resume_file
        ckpt = checkpoint.load_weights(self.model, resume_file, map_location=self.device)
        self.start_epoch = ckpt["epoch"] + 1
        self.cur_step = ckpt["cur_step"]
        self.best_valid_score = ckpt["best_valid_score"]
        states = ckpt.get("optimizer")
        optimizers = self.optimizers
        if states is not None:
            if len(optimizers) == 1:
                states = {next(iter(optimizers)): states}
            for name, opt in optimizers.items():
                opt.load_state_dict(states[name])
        self._load_extra_checkpoint_state(ckpt)
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    def _load_extra_checkpoint_state(self, ckpt: dict) -> None:
        pass


class Trainer(TrainerMixin, RecBoleTrainer):
    """RecBole's ``Trainer`` with step-level training (module docstring)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.grad_accum_steps = int(config["grad_accum_steps"])
        if self.grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        self.lr_schedule = str(config["lr_scheduler"]).lower()
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_scheduler '{self.lr_schedule}': choose one of {SCHEDULES}")
        self.warmup_steps = int(config["warmup_steps"])
        precision = str(config["precision"]).lower()
        if precision not in PRECISIONS:
            raise ConfigError(f"precision '{precision}': choose one of {PRECISIONS}")
        on_cuda = self.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if (precision == "bf16" or (precision == "auto" and on_cuda)) else None
        self.epoch_loss_terms: Dict[int, Dict[str, float]] = {}
        self._optimizers: Dict[str, torch.optim.Optimizer] = {}
        self._group_params: Dict[str, List[torch.nn.Parameter]] = {}
        self._schedulers: Dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self._steps_per_epoch = None
        self._setup_optimizers()

    # -- optimizers and schedules ---------------------------------------------------------------------
    @property
    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def _setup_optimizers(self, params=None, learning_rate=None) -> None:
        """One optimizer per group of ``model.optimizer_groups()``, else ``main`` over ``params`` (RecBole's)."""
        learning_rate = self.learning_rate if learning_rate is None else learning_rate
        groups = self.model.optimizer_groups() if hasattr(self.model, "optimizer_groups") else None
        if not groups:
            if params is None:  # RecBole's own optimizer, built in its __init__ over model.parameters()
                self.optimizer = getattr(self, "optimizer", None) or self._build_optimizer()
            else:
                self.optimizer = self._build_optimizer(params=params, learning_rate=learning_rate)
            self._optimizers = {"main": self.optimizer}
            self._group_params = {"main": [p for g in self.optimizer.param_groups for p in g["params"]]}
        else:
            self._optimizers, self._group_params, seen = {}, {}, {}
            for name, spec in groups.items():
                spec = spec if isinstance(spec, dict) else {"params": spec}
                # as declared: a PEFT adapter that is inactive right now (requires_grad False) still belongs here
                plist = list(spec["params"])
                for p in plist:
                    if id(p) in seen:
                        raise ConfigError(f"optimizer groups '{seen[id(p)]}' and '{name}' share a parameter; "
                                          f"each parameter belongs to one group")
                    seen[id(p)] = name
                kwargs = {k: spec[k] for k in ("weight_decay", "learner") if k in spec}
                self._optimizers[name] = self._build_optimizer(
                    params=plist, learning_rate=spec.get("lr", learning_rate), **kwargs)
                self._group_params[name] = plist
            self.optimizer = next(iter(self._optimizers.values()))  # RecBole code that reads self.optimizer
        self._schedulers = {}

    def _build_schedulers(self, train_data) -> None:
        if self.lr_schedule == "none" or self._schedulers:
            return
        total = max(1, (self.epochs - self.start_epoch) * math.ceil(len(train_data) / self.grad_accum_steps))
        warmup, kind = self.warmup_steps or round(float(self.config["warmup_ratio"]) * total), self.lr_schedule

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if kind == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

        self._schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, factor) for name, opt in self._optimizers.items()}

    def _extra_checkpoint_state(self) -> dict:
        return {"scheduler": {k: s.state_dict() for k, s in self._schedulers.items()}} if self._schedulers else {}

    def _load_extra_checkpoint_state(self, ckpt: dict) -> None:
        self._pending_scheduler_state = ckpt.get("scheduler")

    # -- one epoch ------------------------------------------------------------------------------------
    def _steps(self, interaction, loss_func) -> Iterator[Tuple[str, object]]:
        if loss_func is None and hasattr(self.model, "train_steps"):
            yield from self.model.train_steps(interaction)
        else:  # RecBole's one loss (a tensor or a tuple of tensors), computed when the loop asks
            yield "main", (loss_func or self.model.calculate_loss)(interaction)

    def _epoch_body(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        """RecBole's ``Trainer._train_epoch`` (same operations for a one-loss model) generalised to steps."""
        self.model.train()
        if hasattr(self.model, "on_epoch_start"):
            self.model.on_epoch_start(epoch_idx)
        self._build_schedulers(train_data)
        if getattr(self, "_pending_scheduler_state", None):
            for name, state in self._pending_scheduler_state.items():
                self._schedulers[name].load_state_dict(state)
            self._pending_scheduler_state = None
        iter_data = tqdm(train_data, total=len(train_data), ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink")) \
            if show_progress else train_data
        if not self.config["single_spec"] and train_data.shuffle:
            train_data.sampler.set_epoch(epoch_idx)
        scaler = torch.amp.GradScaler("cuda", enabled=self.enable_scaler)
        accum, n_batches = self.grad_accum_steps, len(train_data)
        multi = len(self._optimizers) > 1
        total_loss = None
        terms: Dict[str, float] = defaultdict(float)
        tokens, epoch_start = 0, time.perf_counter()
        for batch_idx, interaction in enumerate(iter_data):
            stepped, yielded = set(), set()
            interaction = interaction.to(self.device)
            window_start = batch_idx % accum == 0
            window_end = (batch_idx + 1) % accum == 0 or batch_idx + 1 == n_batches
            if window_start:
                for opt in self._optimizers.values():
                    opt.zero_grad()
            sync_loss = 0
            if not self.config["single_spec"]:
                self.set_reduce_hook()
                sync_loss = self.sync_grad_loss()
            steps = self._steps(interaction, loss_func)
            while True:
                with self._autocast():
                    try:
                        group, losses = next(steps)
                    except StopIteration:
                        break
                if group not in self._optimizers:
                    raise ConfigError(f"{type(self.model).__name__}.train_steps yielded group '{group}', "
                                      f"optimizers are {list(self._optimizers)}")
                if accum > 1 and group in yielded:
                    # the steps' gradients would pile up in one buffer between optimizer steps (HDRec spec §4.2)
                    raise ConfigError(f"grad_accum_steps: {accum} with {type(self.model).__name__}, whose batches step "
                                      f"optimizer '{group}' more than once: use grad_accum_steps: 1")
                yielded.add(group)
                if isinstance(losses, dict):
                    loss = sum(losses.values())
                    for name, value in losses.items():
                        terms[f"{group}/{name}" if multi else name] += value.item()
                    total_loss = (total_loss or 0.0) + loss.item()
                elif isinstance(losses, tuple):
                    loss = sum(losses)
                    loss_tuple = tuple(per_loss.item() for per_loss in losses)
                    total_loss = loss_tuple if total_loss is None else tuple(map(sum, zip(total_loss, loss_tuple)))
                else:
                    loss = losses
                    total_loss = losses.item() if total_loss is None else total_loss + losses.item()
                self._check_nan(loss)
                if accum > 1:
                    loss = loss / accum
                if multi:  # this step's gradients go to its own group only (module docstring)
                    others = [p for g, ps in self._group_params.items() if g != group for p in ps]
                    kept = [p.grad for p in others]
                    for p in others:
                        p.grad = None
                    scaler.scale(loss + sync_loss).backward()
                    for p, g in zip(others, kept):
                        p.grad = g
                else:
                    scaler.scale(loss + sync_loss).backward()
                sync_loss = 0
                if window_end:
                    opt = self._optimizers[group]
                    if self.clip_grad_norm:
                        if self.enable_scaler:
                            scaler.unscale_(opt)
                        clip_grad_norm_(self.model.parameters() if not multi else self._group_params[group],
                                        **self.clip_grad_norm)
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad()  # the batch's next step (alternating models) starts from its own loss
                    stepped.add(group)
            # the model contract's token count (SequentialBase.take_token_count; RecBole's own models have none)
            counted = getattr(self.model, "take_token_count", None)
            tokens += counted() if counted else 0
            if show_progress and tokens:  # LLM models: throughput in the bar
                iter_data.set_postfix_str(f"{tokens / (time.perf_counter() - epoch_start):.0f} tokens/s")
            for group in stepped:  # one schedule step per batch and optimizer, however many steps it took
                if group in self._schedulers:
                    self._schedulers[group].step()
        if terms:
            self.epoch_loss_terms[epoch_idx] = {k: v / n_batches for k, v in terms.items()}
        return total_loss

    def _autocast(self):
        if self.autocast_dtype is not None and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)
        return torch.autocast(device_type=self.device.type, enabled=self.enable_amp)

    def _generate_train_loss_output(self, epoch_idx, s_time, e_time, losses):
        out = super()._generate_train_loss_output(epoch_idx, s_time, e_time, losses)
        terms = self.epoch_loss_terms.get(epoch_idx)
        if terms:
            out += " " + ", ".join(f"{k}: {v:.4f}" for k, v in terms.items())
        return out


class StagedTrainer(Trainer):
    """:class:`Trainer` that runs ``model.train_stages`` one after another (see module docstring).

    After ``fit``: ``stage_results[name]`` = ``{"best_valid_score", "best_valid_result", "epochs",
    "epoch_s" (mean training-epoch seconds), "checkpoint"}``.
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self.stage_results: Dict[str, dict] = {}

    def _start_stage(self, stage: str) -> None:
        self.model.enter_stage(stage)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        learning_rate = (self.config["stage_learning_rate"] or {}).get(stage, self.learning_rate)
        self._setup_optimizers(params=trainable, learning_rate=learning_rate)
        self.start_epoch, self.cur_step = 0, 0
        self.best_valid_score = -np.inf if self.valid_metric_bigger else np.inf
        self.best_valid_result = None
        self.train_loss_dict = {}
        name = f"{self.config['model']}-{stage}-{get_local_time()}.pth"
        self.saved_model_file = os.path.join(self.checkpoint_dir, name)
        self.logger.info(
            set_color(f"{self.config['model']} phase '{stage}'", "pink")
            + f": training {sum(p.numel() for p in trainable)} parameters, learning rate {learning_rate}"
        )

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        stages = list(self.model.train_stages)
        pretrained = self.config["pretrained_checkpoint"]
        if pretrained:
            self.model.load_pretrained(pretrained)
        result = (self.best_valid_score, self.best_valid_result)
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            self._start_stage(stage)
            first_epoch = len(self.epoch_times)
            # every phase but the last keeps its best checkpoint, whatever `saved` says: it is the hand-off
            keep = saved or not last
            result = super().fit(train_data, valid_data, verbose=verbose, saved=keep, show_progress=show_progress,
                                 callback_fn=callback_fn)
            if keep and valid_data and os.path.isfile(self.saved_model_file):
                checkpoint.load_weights(self.model, self.saved_model_file, map_location=self.device)
            times = self.epoch_times[first_epoch:]
            self.stage_results[stage] = {
                "best_valid_score": float(result[0]),
                "best_valid_result": dict(result[1] or {}),
                "epochs": len(times),
                "epoch_s": float(np.mean(times)) if times else float("nan"),
                "checkpoint": self.saved_model_file if keep else None,
            }
            getLogger().info(set_color(f"phase '{stage}' best valid", "yellow") + f": {dict(result[1] or {})}")
        return result


_WRAPPED: Dict[type, type] = {}


class BoosterRunHooks(RunHooks):
    """:class:`RunHooks` for RecBole's ``DecisionTreeTrainer`` (LightGBM, XGBoost): its model is a booster, not a
    torch module, trained in one call with its own ``_valid_epoch(valid_data)`` and its own model files, so
    checkpoints stay RecBole's."""

    def _valid_epoch(self, valid_data, show_progress=False):
        score, result = super()._valid_epoch(valid_data)
        self.emit("on_valid", 0, score, result)
        return score, result

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        return self._timed_evaluate(eval_data, load_best_model=load_best_model, model_file=model_file,
                                    show_progress=show_progress)


def with_run_hooks(trainer_class: type) -> type:
    """``trainer_class`` with :class:`TrainerMixin` (RecBole's plain ``Trainer`` becomes :class:`Trainer`;
    RecBole's ``DecisionTreeTrainer`` family gets :class:`BoosterRunHooks`)."""
    from recbole.trainer import DecisionTreeTrainer

    if issubclass(trainer_class, RunHooks):
        return trainer_class
    if trainer_class is RecBoleTrainer:
        return Trainer
    if trainer_class not in _WRAPPED:
        hooks = BoosterRunHooks if issubclass(trainer_class, DecisionTreeTrainer) else TrainerMixin
        _WRAPPED[trainer_class] = type(trainer_class.__name__, (hooks, trainer_class),
                                       {"__module__": __name__, "__doc__": trainer_class.__doc__})
    return _WRAPPED[trainer_class]


def trainer_class(model_class: type) -> Optional[type]:
    """The trainer a model names in its ``trainer_class`` attribute, found by name as RecBole finds trainers (so
    a model never imports the trainer layer): ``"StagedTrainer"`` is looked up in this module, then in
    ``recbole.trainer``; ``"package.module:Class"`` names another package's; a class is taken as is. ``None``
    when the model names none."""
    named = getattr(model_class, "trainer_class", None)
    if named is None or isinstance(named, type):
        return named
    module_name, sep, attr = named.rpartition(":")
    modules = [importlib.import_module(module_name)] if sep else [sys.modules[__name__],
                                                                   importlib.import_module("recbole.trainer")]
    for module in modules:
        if isinstance(getattr(module, attr, None), type):
            return getattr(module, attr)
    raise ConfigError(f"{model_class.__name__}.trainer_class '{named}': no such trainer in "
                      f"{', '.join(m.__name__ for m in modules)}; name a trainer class there or give 'package.module:Class'")


def get_trainer(model_type, model_name) -> type:
    """The trainer class for a model: the one its ``trainer_class`` names (:func:`trainer_class`), else RecBole's
    rule; either way with :class:`TrainerMixin` (callbacks, timing, lean checkpoints), and RecBole's plain
    ``Trainer`` replaced by :class:`Trainer` (step-level training)."""
    from recbole.utils import get_trainer as recbole_get_trainer

    model_class = registry.get_model(model_name)
    return with_run_hooks(trainer_class(model_class) or recbole_get_trainer(model_type, model_class.__name__))
