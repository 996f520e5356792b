"""Console commands.

* ``run_recbole`` — RecBole's ``run_recbole.py`` as an installed command, plugin-aware: the same flags
  (``--model/-m``, ``--dataset/-d``, ``--config_files``, ``--nproc``, ``--ip``, ``--port``,
  ``--world_size``, ``--group_offset``) plus RecBole's ``--key=value`` overrides.
* ``recbole-llmfuse`` — the umbrella command: ``run`` (same as ``run_recbole``), ``models``, ``prep``, ``bench``,
  ``analyze``, ``tune``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import recbole_llmfuse
from recbole_llmfuse import bench, tune
from recbole_llmfuse.analysis import isi_report, kendall_report, popularity_report
from recbole_llmfuse.config import Config, ConfigError, parse_overrides, read_yaml_file
from recbole_llmfuse.data import dataset_folder, prepare_folder
from recbole_llmfuse.dataset_prep import amazon, sparsify
from recbole_llmfuse.dataset_prep.hooks import HookConflictError, available_hooks, get_hook, resolve
from recbole_llmfuse.errors import LLMFuseError
from recbole_llmfuse.registry import available_models

ERROR_EXIT = 2


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", type=str, default=None,
                        help="model name (default: `model:` of the config files, else BPR, as RecBole)")
    parser.add_argument("--dataset", "-d", type=str, default=None,
                        help="dataset name (default: `dataset:` of the config files, else ml-100k)")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated YAML config files")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this node; >1 uses DDP")
    parser.add_argument("--ip", type=str, default="localhost", help="DDP master address")
    parser.add_argument("--port", type=str, default="5678", help="DDP master port")
    parser.add_argument("--world_size", type=int, default=-1, help="total DDP processes over all nodes")
    parser.add_argument("--group_offset", type=int, default=0, help="global rank offset of this node")
    parser.add_argument("--allow_unknown_keys", action="store_true",
                        help="let settings known to no YAML through (a model of your own reads them); by default a "
                             "misspelt setting stops the run with the closest known one")
    parser.epilog = (
        "Any other setting is a RecBole override written --key=value, e.g. "
        "--epochs=2 --train_batch_size=512 --MAX_ITEM_LIST_LENGTH=20."
    )


def _from_config_files(paths: List[str]) -> dict:
    """``model``/``dataset`` named in config files (later files win), so ``--config_files best.yaml`` suffices."""
    found = {}
    for path in paths:
        data = read_yaml_file(path)
        found.update({k: data[k] for k in ("model", "dataset") if data.get(k)})
    return found


def _fmt(result: dict) -> str:
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())


def _run(args: argparse.Namespace, overrides: List[str], prog: str) -> int:
    parse_overrides(overrides)  # fail fast, before any data is loaded
    if args.allow_unknown_keys:
        overrides = [*overrides, "--allow_unknown_keys=True"]
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    from_files = _from_config_files(config_file_list or [])
    args.model = args.model or from_files.get("model") or "BPR"
    args.dataset = args.dataset or from_files.get("dataset") or "ml-100k"
    result = recbole_llmfuse.run(
        args.model,
        args.dataset,
        config_file_list=config_file_list,
        nproc=args.nproc,
        world_size=args.world_size,
        ip=args.ip,
        port=args.port,
        group_offset=args.group_offset,
        argv=overrides,
    )
    if result is None:
        return 0
    print(f"best valid ({args.model} on {args.dataset}): {_fmt(result['best_valid_result'] or {})}")
    print(f"test result ({args.model} on {args.dataset}): {_fmt(result['test_result'] or {})}")
    summary = {
        "model": args.model,
        "dataset": args.dataset,
        "best_valid_score": result["best_valid_score"],
        "best_valid_result": dict(result["best_valid_result"] or {}),
        "test_result": dict(result["test_result"] or {}),
        "model_file": result.get("model_file"),
    }
    print("result: " + json.dumps(_strict(summary), allow_nan=False))
    return 0


def _strict(value):
    """``value`` as strict JSON can hold it: numbers as floats, a NaN or infinite one as null."""
    import math

    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def _guarded(fn, prog: str) -> int:
    """Run a command; bad input (any :class:`~recbole_llmfuse.errors.LLMFuseError`) is one line and exit 2."""
    try:
        return fn()
    except LLMFuseError as err:
        if _DEBUG:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return ERROR_EXIT


#: ``--debug`` on any command: our own errors keep their traceback instead of one line
_DEBUG = False


def _take_debug(argv: Optional[List[str]]) -> List[str]:
    global _DEBUG
    argv = list(sys.argv[1:] if argv is None else argv)
    _DEBUG = "--debug" in argv
    return [a for a in argv if a != "--debug"]


def run_recbole_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``run_recbole`` command."""
    parser = argparse.ArgumentParser(prog="run_recbole", description="Train and test a RecBole or plugin model.")
    _add_run_arguments(parser)
    args, overrides = parser.parse_known_args(_take_debug(argv))
    return _guarded(lambda: _run(args, overrides, "run_recbole"), "run_recbole")


def _models(_args) -> int:
    for name, source in available_models().items():
        print(f"{name}\t{source}")
    return 0


def prep_shortcuts() -> dict:
    """``{shortcut: hook class}``: ``recbole-llmfuse prep <shortcut>`` runs the hook whose ``cli`` it is (each
    hook says its own; a package's hooks get theirs the same way)."""
    return {h.cli: h for h in available_hooks().values() if h.cli}


def _add_prep_arguments(prep: argparse.ArgumentParser, shortcuts: dict) -> None:
    """``shortcuts``: :func:`prep_shortcuts` (empty unless the command is ``prep``: it imports every hook)."""
    sub = prep.add_subparsers(dest="prep_command", required=True)
    for name, help_text in ([(cli, h.summary or f"the {h.name} hook") for cli, h in shortcuts.items()]
                            + [("hook", "any hook by name")]):
        p = sub.add_parser(name, help=help_text)
        if name == "hook":
            p.add_argument("hook", help="hook name (recbole_llmfuse.prep_hooks entry points included)")
        else:  # a shortcut runs the hook whose cli it is
            p.set_defaults(hook=shortcuts[name].name)
        p.add_argument("--dataset", "-d", required=True)
        p.add_argument("--data_path", default="dataset/", help="folder that holds <dataset>/ (default: dataset/)")
        p.add_argument("--config_files", default=None, help="YAML files; their '<hook>:' dict gives parameters")
        p.add_argument("--shard", default=None, help="i/N: compute only every N-th shard (merge when all exist)")
        p.add_argument("--force", action="store_true",
                       help="run even if the outputs are fresh or were made with other settings; starts clean")
        p.add_argument("--model", "-m", default="SASRec",
                       help="model whose config (and data split) hooks that read interactions use (default: SASRec)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a run setting that shapes the split the hook reads, e.g. eval_protocol=cold_start_user")
        p.epilog = "Hook parameters as key=value, e.g. backend=hf model=/models/llama pooling=last batch_size=8."
    p = sub.add_parser("amazon", help="Amazon Reviews 2018/2023 JSON -> RecBole atomic files")
    p.add_argument("--name", required=True,
                   help="dataset name: a short name (pantry, scientific, beauty, games, ...) or a category file name")
    p.add_argument("--version", choices=["2018", "2023"], default="2018")
    p.add_argument("--reviews", help="reviews file (.json.gz / .jsonl.gz)")
    p.add_argument("--meta", help="metadata file (meta_*.json.gz / .jsonl.gz)")
    p.add_argument("--download", action="store_true", help="fetch the public files first (needs internet)")
    p.add_argument("--out", default="dataset/", help="writes <out>/<name>/<name>.inter and .item")
    p.add_argument("--recipe", choices=["pad", "faerec", "hdrec", "pte"], default=None,
                   help="a paper's filters in one flag (README 'Amazon recipes'); the flags below override its values")
    p.add_argument("--min_rating", type=float, default=None, help="keep ratings >= this (PAD: 4)")
    p.add_argument("--k_core", type=int, default=None, help="k-core for users and items (default 0: none)")
    p.add_argument("--user_k", type=int, default=None)
    p.add_argument("--item_k", type=int, default=None)
    p.add_argument("--k_core_passes", type=int, default=None,
                   help="k-core passes (default: iterate to a fixed point; 1 = LLM-ESR's single pass)")
    p.add_argument("--last_n", type=int, default=None, help="keep each user's last N interactions (PAD: 23)")
    p.add_argument("--cap_first", action="store_true", default=None, help="apply --last_n before the k-core (HDRec)")
    p.add_argument("--drop_no_title", action="store_true", default=None)
    p.add_argument("--skip_bad_lines", action="store_true", help="skip and count malformed lines instead of stopping")
    p.add_argument("--force", action="store_true", help="replace a dataset already in <out>/<name>/")
    p = sub.add_parser("sparsify", help="a sparse long-tail variant of a dataset (per-user subsampling + min counts)")
    p.add_argument("--dataset", "-d", required=True, help="source dataset (e.g. ml-100k)")
    p.add_argument("--name", required=True, help="name of the variant, written to <data_path>/<name>/")
    p.add_argument("--data_path", default="dataset/", help="folder that holds <dataset>/ (default: dataset/)")
    p.add_argument("--mean_length", type=float, default=8.0, help="target mean interactions per user (Amazon: 8-9)")
    p.add_argument("--min_user", type=int, default=5, help="users keep at least this many; fewer are dropped")
    p.add_argument("--min_item", type=int, default=1, help="items with fewer interactions are dropped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing <name>/ folder")


def _prep(args: argparse.Namespace, rest: List[str]) -> int:
    if args.prep_command == "amazon":
        return _prep_amazon(args, rest)
    if args.prep_command == "sparsify":
        return _prep_sparsify(args, rest)

    name = args.hook
    get_hook(name)  # an unknown name fails before any config is read
    config_files = args.config_files.split() if args.config_files else []
    params = {}
    for path in config_files:
        params.update(read_yaml_file(path).get(name) or {})
    for item in rest:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            raise ConfigError(f"malformed hook parameter '{item}': write key=value (e.g. backend=hf)")
        params[key] = _hook_value(value)
    # the run's config: hooks that read interactions see the training split of exactly this config
    settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"malformed --set '{item}': write KEY=VALUE (e.g. eval_protocol=cold_start_user)")
        settings[key] = _hook_value(value)
    config = Config(args.model, args.dataset, config_file_list=config_files or None,
                    config_dict={**settings, "data_path": os.path.abspath(args.data_path), name: params}, argv=[])

    prepare_folder(config)
    *upstream, hook = resolve(config, [name])
    for dep in upstream:  # what this hook reads: made when missing, never replaced here
        if dep.status() not in ("fresh", "user"):
            print(f"{dep.name} (required by {name}): {dep.produce()}")
    state = hook.status()
    if state == "conflict" and not args.force:
        raise HookConflictError(hook.conflict_message())
    if state in ("fresh", "user") and not args.force:
        what = "fresh" if state == "fresh" else "the user's own (no manifest)"
        print(f"{name}: outputs are {what} ({', '.join(hook.outputs())}); nothing to do (--force to rerun)")
        return 0
    report = hook.produce(force=args.force, shard=args.shard)
    # None: another process made the outputs while this one waited for the lock
    print(f"{name}: {report}" if report is not None else
          f"{name}: made by a concurrent run this one waited for ({', '.join(hook.outputs())}); nothing to do")
    return 0


def _hook_value(text: str):
    """A ``key=value`` hook parameter as users write it: YAML for numbers, booleans, lists and null,
    otherwise the text itself (``item_text_template=Movie {movie_title}`` is a string, not YAML)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, list)) or value is None else text


def _prep_amazon(args: argparse.Namespace, rest: List[str]) -> int:

    if rest:
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    reviews, meta = args.reviews, args.meta
    if args.download:
        reviews, meta = amazon.download(args.name, args.version, os.path.join(args.out, "raw"))
    if not reviews:
        raise ConfigError("give --reviews (and --meta) paths, or --download on a machine with internet access")
    for path in (reviews, meta):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{path} does not exist")
    settings = dict(amazon.RECIPES[args.recipe]["options"]) if args.recipe else {}
    flags = {"min_rating": args.min_rating, "k_core_passes": args.k_core_passes, "last_n": args.last_n,
             "cap_first": args.cap_first, "drop_no_title": args.drop_no_title,
             "user_k": args.user_k if args.user_k is not None else args.k_core,
             "item_k": args.item_k if args.item_k is not None else args.k_core}
    for key, value in flags.items():  # each flag given wins over the recipe
        if value is not None:
            if not isinstance(value, bool) and key != "min_rating" and value < 0:
                raise ConfigError(f"--{key} {value}: give 0 or more")
            settings[key] = value
    options = amazon.AmazonOptions(version=args.version, skip_bad_lines=args.skip_bad_lines, **settings)
    if args.recipe:
        print(f"recipe {args.recipe}: {amazon.RECIPES[args.recipe]['source']}")
    print("filters: " + ", ".join(f"{k}={getattr(options, k)}" for k in (
        "min_rating", "user_k", "item_k", "k_core_passes", "last_n", "cap_first", "drop_no_title")), flush=True)
    report = amazon.convert(args.name, reviews, meta, args.out, options, force=args.force)
    paper = amazon.PAPER_STATS.get((args.recipe, args.name)) if args.recipe else None
    print(report.table(paper, f"{args.recipe.upper()} paper, Table 1" if paper else "paper"))
    if report.bad_lines or report.duplicates or report.items_without_title:
        print(f"skipped malformed lines: {report.bad_lines or 0}; duplicate reviews dropped: {report.duplicates}; "
              f"items without title: {report.items_without_title}")
    model = next((m for m, r in amazon.MODEL_RECIPES.items() if r == args.recipe), "SASRec")
    root = os.path.abspath(os.path.expanduser(args.out))
    print(f"wrote {os.path.join(root, args.name)}; train with: run_recbole --model={model} --dataset={args.name} "
          f"--data_path={root}")
    return 0


def _prep_sparsify(args: argparse.Namespace, rest: List[str]) -> int:

    if rest:
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    options = sparsify.SparsifyOptions(mean_length=args.mean_length, min_user=args.min_user,
                                       min_item=args.min_item, seed=args.seed)
    report = sparsify.sparsify(dataset_folder(args.dataset, args.data_path), args.dataset,
                               os.path.abspath(os.path.expanduser(args.data_path)), args.name, options, args.force)
    print(sparsify.table(report))
    print(f"wrote {report['folder']} (rule and statistics: {args.name}.sparsify.json)")
    return 0


def _add_analyze_arguments(analyze: argparse.ArgumentParser) -> None:
    sub = analyze.add_subparsers(dest="analyze_command", required=True)
    p = sub.add_parser("kendall", help="Kendall tau of behaviour-target distances per popularity bucket (PAD §4.3)")
    p.add_argument("--ref", required=True, help="reference space, CHECKPOINT.pth:TABLE (e.g. saved/FastSASRec-....pth:item)")
    p.add_argument("--cmp", required=True, action="append",
                   help="compared space(s), CHECKPOINT.pth:TABLE; repeat for several curves. Tables: item, llm, "
                        "PAD's id / align_id / align_text / align / text, or a state-dict key")
    p.add_argument("--out", default="analysis_out", help="writes kendall.csv and kendall.png here")
    p.add_argument("--max_pairs", type=int, default=200_000, help="pairs sampled per bucket (fixed seed)")
    p.add_argument("--buckets", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    n = sub.add_parser("popularity", help="how far each model's ranking follows training popularity: rank "
                                          "correlation, top-k share per popularity bucket, item-vector norms")
    n.add_argument("--model", action="append", required=True, metavar="CHECKPOINT.pth[:TABLE]",
                   help="a trained model (its item table for the norms: item by default); repeat for several")
    n.add_argument("--out", default="analysis_out", help="writes popularity.csv and popularity.png here")
    n.add_argument("--buckets", type=int, default=10)
    n.add_argument("--topk", type=int, default=10)
    n.add_argument("--max_users", type=int, default=1000, help="test users scored (the first ones)")
    q = sub.add_parser("isi", help="Information Sufficiency Index between item spaces (PtE Eq. 2, spec PtE §8)")
    q.add_argument("--space", action="append", required=True, metavar="NAME=SOURCE",
                   help="NAME=CHECKPOINT.pth:TABLE (a trained model's item table: item, llm, ...) or NAME=FILE.npz "
                        "(a feature table, e.g. <dataset>.itememb.npz, <dataset>.pteitem.npz); two or more")
    q.add_argument("--out", default="analysis_out", help="writes isi.csv and isi.png here")
    q.add_argument("--seeds", type=int, default=5, help="80/20 splits averaged (spec: 5)")
    q.add_argument("--clusters", type=int, default=256, help="k-means labels of V: min(this, N_train // 20)")


def _analyze(args: argparse.Namespace, rest: List[str]) -> int:
    if rest:
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    if args.analyze_command == "isi":
        rows = isi_report(args.space, args.out, seeds=range(args.seeds), clusters=args.clusters)
        print("source\ttarget\tfamily\tisi\tstd")
        for r in rows:
            print(f"{r['source']}\t{r['target']}\t{r['family']}\t{r['isi']:.4f}\t{r['std']:.4f}")
        print(f"wrote {os.path.join(args.out, 'isi.csv')} and isi.png ({rows[0]['items']} items)")
        return 0
    if args.analyze_command == "popularity":
        rows = popularity_report(args.model, args.out, args.buckets, args.topk, args.max_users)
        print("checkpoint\tscore_rho\tnorm_rho\ttop-k share in b01")
        for r in rows:
            if r["group"] == "overall":
                b01 = next(x for x in rows if x["checkpoint"] == r["checkpoint"] and x["group"] == "b01")
                print(f"{r['checkpoint']}\t{r['score_rho']:.3f}\t{r['norm_rho']:.3f}\t{b01['topk_share']:.3f}")
        print(f"wrote {os.path.join(args.out, 'popularity.csv')} and popularity.png")
        return 0
    rows = kendall_report(args.ref, args.cmp, args.out, args.max_pairs, args.seed, args.buckets)
    print("comparison\tgroup\ttau\tpairs")
    for r in rows:
        print(f"{r['comparison']}\t{r['group']}\t{r['tau']:.4f}\t{r['pairs']}")
    print(f"wrote {os.path.join(args.out, 'kendall.csv')} and kendall.png")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``recbole-llmfuse`` command."""
    parser = argparse.ArgumentParser(prog="recbole-llmfuse", description="LLM-fusion models for RecBole.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="train and test a model (same as run_recbole)")
    _add_run_arguments(run_parser)
    sub.add_parser("models", help="list every model usable by name, with the package that provides it")
    argv = _take_debug(argv)
    _add_prep_arguments(sub.add_parser("prep", help="run a dataset-preparation hook (e.g. item text embeddings)"),
                        prep_shortcuts() if argv[:1] == ["prep"] else {})

    bench.add_arguments(sub.add_parser("bench", help="several models x seeds under one protocol: tables and plots"))
    _add_analyze_arguments(sub.add_parser("analyze", help="diagnostics of trained models (Kendall-tau alignment, ISI)"))

    tune.add_arguments(sub.add_parser("tune", help="Ray Tune sweep, reported every epoch (ASHA), any model"))
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _guarded(lambda: bench.main_from_args(args, rest), "recbole-llmfuse bench")
    if args.command == "run":
        return _guarded(lambda: _run(args, rest, "recbole-llmfuse run"), "recbole-llmfuse run")
    if args.command == "prep":
        return _guarded(lambda: _prep(args, rest), "recbole-llmfuse prep")
    if args.command == "tune":
        return _guarded(lambda: tune.main_from_args(args, rest), "recbole-llmfuse tune")
    if args.command == "analyze":
        return _guarded(lambda: _analyze(args, rest), "recbole-llmfuse analyze")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _models(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
