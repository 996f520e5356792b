"""A plugin-aware RecBole ``Config``.

Differences from ``recbole.config.Config`` (everything else is RecBole's own code path):

* model names resolve through :mod:`recbole_llmfuse.registry` (plugins, then RecBole);
* a plugin model's ``properties/model/<Name>.yaml`` is layered exactly where RecBole layers its own
  model YAMLs: after ``overall.yaml``, before the dataset YAMLs and the model-type quick-start YAML;
* command-line overrides come from ``argv`` when given (our CLI passes its left-over arguments; pass
  ``argv=[]`` from Python to ignore ``sys.argv``), else from ``sys.argv`` as RecBole does. Malformed
  overrides and values of the wrong type raise :class:`ConfigError`;
* ``data_path`` is absolute (Ray trials and DDP workers change the working directory), and
  ``ml-100k`` resolves to a writable copy under ``data_path`` instead of RecBole's package folder
  (see :func:`recbole_llmfuse.data.create_dataset`, which makes the copy).
"""
from __future__ import annotations

import functools
import importlib
import os
import re
from typing import List, Optional

import yaml
from recbole.config import Config as RecBoleConfig
from recbole.utils import InputType, ModelType

from recbole_llmfuse import registry
from recbole_llmfuse.atomic import header_names
from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.files import writable_dir


#: recbole_llmfuse's own defaults (trainer, group metrics, feature tables, hooks), layered for every model.
def _recbole_lowercase_model_yaml(model: str):
    """RecBole ships ``lightgbm.yaml`` / ``xgboost.yaml`` for its ``LightGBM`` / ``XGBoost`` classes and looks for
    ``<class name>.yaml``, so on a case-sensitive file system their defaults (``lgb_params``, ``xgb_params``)
    never load and training fails on ``None``: such a file is layered in the model-YAML slot."""
    import recbole

    folder = os.path.join(os.path.dirname(recbole.__file__), "properties", "model")
    lower = os.path.join(folder, f"{model.lower()}.yaml")
    return lower if not os.path.isfile(os.path.join(folder, f"{model}.yaml")) and os.path.isfile(lower) else None


PLUGIN_OVERALL_YAML = os.path.join(os.path.dirname(importlib.import_module("recbole_llmfuse.properties").__file__),
                                   "overall.yaml")

_OVERRIDE = re.compile(r"^--([A-Za-z_][\w.\-]*)=(.*)$", re.S)


def read_yaml_file(path: str) -> dict:
    """A YAML settings file as a dict. A missing file, a syntax error (file, line, column, problem) or a file
    that is not ``key: value`` lines raise :class:`ConfigError` in one line."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: YAML syntax error ({getattr(err, 'problem', None) or err}); fix the line "
                          f"(a value holding ': ' or starting with '[' or '{{' needs quotes)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config file as UTF-8") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file holds settings as 'key: value' lines, not a "
                          f"{type(data).__name__}")
    return data or {}


def parse_overrides(args: List[str]) -> dict:
    """``["--epochs=2", "--lr=1e-3"]`` -> ``{"epochs": "2", "lr": "1e-3"}`` (values still strings).

    Raises :class:`ConfigError` for anything that is not ``--key=value``.
    """
    out = {}
    for arg in args:
        match = _OVERRIDE.match(arg)
        if match is None:
            raise ConfigError(
                f"malformed override '{arg}': overrides are written --key=value "
                f"(e.g. --epochs=2 --train_batch_size=512), with no space around '='."
            )
        key, value = match.groups()
        if key in out and out[key] != value:
            raise ConfigError(f"override '--{key}' given twice with different values ({out[key]!r}, {value!r}).")
        out[key] = value
    return out


class Config(RecBoleConfig):
    """RecBole's ``Config`` with plugin model lookup (see module docstring)."""

    def __init__(
        self,
        model=None,
        dataset=None,
        config_file_list=None,
        config_dict=None,
        argv: Optional[List[str]] = None,
    ):
        self._argv = argv
        self._plugin_model_yaml = None
        super().__init__(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
        self._check_override_types()
        self._check_known_keys(config_file_list)
        self._check_ranges()

    # -- config files -------------------------------------------------------------------------------
    def _load_config_files(self, file_list):
        """RecBole's, with a missing file or a YAML syntax error said in one line (file, line, problem)."""
        for path in file_list or []:
            if not os.path.isfile(path):
                raise ConfigError(f"config file {path} does not exist")
        for path in file_list or []:
            read_yaml_file(path)  # a syntax error or a file that is not a mapping: one line
        return super()._load_config_files(file_list)

    # -- command line -------------------------------------------------------------------------------
    def _load_cmd_line(self):
        if self._argv is None:
            return super()._load_cmd_line()
        return self._convert_config_dict(parse_overrides(self._argv))

    def _convert_config_dict(self, config_dict):
        """RecBole's conversion (Python literals), then YAML for the flow mappings and lists users write on a
        command line like in a config file: ``--item_tokens={item_text_fields: [title, brand]}``."""
        config_dict = super()._convert_config_dict(config_dict)
        for key, value in config_dict.items():
            if isinstance(value, str) and value.strip()[:1] in ("{", "["):
                try:
                    parsed = yaml.safe_load(value)
                except yaml.YAMLError:
                    continue
                if isinstance(parsed, (dict, list)):
                    config_dict[key] = parsed
        return config_dict

    def _check_override_types(self):
        """A numeric/bool default overridden by a string that did not parse is a typo: say so."""
        for key, value in self.cmd_config_dict.items():
            default = self.internal_config_dict.get(key)
            if default is None or not isinstance(value, str):
                continue
            if isinstance(default, bool):
                expected = "true or false"
            elif isinstance(default, (int, float)):
                expected = "a number"
            else:
                continue
            raise ConfigError(
                f"override --{key}={value}: expected {expected} (the default is {default!r})."
            )

    def _check_known_keys(self, config_file_list) -> None:
        """A setting no one reads is almost always a typo (``--learnin_rate=0.01`` would train at the default
        rate without a word): unknown keys stop the run, with the closest known one. Known: :func:`known_keys`
        and the model's own YAML layers; ``allow_unknown_keys: true`` (``run --allow_unknown_keys``) lets a
        user's own model read settings declared nowhere."""
        import difflib

        if self.final_config_dict.get("allow_unknown_keys"):
            return
        # the hooks registered now (tests and notebooks register their own) and the keys of the model's tables
        tables = getattr(self.model_class, "feature_tables", ()) or ()
        known = (known_keys() | set(self.internal_config_dict) | set(registry.hook_names())
                 | {f"{t.options}_{s}" for t in tables for s in ("format", "dim", "missing", "hook")})
        for where, keys in (("command line", self.cmd_config_dict), ("config_dict", self.variable_config_dict),
                            (" ".join(config_file_list or []) or "config file", self.file_config_dict)):
            for key in keys:
                if key in known:
                    continue
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ConfigError(f"unknown setting '{key}' ({where}); {hint}A setting your own model reads: "
                                  f"pass --allow_unknown_keys (allow_unknown_keys: true)")

    #: settings that must be whole numbers >= 1 (checked before any data loads)
    POSITIVE_INTS = ("epochs", "train_batch_size", "eval_batch_size", "eval_step", "MAX_ITEM_LIST_LENGTH",
                     "grad_accum_steps", "hidden_size", "embedding_size", "n_layers", "n_heads", "inner_size",
                     "dreamrec_steps", "dreamrec_sample_stride")

    def _check_ranges(self) -> None:
        final = self.final_config_dict
        for key in self.POSITIVE_INTS:
            value = final.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{key} {value!r}: must be a whole number >= 1 (e.g. --{key}="
                                  f"{self.internal_config_dict.get(key) or 1})")
        rate = final.get("learning_rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
            raise ConfigError(f"learning_rate {rate!r}: must be a number > 0 (e.g. --learning_rate=0.001)")
        topk = final.get("topk")
        cutoffs = topk if isinstance(topk, list) else [topk] if topk is not None else []
        for k in cutoffs:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"topk {topk!r}: cut-offs are whole numbers >= 1 (e.g. --topk=[10,20])")
        # RecBole computes metric@k for the k in topk only: another k ends the first validation in a bare KeyError
        valid = re.match(r"^([A-Za-z_]+)@(\d+)", str(final.get("valid_metric") or ""))
        metrics = final.get("metrics")
        if valid and int(valid.group(2)) not in cutoffs:
            raise ConfigError(f"valid_metric {final['valid_metric']}: @{valid.group(2)} is not among topk {topk}; add it "
                              f"(e.g. --topk=[{','.join(str(k) for k in sorted({*cutoffs, int(valid.group(2))}))}]) or "
                              f"validate at one of {cutoffs}")
        if valid and isinstance(metrics, list) and valid.group(1).lower() not in [str(m).lower() for m in metrics]:
            raise ConfigError(f"valid_metric {final['valid_metric']}: {valid.group(1)} is not among metrics {metrics}; "
                              f"add it to metrics or validate on one of them")

    # -- model lookup -------------------------------------------------------------------------------
    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise ConfigError("no model given: pass --model=NAME (or model: NAME in a config file).")
        model_class = registry.get_model(model)
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise ConfigError("no dataset given: pass --dataset=NAME (or dataset: NAME in a config file).")
        return model_class.__name__ if not isinstance(model, str) else model, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        self._plugin_model_yaml = registry.model_config_file(model_class) or _recbole_lowercase_model_yaml(model)
        super()._load_internal_config_dict(model, model_class, dataset)

    def _update_internal_config_dict(self, file):
        config_dict = super()._update_internal_config_dict(file)
        # RecBole loads overall.yaml, then properties/model/<model>.yaml: ours go in that slot, the
        # plugin-wide defaults first (for every model), then a plugin model's own YAML.
        if os.path.basename(file) == "overall.yaml" and file != PLUGIN_OVERALL_YAML:
            super()._update_internal_config_dict(PLUGIN_OVERALL_YAML)
            if self._plugin_model_yaml:
                plugin_yaml, self._plugin_model_yaml = self._plugin_model_yaml, None
                super()._update_internal_config_dict(plugin_yaml)
        return config_dict

    def _get_final_config_dict(self):
        final = super()._get_final_config_dict()
        # RecBole's overall.yaml samples one negative per positive, and a sequential model with
        # loss_type CE then stops with "train_neg_sample_args should be None when the loss_type is CE"
        # unless every user repeats `train_neg_sample_args: ~`. Only a default is changed here: a value
        # the user set still meets RecBole's check.
        if (
            final.get("loss_type") in ("CE", "InfoNCE")  # InfoNCE draws its negatives inside the loss
            and final.get("MODEL_TYPE") == ModelType.SEQUENTIAL
            and "train_neg_sample_args" not in self.external_config_dict
        ):
            final["train_neg_sample_args"] = None
        return final

    # -- devices ------------------------------------------------------------------------------------
    def _init_device(self):
        """RecBole's, except that a DDP rank (``local_rank`` set by ``run --nproc N``) without CUDA, or with
        ``ddp_backend: gloo``, joins a gloo process group on the CPU: RecBole 1.2.1 always initialises NCCL,
        so DDP could not run on a CPU machine at all."""
        import torch

        final = self.final_config_dict
        backend = final.get("ddp_backend") or ("nccl" if torch.cuda.is_available() else "gloo")
        if "local_rank" not in final or backend != "gloo":
            return super()._init_device()
        final["gpu_id"] = str(final["gpu_id"]) if not isinstance(final["gpu_id"], tuple) else ",".join(map(str, final["gpu_id"]))
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                backend="gloo", rank=final["local_rank"] + final["offset"], world_size=final["world_size"],
                init_method=f"tcp://{final['ip']}:{final['port']}")
        final["device"] = torch.device("cpu")
        final["single_spec"] = False

    # -- paths --------------------------------------------------------------------------------------
    def _set_default_parameters(self):
        super()._set_default_parameters()
        if self.final_config_dict.get("loss_type") == "BCE" and "MODEL_INPUT_TYPE" not in self.final_config_dict:
            # RecBole derives the input type from CE/BPR only; BCE trains on sampled negatives like BPR.
            self.final_config_dict["MODEL_INPUT_TYPE"] = InputType.PAIRWISE
        if self.dataset == "ml-100k":
            root = self.external_config_dict.get("data_path") or self.internal_config_dict.get("data_path", "dataset/")
            self.final_config_dict["data_path"] = os.path.join(root, self.dataset)
        self.final_config_dict["data_path"] = os.path.abspath(os.path.expanduser(self.final_config_dict["data_path"]))
        self._load_time_column()
        final = self.final_config_dict
        final["output_dir"] = output_dir(final.get("output_dir"))
        if final.get("checkpoint_dir"):
            final["checkpoint_dir"] = writable_dir(
                os.path.join(final["output_dir"], os.path.expanduser(final["checkpoint_dir"])), "checkpoint_dir")

    def _load_time_column(self) -> None:
        """Sequential models order each user's interactions by time, but RecBole's default ``load_col`` reads
        only user and item ids, so any dataset without its own dataset YAML stopped with "[timestamp] is not
        exist in interaction". When the user did not set ``load_col`` and the ``.inter`` header has the time
        column, it is loaded too."""
        final = self.final_config_dict
        load_col, time_field = final.get("load_col"), final.get("TIME_FIELD")
        if (final.get("MODEL_TYPE") != ModelType.SEQUENTIAL or "load_col" in self.external_config_dict
                or not isinstance(load_col, dict) or not time_field or time_field in (load_col.get("inter") or [])):
            return
        path = os.path.join(final["data_path"], f"{self.dataset}.inter")
        try:
            names = header_names(path)
        except OSError:
            return  # a missing dataset is reported by the dataset check, with its own message
        if time_field in names:
            final["load_col"] = {**load_col, "inter": list(load_col.get("inter") or []) + [time_field]}


#: ``config["key"]`` / ``config.get("key")`` reads in source code: keys RecBole's (or our) code reads without
#: declaring them in a YAML (``enable_amp``, ``wandb_project``, ...)
_READ_KEY = re.compile(r"""(?:config|final|cfg)(?:\[|\.get\()\s*["']([A-Za-z_][\w\-]*)["']""")


def _keys_under(folder: str) -> set:
    """Top-level keys of the YAML files and keys read in the ``.py`` files below ``folder``."""
    import yaml

    out = set()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".yaml"):
                with open(path, encoding="utf-8") as f:
                    data = yaml.safe_load(f)
                out.update(map(str, data) if isinstance(data, dict) else ())
            elif name.endswith(".py"):
                with open(path, encoding="utf-8") as f:
                    out.update(_READ_KEY.findall(f.read()))
    return out


@functools.lru_cache(maxsize=1)
def known_keys() -> frozenset:
    """Every setting RecBole or this plugin knows: RecBole's argument lists, its YAMLs (overall, every model,
    datasets, quick start) and the keys its code reads; ours likewise (hook names included: their files are
    ``properties/hooks/<hook>.yaml``; every registered hook is added per run); the run command's own flags. Read
    from the files once per process, without importing anything."""
    import recbole
    from recbole.utils import argument_list

    keys = {k for name in dir(argument_list) if name.endswith("_arguments") for k in getattr(argument_list, name)}
    props = os.path.dirname(PLUGIN_OVERALL_YAML)
    for folder in (os.path.dirname(recbole.__file__), props, os.path.dirname(os.path.abspath(__file__)),
                   importlib.import_module("recbole_llmfuse.dataset_prep").__path__[0]):
        keys |= _keys_under(folder)
    keys |= {os.path.splitext(n)[0] for n in os.listdir(os.path.join(props, "hooks")) if n.endswith(".yaml")}
    keys |= {"model", "dataset", "config_files", "nproc", "ip", "port", "world_size", "offset", "local_rank",
             "allow_unknown_keys"}
    return frozenset(keys)


def output_dir(wanted: Optional[str] = None) -> str:
    """The absolute folder for RecBole's ``log/``, ``log_tensorboard/`` and a relative ``checkpoint_dir``:
    ``wanted``, else the working folder, else (read-only working folder) ``~/.cache/recbole_llmfuse``, said
    once in a warning."""
    if wanted:
        return writable_dir(os.path.abspath(os.path.expanduser(wanted)), "output_dir")
    if os.access(os.getcwd(), os.W_OK):
        return os.getcwd()
    path = os.path.join(os.path.expanduser("~"), ".cache", "recbole_llmfuse")
    os.makedirs(path, exist_ok=True)
    _warn_once(f"the working folder {os.getcwd()} is read-only; logs and checkpoints go to {path} (set output_dir)")
    return path


_WARNED: set = set()


def _warn_once(message: str) -> None:
    from logging import getLogger

    if message not in _WARNED:
        _WARNED.add(message)
        getLogger().warning(message)


__all__ = ["Config", "ConfigError", "known_keys", "output_dir", "parse_overrides", "read_yaml_file"]
