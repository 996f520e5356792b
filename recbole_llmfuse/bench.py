"""``recbole-llmfuse bench``: several models x seeds under one protocol, with tables and plots.

Every run is a fresh subprocess (clean peak-memory figure; a crash is recorded, not fatal) that trains
and tests one model with the same dataset, config files and ``--key=value`` overrides as every other run
(leave-one-out, chronological, full ranking: RecBole's sequential defaults), with group metrics on.

Writes to ``--out``: ``results.csv`` (one row per run: status, every test metric overall and per group,
mean epoch time, test evaluation time, peak memory, trainable parameters), ``results.md`` (mean ± std over
seeds and a paired t-test against the first model), ``buckets.png`` (the metric per popularity bucket,
warm -> cold, per model), ``valid_curves.png`` (validation metric per epoch), ``logs/`` (a log and a JSON
record per run) and ``saved/<model>-seed<seed>/`` (each run's checkpoints). ``--jobs N`` runs N at a time
(``--gpus 0,1`` shares them out over GPUs).

**Budget-matched comparison** (``--tune SPACE --tune_samples N``): before the seeded runs, every model is
tuned on validation with the same Ray Tune budget — the same search space, number of trials, scheduler
and epoch cap (``recbole-llmfuse tune``, one sweep per model under ``tune/<model>/``) — and its seeded
runs use the values its sweep chose, so no model wins by tuning effort. Keys of the space that a model
does not read are inert for it. ``results.md`` names the budget and each model's chosen values.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

from recbole_llmfuse.config import Config, ConfigError, parse_overrides, read_yaml_file
from recbole_llmfuse.data import prepare
from recbole_llmfuse.files import atomic_write_text, png_figure, write_csv
from recbole_llmfuse.quick_start import execute
from recbole_llmfuse.registry import get_model
from recbole_llmfuse.tune import parse_space, run_tune

REPORT_GROUPS = ("", "/head", "/tail", "/tail_users")


def _worker(spec: dict) -> List[dict]:
    """Train and test one (model, seed) in this process; returns its record(s).

    A multi-phase model (PAD) gives one more record per earlier phase, named ``<model>/<phase>``: the test
    metrics of that phase's best checkpoint (chosen on validation, like every run) and that phase's mean
    epoch time; PAD's ``PAD/pretrain`` is the SASRec baseline trained with the same loss and config.
    """
    import resource

    import torch

    name, variant = parse_variant(spec["model"])
    config = Config(
        name, spec["dataset"], config_file_list=spec["config_files"] or None,
        config_dict={**spec.get("tuned", {}), **variant, "seed": spec["seed"], "group_metrics": True, "show_progress": False,
                     **spec.get("settings", {})},  # the bench's own: checkpoint_dir, gpu_id
        argv=spec["overrides"],
    )
    curve = ValidCurve()
    run = execute(config, callbacks=[curve])
    trainer, model, test_result, test_data = run.trainer, run.model, run.test_result, run.test_data
    stages = getattr(trainer, "stage_results", {})
    last = list(stages)[-1] if stages else None
    record = {
        "model": spec["model"], "seed": spec["seed"], "status": "ok",
        "best_valid_score": float(run.best_valid_score), "tuned": json.dumps(spec.get("tuned", {})),
        "epoch_s": stages[last]["epoch_s"] if stages else (statistics.mean(trainer.epoch_times) if trainer.epoch_times else float("nan")),
        "eval_s": trainer.eval_times[-1],
        "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "epochs_run": len(trainer.epoch_times),
        "valid_curve": curve.scores,
        **{f"test_{k}": float(v) for k, v in test_result.items()},
        **{f"epoch_s_{name}": info["epoch_s"] for name, info in stages.items()},
        "device": str(config["device"]), "torch_threads": torch.get_num_threads(),
    }
    records = [record]
    for name, info in list(stages.items())[:-1]:
        stage_result = trainer.evaluate(test_data, load_best_model=True, model_file=info["checkpoint"])
        records.append({
            "model": f"{spec['model']}/{name}", "seed": spec["seed"], "status": "ok",
            "best_valid_score": info["best_valid_score"], "epoch_s": info["epoch_s"], "eval_s": float("nan"),
            "peak_mem_mb": float("nan"), "trainable_params": None, "epochs_run": info["epochs"], "valid_curve": [],
            **{f"test_{k}": float(v) for k, v in stage_result.items()},
        })
    return records


class ValidCurve:
    """Callback: the validation score of every validation, in order."""

    def __init__(self):
        self.scores: List[float] = []

    def on_valid(self, trainer, epoch, score, result) -> None:
        self.scores.append(float(score))


def parse_variant(label: str):
    """``"FAERec[backbone=FMLPRec,align_alpha=0.3]"`` -> ``("FAERec", {"backbone": "FMLPRec", "align_alpha": 0.3})``;
    values may be YAML flow dicts or lists (``PtE[pte_profiles={backend: hf, tag: smol}]``).

    A model label may carry its own settings in brackets (values parsed as YAML), so one bench compares
    variants of one model; they win over the config files, and command-line overrides win over them.
    """
    import yaml


    if "[" not in label:
        return label, {}
    if not label.endswith("]"):
        raise ConfigError(f"model '{label}': write NAME[key=value,key=value]")
    name, _, inner = label[:-1].partition("[")
    settings = {}
    items, depth, part = [], 0, ""
    for ch in inner:  # commas inside {...} / [...] values belong to the value
        depth += (ch in "{[") - (ch in "}]")
        if ch == "," and depth == 0:
            items.append(part)
            part = ""
        else:
            part += ch
    items.append(part)
    for item in filter(None, items):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"model '{label}': '{item}' is not key=value")
        if not value.strip():
            raise ConfigError(f"model '{label}': '{item}' has no value; write {key.strip()}=VALUE (null for none)")
        settings[key.strip()] = yaml.safe_load(value)
    return name, settings


def _mean_std(values) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def _paired_p(a: List[float], b: List[float]) -> str:
    if len(a) < 2 or len(a) != len(b):
        return "n/a"
    from scipy import stats

    if all(x == y for x, y in zip(a, b)):
        return "1.000"
    return f"{stats.ttest_rel(a, b).pvalue:.3f}"


def summarize(records: List[dict], models: List[str], metrics: List[str], out: str, baseline: str = None,
              tuning: Optional[dict] = None) -> str:
    ok = [r for r in records if r["status"] == "ok"]
    rows: List[str] = []
    for m in models:  # each model, then its earlier phases (e.g. PAD/pretrain, PAD/align)
        rows += [m] + sorted({r["model"] for r in ok if r["model"].startswith(m + "/")}, key=lambda n: _phase_order(records, n))
    models = rows
    by_model: Dict[str, List[dict]] = {m: sorted((r for r in ok if r["model"] == m), key=lambda r: r["seed"]) for m in models}
    base = baseline or models[0]
    if base not in by_model:
        raise ValueError(f"--baseline {base}: not among the benchmarked rows {models}")
    columns = [f"{m}{g}" for m in metrics for g in REPORT_GROUPS]
    lines = [
        f"mean ± std over seeds; p: paired t-test against {base} over seeds (same seeds), n/a below 2 seeds.",
        "",
        "| model | runs ok | " + " | ".join(columns) + " | epoch s | test eval s | peak MB | params |",
        "|---|---|" + "---|" * (len(columns) + 4),
    ]
    for m in models:
        rs = by_model[m]
        cells = []
        for c in columns:
            vals = [r.get(f"test_{c}") for r in rs]
            cell = _mean_std(vals)
            if m != base and rs:
                common = sorted({r["seed"] for r in rs} & {r["seed"] for r in by_model[base]})
                a = [next(r[f"test_{c}"] for r in rs if r["seed"] == s) for s in common]
                b = [next(r[f"test_{c}"] for r in by_model[base] if r["seed"] == s) for s in common]
                cell += f" (p {_paired_p(a, b)})"
            cells.append(cell)
        lines.append(
            f"| {m} | {len(rs)}/{sum(1 for r in records if r['model'] == m) or len(rs)} | " + " | ".join(cells)
            + f" | {_mean_std([r['epoch_s'] for r in rs])} | {_mean_std([r['eval_s'] for r in rs])}"
            + f" | {_mean_std([r['peak_mem_mb'] for r in rs])} | {(rs[0]['trainable_params'] if rs else None) or 'n/a'} |"
        )
    if tuning:
        lines += ["", f"Budget-matched: every model was tuned on validation with the same budget ({tuning['budget']}); "
                      "the seeded runs above use each model's chosen values:", ""]
        lines += [f"- {m}: " + (", ".join(f"{k}={v}" for k, v in chosen.items()) or "no trial finished (defaults)")
                  for m, chosen in tuning["chosen"].items()]
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed runs:"] + [f"- {r['model']} seed {r['seed']}: {r['error']}" for r in failed]
    table = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(out, "results.md"), table)
    _plots(by_model, metrics[0], out)
    return table


def _phase_order(records: List[dict], name: str) -> int:
    return next(i for i, r in enumerate(records) if r["model"] == name)


def _plots(by_model: Dict[str, List[dict]], metric: str, out: str) -> None:
    with png_figure(os.path.join(out, "buckets.png"), figsize=(7, 4)) as (_, ax):
        for model, rs in by_model.items():
            buckets = sorted({k.split("/b")[1] for r in rs for k in r if k.startswith(f"test_{metric}/b")})
            if not buckets:
                continue
            means = [statistics.mean(r[f"test_{metric}/b{b}"] for r in rs) for b in buckets]
            ax.plot([int(b) for b in buckets], means, marker="o", label=model)
        ax.set_xlabel("item popularity bucket (training split; 1 = most popular)")
        ax.set_ylabel(f"test {metric}")
        ax.legend()

    with png_figure(os.path.join(out, "valid_curves.png"), figsize=(7, 4)) as (_, ax):
        for model, rs in by_model.items():
            for i, r in enumerate(rs):
                ax.plot(range(1, len(r["valid_curve"]) + 1), r["valid_curve"],
                        color=f"C{list(by_model).index(model)}", alpha=0.8, label=model if i == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation score (valid_metric)")
        ax.legend()


def _run_one(n: int, total: int, spec: dict, out: str, metrics, resume: bool, env: Optional[dict]) -> List[dict]:
    model, seed = spec["model"], spec["seed"]
    stem = _stem(model)
    log = os.path.join(out, "logs", f"{stem}-seed{seed}.log")
    result_file = os.path.join(out, "logs", f"{stem}-seed{seed}.json")
    # RecBole names checkpoints <model>-<second>.pth: parallel runs of one model would collide
    spec = {**spec, "settings": {**spec["settings"],
                                 "checkpoint_dir": os.path.abspath(os.path.join(out, "saved", f"{stem}-seed{seed}"))}}
    if resume and os.path.exists(result_file):
        with open(result_file) as f:
            records = json.load(f)
        print(f"[{n}/{total}] {model} seed={seed}: done earlier ({result_file})", flush=True)
        return records
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "recbole_llmfuse.bench", "--worker", json.dumps(spec), result_file],
                              stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode == 0 and os.path.exists(result_file):
        with open(result_file) as f:
            records = json.load(f)
        record = records[0]
        note = f"ok  {metrics[0]} {record.get('test_' + metrics[0], float('nan')):.4f}  {record['epoch_s']:.1f} s/epoch"
    else:
        with open(log) as f:
            tail = [line.strip() for line in f.read().splitlines() if line.strip()][-1:] or ["no output"]
        records = [{"model": model, "seed": seed, "status": "failed", "error": f"exit {proc.returncode}: {tail[0][:300]}"}]
        note = f"FAILED ({records[0]['error']}); log: {log}"
    print(f"[{n}/{total}] {model} seed={seed}: {note} ({time.perf_counter() - start:.0f} s)", flush=True)
    return records


def prepare_once(models, dataset, config_files, overrides) -> None:
    """Run every model's preparation hooks here, once, before any worker starts (they then find the files
    fresh; the hooks' lock would also serialise them, but one process doing it is simpler to follow)."""
    for model in models:
        name, variant = parse_variant(model)
        try:
            ran = prepare(Config(name, dataset, config_file_list=config_files or None, config_dict=variant, argv=overrides))
        except Exception as err:  # noqa: BLE001 - the model's runs fail the same way and record it
            print(f"preparing {model} failed ({str(err).splitlines()[0][:200]}); its runs will record the error", flush=True)
            continue
        if ran:
            print(f"prepared for {model}: {', '.join(ran)}", flush=True)


def _job_env(jobs: int) -> Optional[dict]:
    """Environment of one of ``jobs`` parallel runs: a fair share of the CPU threads."""
    if jobs == 1:
        return None
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def _flag(key: str, value) -> str:
    """A setting as a ``--key=value`` override (YAML flow for lists and dicts, as users write them)."""
    import yaml

    if isinstance(value, (str, bool, int, float)) or value is None:
        return f"--{key}={value}"
    return f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"


def tune_models(models, dataset, space: str, samples: int, config_files, overrides, out: str, metric: str,
                jobs: int = 1, resume: bool = False, grace_period: int = 1) -> dict:
    """One Tune sweep per model with the same space, trials, scheduler (ASHA) and epoch cap; returns
    ``{"budget": words, "chosen": {model: {key: value}}}``. A model's bracket settings stay fixed in its sweep."""
    keys = list(parse_space(space))
    chosen = {}
    for model in models:
        name, variant = parse_variant(model)
        folder = os.path.join(out, "tune", _stem(model))
        record = os.path.join(folder, "chosen.json")
        if resume and os.path.exists(record):
            with open(record) as f:
                chosen[model] = json.load(f)
            print(f"tuning {model}: done earlier ({record})", flush=True)
            continue
        start = time.perf_counter()
        result = run_tune(name, dataset, space, folder, config_files,
                          overrides + [_flag(k, v) for k, v in variant.items()], num_samples=samples,
                          scheduler="asha", metric=metric, cpus_per_trial=1, max_concurrent=jobs,
                          grace_period=grace_period, num_cpus=jobs)
        best = result["best"]
        if not best:  # no record: --resume sweeps it again instead of reusing a choice nobody made
            chosen[model] = {}
            print(f"tuning {model}: no trial finished ({result['failed']} of {len(result['rows'])} failed; see "
                  f"{folder}/results.md); its seeded runs use its YAML defaults", file=sys.stderr, flush=True)
            continue
        # a key the model's brackets fix is inert in its sweep (command-line overrides win): not "chosen"
        chosen[model] = {k: best[k] for k in keys if k not in variant}
        atomic_write_text(record, json.dumps(chosen[model]))
        print(f"tuning {model}: {len(result['rows'])} trials ({result['failed']} failed, {result['stopped_early']} "
              f"stopped early) in {time.perf_counter() - start:.0f} s; chosen {chosen[model]}", flush=True)
    budget = f"{samples} trials of {os.path.basename(space)} ({', '.join(keys)}), ASHA on validation {metric}"
    atomic_write_text(os.path.join(out, "tune", "budget.txt"), f"{budget} on {dataset}\n")
    return {"budget": budget, "chosen": chosen}


def load_tuned(models, folder: str) -> dict:
    """``{"budget", "chosen"}`` from an earlier bench's ``tune/`` folder (``<model>/chosen.json`` per model; a
    variant ``MoRec[...]`` without its own folder uses ``MoRec/chosen.json``)."""
    chosen = {}
    for model in models:
        path = os.path.join(folder, _stem(model), "chosen.json")
        if not os.path.isfile(path):  # a variant without its own sweep takes its model's values (brackets win)
            path = os.path.join(folder, _stem(parse_variant(model)[0]), "chosen.json")
        if not os.path.isfile(path):
            raise ConfigError(f"--tuned {folder}: no {path}; run a bench with --tune for {model} first")
        with open(path) as f:
            chosen[model] = json.load(f)
    budget_file = os.path.join(folder, "budget.txt")
    budget = "an earlier sweep"
    if os.path.isfile(budget_file):
        with open(budget_file) as f:
            budget = f.read().strip()
    return {"budget": f"values chosen by {budget}, read from {os.path.abspath(folder)}", "chosen": chosen}


def _stem(model: str) -> str:
    """A model label as a file name: ``FAERec[backbone=FMLPRec]`` -> ``FAERec_backbone=FMLPRec_``."""
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in model)


def run_bench(models, dataset, seeds, config_files, overrides, out, metrics, resume: bool = False,
              jobs: int = 1, gpus: Optional[List[str]] = None, tuned: Optional[Dict[str, dict]] = None) -> List[dict]:
    """Runs every (model, seed), ``jobs`` at a time; records come back in run order whatever finishes first.

    With ``jobs > 1`` the runs share the machine, so their epoch times are comparable with each other only
    roughly; measure cost ratios with ``jobs = 1``.
    """
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    prepare_once(models, dataset, config_files, overrides)
    runs = [(m, s) for s in seeds for m in models]  # seed-major: drift on a shared machine hits every model
    specs = [{"model": m, "dataset": dataset, "seed": s, "config_files": config_files, "overrides": overrides,
              "settings": {}, "tuned": (tuned or {}).get(m, {})} for m, s in runs]
    import queue
    from concurrent.futures import ThreadPoolExecutor

    slots: "queue.Queue[int]" = queue.Queue()  # job slot -> its GPU; jobs = 1 runs in order, one at a time
    for slot in range(jobs):
        slots.put(slot)

    def in_slot(n: int, spec: dict) -> List[dict]:
        slot = slots.get()
        try:
            if gpus:  # RecBole sets CUDA_VISIBLE_DEVICES from gpu_id itself
                spec = {**spec, "settings": {**spec["settings"], "gpu_id": gpus[slot % len(gpus)]}}
            return _run_one(n, len(runs), spec, out, metrics, resume, _job_env(jobs))
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(in_slot, range(1, len(runs) + 1), specs))
    records = [r for run_records in results for r in run_records]
    keys = []
    for r in records:
        keys += [k for k in r if k not in keys and k != "valid_curve"]
    write_csv(os.path.join(out, "results.csv"), records, keys, extrasaction="ignore")
    return records


#: the defaults of the flags a --plan file may also set (a flag given on the command line wins over the plan)
FLAG_DEFAULTS = {"dataset": "ml-100k", "models": None, "seeds": "2020", "config_files": None, "out": "bench_out",
                 "report_metrics": "ndcg@10,recall@10", "tune": None, "tune_samples": 8, "tune_metric": None,
                 "tune_grace_period": 2, "baseline": None}
#: what a plan file holds: those flags, and ``settings`` (overrides for every model, below the command line's)
PLAN_KEYS = tuple(FLAG_DEFAULTS) + ("settings",)


def _plan_value(key: str, value, folder: str):
    """A plan value as its flag takes it: lists joined into a string (models with ';', seeds and metrics with ','),
    the paths of ``config_files`` and ``tune`` relative to the plan's folder, the counts ``tune_samples`` and
    ``tune_grace_period`` as ints (argparse's type for them), anything else as a string."""
    if key in ("config_files", "tune"):
        paths = value if isinstance(value, list) else str(value).split()
        return " ".join(os.path.normpath(os.path.join(folder, path)) for path in paths)
    if isinstance(value, list):
        return (";" if key == "models" else ",").join(str(v) for v in value)
    return int(value) if key in ("tune_samples", "tune_grace_period") else str(value)


def apply_plan(args: argparse.Namespace, overrides: List[str]) -> List[str]:
    """Fill the flags not given on the command line from ``--plan FILE`` (see :data:`PLAN_KEYS`), then from
    :data:`FLAG_DEFAULTS`; returns the overrides with the plan's ``settings`` the command line does not set."""
    settings = {}
    if args.plan:
        plan = read_yaml_file(args.plan)
        for key in plan:
            if key not in PLAN_KEYS:
                raise ConfigError(f"{args.plan}: unknown key '{key}'; a bench plan takes {', '.join(PLAN_KEYS)}")
        folder = os.path.dirname(os.path.abspath(args.plan))
        for key, value in plan.items():
            # --tuned DIR on the command line replaces the plan's sweep (values chosen earlier instead)
            if key != "settings" and getattr(args, key) is None and not (key == "tune" and args.tuned):
                setattr(args, key, _plan_value(key, value, folder))
        settings = plan.get("settings") or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{args.plan}: settings must be a mapping of setting: value (got {settings!r})")
    for key, value in FLAG_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.models:
        raise ConfigError("bench: give --models, or a --plan file with models:")
    given = parse_overrides(overrides)
    return [_flag(k, v) for k, v in settings.items() if k not in given] + overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", default=None, metavar="FILE",
                        help="a YAML file with any of the flags below (models, seeds, config_files, tune, ...; paths "
                             "relative to the file) and settings: {key: value} for every model; flags given here win. "
                             "examples/papers/ has one per paper's comparison")
    parser.add_argument("--dataset", "-d", default=None, help="(default: ml-100k)")
    parser.add_argument("--models", default=None,
                        help="semicolon- or comma-separated model names, e.g. SASRec,GRU4Rec,MoRec; a name may carry "
                             "its own settings: 'FAERec[backbone=FMLPRec];FMLPRec' (use ';' between such names)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: 2020)")
    parser.add_argument("--config_files", default=None, help="space-separated YAML files applied to every model")
    parser.add_argument("--out", default=None, help="(default: bench_out)")
    parser.add_argument("--report_metrics", default=None,
                        help="metrics in results.md (first one is plotted; default: ndcg@10,recall@10)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse runs whose result file already exists in --out (an interrupted bench goes on)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (default 1). Above 1, runs share CPUs/GPUs: use 1 for the epoch-time figures")
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU ids shared out to the jobs round-robin (RecBole's gpu_id), e.g. 0,1")
    parser.add_argument("--tune", default=None, metavar="SPACE",
                        help="budget-matched: tune every model first with this search space (tune's YAML format) "
                             "and the same trial budget, then run the seeds with each model's chosen values")
    parser.add_argument("--tuned", default=None, metavar="DIR",
                        help="take each model's chosen values from an earlier budget-matched bench: DIR/<model>/chosen.json "
                             "(DIR = that bench's --out/tune)")
    parser.add_argument("--tune_samples", type=int, default=None, help="trials per model with --tune (default 8)")
    parser.add_argument("--tune_metric", default=None, help="validation metric of --tune (default: first report metric)")
    parser.add_argument("--tune_grace_period", type=int, default=None,
                        help="ASHA: epochs before a trial may be stopped (default 2)")
    parser.add_argument("--baseline", default=None,
                        help="row the paired t-tests compare against (default: the first model), e.g. PAD/pretrain")
    parser.epilog = "Any other --key=value is a RecBole override applied to every model."


def main_from_args(args: argparse.Namespace, overrides: List[str]) -> int:
    overrides = apply_plan(args, overrides)
    sep = ";" if ";" in args.models or "[" in args.models else ","
    models = [m.strip() for m in args.models.split(sep) if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    metrics = [m.lower() for m in args.report_metrics.split(",")]
    config_files = [os.path.abspath(p) for p in args.config_files.split()] if args.config_files else []

    for model in models:  # fail fast, before the first run: a malformed NAME[key=value] or an unknown NAME
        get_model(parse_variant(model)[0])
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: give 1 or more")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    tuning = None
    if args.tune and args.tuned:
        raise ConfigError("give --tune (tune now) or --tuned DIR (values chosen earlier), not both")
    if args.tuned:
        tuning = load_tuned(models, args.tuned)
    if args.tune:
        if args.tune_samples < 1:
            raise ConfigError(f"--tune_samples {args.tune_samples}: give 1 or more")
        os.makedirs(args.out, exist_ok=True)
        prepare_once(models, args.dataset, config_files, overrides)
        tuning = tune_models(models, args.dataset, os.path.abspath(args.tune), args.tune_samples, config_files,
                             overrides, args.out, args.tune_metric or metrics[0], args.jobs, args.resume,
                             args.tune_grace_period)
    records = run_bench(models, args.dataset, seeds, config_files, overrides, args.out, metrics, args.resume,
                        args.jobs, gpus, tuned=tuning["chosen"] if tuning else None)
    print(summarize(records, models, metrics, args.out, args.baseline, tuning))
    failed = [r for r in records if r["status"] != "ok"]
    if failed:  # the table holds the runs that worked; the exit status says not all did
        print(f"{len(failed)} of {len(records)} runs failed (listed above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        # atomic: --resume trusts any result file it finds
        atomic_write_text(sys.argv[3], json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        parser = argparse.ArgumentParser(prog="recbole-llmfuse bench", description=__doc__)
        add_arguments(parser)
        a, rest = parser.parse_known_args()
        sys.exit(main_from_args(a, rest))
