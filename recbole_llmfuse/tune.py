"""``recbole-llmfuse tune``: Ray Tune sweeps over any registered model, reported every epoch.

What RecBole's ``run_hyper.py --tool Ray`` lacks and this adds: the current ``tune.Tuner`` API; a report
from inside the training loop after every validation (so ASHA stops bad trials early); absolute data,
config and checkpoint paths (Ray runs each trial in its own directory, where the trial's RecBole log
stays); plugin models; failure isolation (a trial that raises is recorded as failed, the sweep goes on);
a results table, a ``best.yaml`` that ``run_recbole --config_files best.yaml`` reproduces, and a plot.

Search spaces are YAML, one entry per hyper-parameter::

    learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
    hidden_size: {choice: [32, 64, 128]}
    mmd_weight: {uniform: [0.0, 1.0]}
    stopping_step: {quniform: [2, 10, 2]}      # low, high, q
    n_layers: {randint: [1, 4]}                # high exclusive
    train_stages: {grid_search: [[pretrain], [pretrain, align, finetune]]}

or RecBole's hyperopt-style params file (``learning_rate loguniform -8,0``; ``embedding_size choice
[64,96,128]``; ``dropout uniform 0.1,0.5``; ``x quniform 1,10,1``), where ``loguniform`` bounds are
natural-log exponents as in hyperopt.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import time
from typing import Dict, List, Optional

import yaml

from recbole_llmfuse.config import Config, ConfigError, parse_overrides, read_yaml_file
from recbole_llmfuse.data import prepare
from recbole_llmfuse.files import atomic_write_text, png_figure, write_csv
from recbole_llmfuse.quick_start import execute
from recbole_llmfuse.ray_runtime import ray_session, worker_setup
from recbole_llmfuse.registry import get_model
from recbole_llmfuse.trainer import StagedTrainer, trainer_class

SPACE_KINDS = ("choice", "uniform", "loguniform", "quniform", "randint", "grid_search")


# -- search spaces ---------------------------------------------------------------------------------------
def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_space(path: str) -> Dict[str, dict]:
    """``{name: {kind: args}}`` from a YAML space or a RecBole hyperopt params file; errors name the line."""
    with open(path) as f:
        text = f.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict):
        space = {}
        for name, spec in data.items():
            if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SPACE_KINDS):
                raise ConfigError(f"{path}: '{name}' must be one of {{{'|'.join(SPACE_KINDS)}: [...]}}, got {spec!r}")
            kind, args = next(iter(spec.items()))
            space[name] = {kind: list(args) if isinstance(args, (list, tuple)) else args}
        _check_space(space, path)
        return space
    space = {}  # RecBole/hyperopt format: "name kind values"
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=2)
        if len(parts) != 3 or parts[1] not in SPACE_KINDS:
            raise ConfigError(
                f"{path}, line {lineno}: '{line}' is neither YAML nor 'name kind values' with kind in {SPACE_KINDS}"
            )
        name, kind, values = parts
        if kind == "choice":
            options = _literal(values)
            args = [_literal(v) if isinstance(v, str) else v for v in options]
        else:
            args = [float(v) for v in values.split(",")]
            if kind == "loguniform":  # hyperopt: bounds are exponents
                args = [math.exp(args[0]), math.exp(args[1])]
        space[name] = {kind: args}
    _check_space(space, path)
    return space


def _check_space(space: Dict[str, dict], path: str) -> None:
    arity = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2}
    for name, spec in space.items():
        kind, args = next(iter(spec.items()))
        if kind in arity and (not isinstance(args, list) or len(args) != arity[kind]):
            raise ConfigError(f"{path}: '{name}': {kind} takes {arity[kind]} numbers, got {args!r}")
        if kind in ("choice", "grid_search") and (not isinstance(args, list) or not args):
            raise ConfigError(f"{path}: '{name}': {kind} takes a non-empty list, got {args!r}")
        if kind == "loguniform" and not 0 < args[0] < args[1]:
            raise ConfigError(f"{path}: '{name}': loguniform needs 0 < low < high, got {args!r}")


def to_tune(space: Dict[str, dict]) -> dict:
    from ray import tune

    out = {}
    for name, spec in space.items():
        kind, args = next(iter(spec.items()))
        if kind in ("choice", "grid_search"):
            out[name] = getattr(tune, kind)(args)
        elif kind == "randint":
            out[name] = tune.randint(int(args[0]), int(args[1]))
        else:
            out[name] = getattr(tune, kind)(*args)
    return out


# -- one trial ---------------------------------------------------------------------------------------------
def _plain(value):
    """numpy scalars (Ray's sampled values, RecBole's metrics) -> Python numbers for YAML/JSON."""
    return value.item() if hasattr(value, "item") else value


class TuneReporter:
    """Callback: reports every validation to Tune, then the run's end (``fit_done``: ended by itself, by
    the epoch limit or RecBole's early stopping, not by the scheduler)."""

    def __init__(self, session):
        self.session, self.reports, self.last = session, 0, {}

    def on_valid(self, trainer, epoch, score, result) -> None:
        # "epoch" counts validations over the whole run, so it keeps growing across the phases of a
        # multi-phase model (PAD), as ASHA's time attribute must
        self.reports += 1
        self.last = dict(result)
        self.session.report({**{k: float(v) for k, v in result.items()}, "valid_score": float(score),
                             "epoch": self.reports, "fit_done": 0})

    def on_fit_end(self, trainer) -> None:
        self.session.report({**{k: float(v) for k, v in (trainer.best_valid_result or self.last).items()},
                             "valid_score": float(trainer.best_valid_score), "epoch": self.reports, "fit_done": 1})


def ray_api():
    """``(report, RunConfig, FailureConfig)`` of the installed Ray: ``ray.tune``'s own (Ray >= 2.40, the
    documented install), else ``ray.air``'s (ray 2.6.3, what a plain ``pip install`` resolves to)."""
    from ray import tune

    if hasattr(tune, "RunConfig"):
        return tune, tune.RunConfig, tune.FailureConfig
    from ray import air
    from ray.air import session

    return session, air.RunConfig, air.FailureConfig


def train_trial(params: dict, setup: dict) -> None:
    """Ray function trainable: one run (the package's run path) that reports every validation to Tune."""
    session = ray_api()[0]
    params = {k: _plain(v) for k, v in params.items()}
    config = Config(setup["model"], setup["dataset"], config_file_list=setup["config_files"] or None,
                    config_dict={**setup["fixed"], **params, "show_progress": False}, argv=setup["overrides"])
    execute(config, callbacks=[TuneReporter(session)], saved=False, test=False, verbose=False)  # ./log/ of the trial


def make_scheduler(name: str, max_t: int, grace_period: int = 1, reduction_factor: float = 2):
    """``asha``: ASHA on the ``epoch`` reports (grace period clamped to ``max_t``); ``fifo``: every trial runs on."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if name == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=min(grace_period, max_t),
                             reduction_factor=reduction_factor)
    if name == "fifo":
        return FIFOScheduler()
    raise ConfigError(f"--scheduler {name}: use asha or fifo")


# -- the sweep ---------------------------------------------------------------------------------------------
def run_tune(model: str, dataset: str, space_file: str, out: str, config_files: List[str], overrides: List[str],
             num_samples: int = 1, scheduler: str = "asha", metric: str = "ndcg@10", cpus_per_trial: float = 1,
             gpus_per_trial: float = 0, address: Optional[str] = None, max_concurrent: int = 0,
             grace_period: int = 1, reduction_factor: float = 2, num_cpus: Optional[int] = None) -> dict:
    """Run the sweep; returns ``{"rows": [...], "best": {...} | None, "failed": n, "stopped_early": n}``."""
    from ray import tune

    space = parse_space(space_file)
    parse_overrides(overrides)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    config_files = [os.path.abspath(p) for p in config_files]
    # every path a trial sees is absolute: Ray runs trials in their own directories
    probe = Config(model, dataset, config_file_list=config_files or None, argv=overrides)
    prepare(probe)  # hooks run once here, before any trial (trials with swept hook settings wait on its lock)
    fixed = {"data_path": os.path.dirname(probe["data_path"]),  # RecBole appends /<dataset> itself
             "checkpoint_dir": os.path.join(out, "saved")}
    # a multi-phase model (PAD) validates up to `epochs` times per phase, and its epoch counter runs on
    staged = issubclass(trainer_class(get_model(model)) or object, StagedTrainer)
    max_t = int(probe["epochs"]) * (len(probe["train_stages"]) if staged and probe["train_stages"] else 1)
    metric = metric.lower()
    sched = make_scheduler(scheduler, max_t, grace_period, reduction_factor)
    _, run_config, failure_config = ray_api()
    # the absolute paths replace the command line's own (a relative --data_path would be read in the trial's folder)
    trial_overrides = [o for o in overrides if next(iter(parse_overrides([o]))) not in fixed]
    setup = {"model": model, "dataset": dataset, "config_files": config_files, "overrides": trial_overrides,
             "fixed": fixed}
    trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup),
                                    {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space=to_tune(space),
        tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=sched, num_samples=num_samples,
                                    max_concurrent_trials=max_concurrent or None),
        run_config=run_config(name="trials", storage_path=out, verbose=1,
                              failure_config=failure_config(max_failures=0, fail_fast=False)),
    )
    with ray_session(address, num_cpus, runtime_env={"worker_process_setup_hook": worker_setup}):
        start = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - start
        return summarize(grid, space, metric, max_t, out, model, dataset, config_files, overrides, fixed, wall)


def summarize(grid, space, metric, max_t, out, model, dataset, config_files, overrides, fixed, wall) -> dict:
    rows, curves = [], {}
    for i in range(len(grid)):
        result = grid[i]
        df = result.metrics_dataframe
        params = {k: _plain((result.config or {}).get(k)) for k in space}  # None: the trial never started
        epochs = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
        best_value = float(df[metric].max()) if df is not None and metric in df else float("nan")
        finished = df is not None and "fit_done" in df.columns and bool((df["fit_done"] == 1).any())
        if result.error is not None:
            status = "failed"
        elif not finished and epochs < max_t:
            status = "stopped"  # by the scheduler (ASHA), before RecBole's own end or early stopping
            # (ASHA also ends a trial that reached max_t, before its last report: that one ran to the end)
        else:
            status = "completed"
        name = os.path.basename(str(result.path)) if getattr(result, "path", None) else f"trial_{i}"
        row = {"trial": name, "status": status, f"best_{metric}": best_value, "epochs": epochs, **params,
               "error": "" if result.error is None else str(result.error).strip().splitlines()[-1][:300],
               "log_dir": str(getattr(result, "path", "") or "")}
        rows.append(row)
        if df is not None and metric in df:
            curves[name] = (df["epoch"].tolist(), df[metric].tolist())
    rows.sort(key=lambda r: (r["status"] == "failed", -(r[f"best_{metric}"] if not math.isnan(r[f"best_{metric}"]) else -1)))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(os.path.join(out, "results.csv"), rows, keys)
    cols = ["trial", "status", f"best_{metric}", "epochs"] + list(space)
    atomic_write_text(os.path.join(out, "results.md"),
                      f"{model} on {dataset}: {len(rows)} trials, sorted by best validation {metric}; "
                      f"sweep wall time {wall:.0f} s\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
                      + "".join("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols)
                                + " |\n" for r in rows))
    ok = [r for r in rows if r["status"] != "failed" and not math.isnan(r[f"best_{metric}"])]
    best = ok[0] if ok else None
    if best is not None:
        merged: dict = {}
        for path in config_files:
            merged.update(read_yaml_file(path))
        merged.update({k: yaml.safe_load(v) for k, v in parse_overrides(overrides).items()})
        merged.update(fixed)
        merged.update({k: best[k] for k in space})
        merged.update({"model": model, "dataset": dataset})
        atomic_write_text(os.path.join(out, "best.yaml"),
                          f"# best of {len(rows)} trials ({best['trial']}: validation {metric} "
                          f"{best[f'best_{metric}']:.4f}).\n# Reproduce: run_recbole --config_files "
                          f"{os.path.join(out, 'best.yaml')}\n"
                          + yaml.safe_dump({k: _plain(v) for k, v in merged.items()}, sort_keys=False))
    _plot(curves, metric, os.path.join(out, "curves.png"))
    return {"rows": rows, "best": best, "failed": sum(r["status"] == "failed" for r in rows),
            "stopped_early": sum(r["status"] == "stopped" for r in rows), "wall_s": wall}


def _plot(curves: Dict[str, tuple], metric: str, path: str) -> None:
    with png_figure(path, figsize=(7, 4)) as (_, ax):
        for name, (x, y) in curves.items():
            ax.plot(x, y, marker="o", label=name[:40])
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {metric}")
        if curves:
            ax.legend(fontsize=7)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", required=True)
    parser.add_argument("--dataset", "-d", default="ml-100k")
    parser.add_argument("--space", required=True, help="search-space YAML (or RecBole hyperopt params file)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples of the space (grid_search: per grid point)")
    parser.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    parser.add_argument("--metric", default="ndcg@10", help="validation metric to maximise (reported every epoch)")
    parser.add_argument("--cpus-per-trial", type=float, default=1)
    parser.add_argument("--gpus-per-trial", type=float, default=0)
    parser.add_argument("--address", default=None, help="join a Ray cluster: auto or ray://HOST:10001")
    parser.add_argument("--max-concurrent", type=int, default=0, help="0: as many as resources allow")
    parser.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial may be stopped")
    parser.add_argument("--reduction-factor", type=float, default=2, help="ASHA: keep 1/factor at each rung")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--config_files", default=None, help="space-separated YAML files for every trial")
    parser.add_argument("--out", default="tune_out")
    parser.epilog = "Any other --key=value is a fixed RecBole setting for every trial."


def main_from_args(args: argparse.Namespace, overrides: List[str]) -> int:
    result = run_tune(args.model, args.dataset, args.space, args.out,
                      args.config_files.split() if args.config_files else [], overrides,
                      num_samples=args.num_samples, scheduler=args.scheduler, metric=args.metric,
                      cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, address=args.address,
                      max_concurrent=args.max_concurrent, grace_period=args.grace_period,
                      reduction_factor=args.reduction_factor, num_cpus=args.num_cpus)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    print(f"failed: {result['failed']}, stopped early: {result['stopped_early']}; "
          f"best config: {os.path.join(os.path.abspath(args.out), 'best.yaml') if result['best'] else 'none'}")
    return 0 if result["best"] else 1


