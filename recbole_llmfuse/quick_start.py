"""Plugin-aware twins of ``recbole.quick_start``: ``run``, ``run_recbole``, ``run_recboles``,
``objective_function`` and ``load_data_and_model``.

RecBole's versions re-look the model up by *name* inside RecBole only (``quick_start.py`` calls
``recbole.utils.get_model``), so they cannot run a plugin model even when handed its class. These
follow the same steps with :mod:`recbole_llmfuse.registry` lookups; the trainer, data splitting and
evaluator are RecBole's.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from logging import getLogger
from typing import List, Optional, Sequence

import numpy as np
import torch
from recbole.data.transform import construct_transform
from recbole.utils import get_environment, get_flops, init_logger, init_seed, set_color

from recbole_llmfuse import checkpoint, registry
from recbole_llmfuse.config import Config, ConfigError
from recbole_llmfuse.data import create_dataset, data_preparation, prepare_folder
from recbole_llmfuse.trainer import get_trainer


@contextlib.contextmanager
def in_output_dir(config):
    """RecBole 1.2.1 writes ``./log/`` (``init_logger``) and ``./log_tensorboard/`` (the trainer) relative to
    the working folder, with no setting; both open their files on the spot (absolute paths from then on), so
    they run inside ``config['output_dir']`` and the working folder is restored."""
    previous = os.getcwd()
    os.chdir(config["output_dir"] or previous)
    try:
        yield
    finally:
        os.chdir(previous)


def make_trainer(config, model):
    """The model's trainer (:func:`recbole_llmfuse.trainer.get_trainer`: callbacks, timing, lean
    checkpoints; group metrics installed when ``config['group_metrics']`` asks)."""
    return get_trainer(config["MODEL_TYPE"], config["model"])(config, model)


def build(config, logger=None):
    """Dataset, split loaders and model for a ready ``config`` (shared by every entry point here)."""
    dataset = create_dataset(config)
    if logger is not None:
        logger.info(dataset)
    try:
        train_data, valid_data, test_data = data_preparation(config, dataset)
    except ValueError as err:  # torch's RandomSampler on an empty training split
        if "num_samples" not in str(err):
            raise
        longest = int(np.bincount(dataset.inter_feat[dataset.uid_field].numpy()).max()) if len(dataset.inter_feat) else 0
        raise ConfigError(
            f"dataset '{config['dataset']}': the training split is empty ({dataset.user_num - 1} users, the longest "
            f"with {longest} interactions after filtering); the split {config['eval_args']['split']} needs users with "
            f"at least 3 (one to train, one to validate, one to test). Add interactions or loosen the filters") from None
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = registry.get_model(config["model"])(config, train_data._dataset).to(config["device"])
    return dataset, model, train_data, valid_data, test_data


def log_model(config, model, dataset, logger) -> None:
    """Print the model and its FLOPs as RecBole does, or, above ``model_log_max_params`` parameters (an LLM
    inside), one summary line: ``get_flops`` deep-copies the model and printing an 8B decoder helps nobody.
    RecBole's LightGBM / XGBoost models are boosters, not torch modules: printed only."""
    if not isinstance(model, torch.nn.Module):
        logger.info(model)
        return
    total, trainable, frozen = checkpoint.parameter_summary(model)
    if total <= config["model_log_max_params"]:
        logger.info(model)
        flops = get_flops(model, dataset, config["device"], logger, construct_transform(config))
        logger.info(set_color("FLOPs", "blue") + f": {flops}")
    logger.info(set_color("parameters", "blue") + f": {total:,} total, {trainable:,} trainable "
                f"({100.0 * trainable / max(total, 1):.2f}%), {frozen:,} frozen and left out of checkpoints")


@dataclass
class RunResult:
    """What :func:`execute` returns; ``trainer`` holds the timings (``epoch_times``, ``eval_times``)."""

    config: object
    model: object
    trainer: object
    train_data: object
    valid_data: object
    test_data: object
    best_valid_score: float
    best_valid_result: Optional[dict]
    test_result: Optional[dict]
    model_file: Optional[str]

    def summary(self) -> dict:
        return {
            "best_valid_score": self.best_valid_score,
            "valid_score_bigger": self.config["valid_metric_bigger"],
            "best_valid_result": self.best_valid_result,
            "test_result": self.test_result,
            "model_file": self.model_file,
        }


def execute(config, callbacks: Sequence[object] = (), saved: bool = True, test: bool = True,
            verbose: bool = True) -> RunResult:
    """The one run path (``run_recbole``, ``objective_function``, ``bench`` and ``tune`` all call it):
    seed, logger, dataset (and its preparation hooks), model, trainer, ``fit``, test evaluation.

    ``callbacks`` are added to the trainer (``on_epoch_end``, ``on_valid``; ``on_fit_end`` is called here
    after ``fit``). ``saved``: keep the best checkpoint and test it; ``test``: evaluate on the test split.
    """
    init_seed(config["seed"], config["reproducibility"])
    prepare_folder(config)  # a missing or malformed dataset is said before ~100 lines of configuration
    with in_output_dir(config):
        init_logger(config)
    logger = getLogger()
    if verbose:
        logger.info(sys.argv)
        logger.info(config)
    dataset, model, train_data, valid_data, test_data = build(config, logger if verbose else None)
    if verbose:
        log_model(config, model, dataset, logger)
    with in_output_dir(config):
        trainer = make_trainer(config, model)
    for cb in callbacks:
        trainer.add_callback(cb)
    show = config["show_progress"] and verbose
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, verbose=verbose, saved=saved,
                                                      show_progress=show)
    trainer.emit("on_fit_end")
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=show) if test else None
    if verbose:
        logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
        logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
        logger.info(set_color("test result", "yellow") + f": {test_result}")
    return RunResult(config, model, trainer, train_data, valid_data, test_data, best_valid_score,
                     best_valid_result, test_result, trainer.saved_model_file if saved else None)


def run_recbole(
    model=None,
    dataset=None,
    config_file_list=None,
    config_dict=None,
    saved=True,
    queue=None,
    argv: Optional[List[str]] = None,
):
    """Train and test one model, like ``recbole.quick_start.run_recbole``.

    Args:
        model: model name (plugin or RecBole) or class.
        dataset: dataset name.
        config_file_list: YAML files, later ones win.
        config_dict: parameter dict (wins over files).
        saved: keep the best checkpoint and reload it for the test.
        queue: multiprocessing queue that receives the result (DDP, rank 0).
        argv: ``--key=value`` overrides (win over everything); ``None`` reads ``sys.argv`` as RecBole does.

    Returns:
        dict with ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``, ``test_result``
        and ``model_file`` (the checkpoint path, when ``saved``).
    """
    config = Config(
        model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict, argv=argv
    )
    result = execute(config, saved=saved).summary()
    if not config["single_spec"]:
        import torch.distributed as dist

        dist.destroy_process_group()
    if config["local_rank"] == 0 and queue is not None:
        queue.put(result)
    return result


def run_recboles(rank, *args):
    """``torch.multiprocessing.spawn`` target: one DDP rank (RecBole's ``run_recboles``)."""
    kwargs = args[-1]
    if not isinstance(kwargs, MutableMapping):
        raise ValueError(f"The last argument of run_recboles should be a dict, but got {type(kwargs)}")
    kwargs["config_dict"] = kwargs.get("config_dict", {})
    kwargs["config_dict"]["local_rank"] = rank
    run_recbole(*args[:3], **kwargs)


def run(
    model,
    dataset,
    config_file_list=None,
    config_dict=None,
    saved=True,
    nproc=1,
    world_size=-1,
    ip="localhost",
    port="5678",
    group_offset=0,
    argv: Optional[List[str]] = None,
):
    """Single process, or RecBole's DDP path (``nproc`` processes on this node) when ``nproc > 1``."""
    if nproc == 1 and world_size <= 0:
        return run_recbole(
            model=model,
            dataset=dataset,
            config_file_list=config_file_list,
            config_dict=config_dict,
            saved=saved,
            argv=argv,
        )
    import torch.multiprocessing as mp

    if world_size == -1:
        world_size = nproc
    queue = mp.get_context("spawn").SimpleQueue()
    config_dict = dict(config_dict or {})
    config_dict.update(
        {"world_size": world_size, "ip": ip, "port": port, "nproc": nproc, "offset": group_offset}
    )
    kwargs = {"config_dict": config_dict, "queue": queue, "argv": list(argv) if argv is not None else None}
    mp.spawn(run_recboles, args=(model, dataset, config_file_list, kwargs), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """Objective for ``recbole.trainer.HyperTuning`` (hyperopt/exhaustive search), plugin-aware.

    Unlike RecBole's version it does not call ``ray.tune.report`` (whose signature changed across
    Ray releases); Ray Tune sweeps use ``recbole-llmfuse tune``, which reports every epoch.
    """
    config = Config(config_dict=config_dict, config_file_list=config_file_list, argv=[])
    logger = getLogger()
    for hdlr in logger.handlers[:]:
        logger.removeHandler(hdlr)
    return {"model": config["model"], **execute(config, saved=saved, verbose=False).summary()}


def load_data_and_model(model_file):
    """Reload a checkpoint written by :func:`run_recbole` (plugin or RecBole model).

    Returns ``(config, model, dataset, train_data, valid_data, test_data)`` like RecBole's function.
    Frozen tensors that models rebuild from their sources (LLM embedding tables, a frozen decoder) are not
    in the checkpoint (:mod:`recbole_llmfuse.checkpoint`); they are rebuilt here from the same sources.
    """
    config = checkpoint.read(model_file)["config"]
    init_seed(config["seed"], config["reproducibility"])
    with in_output_dir(config):
        init_logger(config)
    logger = getLogger()
    logger.info(config)
    dataset, model, train_data, valid_data, test_data = build(config, logger)
    checkpoint.load_weights(model, model_file, map_location=config["device"])
    return config, model, dataset, train_data, valid_data, test_data
