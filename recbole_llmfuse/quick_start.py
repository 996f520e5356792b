"""Plugin-aware twins of ``recbole.quick_start``: ``run``, ``run_recbole``, ``run_recboles``,
``objective_function`` and ``load_data_and_model``.

RecBole's versions re-look the model up by *name* inside RecBole only (``quick_start.py`` calls
``recbole.utils.get_model``), so they cannot run a plugin model even when handed its class. These
follow the same steps with :mod:`recbole_llmfuse.registry` lookups; the trainer, data splitting and
evaluator are RecBole's.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from logging import getLogger
from typing import List, Optional

from recbole.data.transform import construct_transform
from recbole.utils import get_environment, get_flops, init_logger, init_seed, set_color

from recbole_llmfuse import registry
from recbole_llmfuse.compat import trusted_torch_load
from recbole_llmfuse.config import Config
from recbole_llmfuse.data import create_dataset, data_preparation
from recbole_llmfuse.evaluation import enable_group_metrics


def make_trainer(config, model):
    """The model's RecBole trainer, with group metrics installed when ``config['group_metrics']`` asks."""
    trainer = registry.get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    enable_group_metrics(trainer)
    return trainer


def build(config, logger=None):
    """Dataset, split loaders and model for a ready ``config`` (shared by every entry point here)."""
    dataset = create_dataset(config)
    if logger is not None:
        logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = registry.get_model(config["model"])(config, train_data._dataset).to(config["device"])
    return dataset, model, train_data, valid_data, test_data


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
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    dataset, model, train_data, valid_data, test_data = build(config, logger)
    logger.info(model)

    transform = construct_transform(config)
    flops = get_flops(model, dataset, config["device"], logger, transform)
    logger.info(set_color("FLOPs", "blue") + f": {flops}")

    trainer = make_trainer(config, model)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    environment_tb = get_environment(config)
    logger.info("The running environment of this training is as follows:\n" + environment_tb.draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")

    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "model_file": trainer.saved_model_file if saved else None,
    }
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
    init_seed(config["seed"], config["reproducibility"])
    logger = getLogger()
    for hdlr in logger.handlers[:]:
        logger.removeHandler(hdlr)
    init_logger(config)
    logging.basicConfig(level=logging.ERROR)
    _, model, train_data, valid_data, test_data = build(config)
    trainer = make_trainer(config, model)
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, verbose=False, saved=saved)
    test_result = trainer.evaluate(test_data, load_best_model=saved)
    return {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }


def load_data_and_model(model_file):
    """Reload a checkpoint written by :func:`run_recbole` (plugin or RecBole model).

    Returns ``(config, model, dataset, train_data, valid_data, test_data)`` like RecBole's function.
    Frozen buffers that models rebuild from data files (e.g. LLM embedding tables) are not in the
    checkpoint; they are rebuilt here from the same files.
    """
    checkpoint = trusted_torch_load(model_file, map_location="cpu")
    config = checkpoint["config"]
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)
    dataset, model, train_data, valid_data, test_data = build(config, logger)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data
