"""Find models (and their default YAMLs) and prep hooks by name: one entry-point scan, cached per process.

Lookup order for a model name (the RecBole-GNN pattern: extend RecBole's lookup, then fall back to it):

0. models registered in this process with :func:`register_model` (a notebook's, a docs example's);
1. the ``recbole_llmfuse.models`` entry-point group — this package's models and those of any other
   installed package that declares ``Name = module:Class`` in that group;
2. RecBole's built-in models (``SASRec``, ``GRU4Rec``, ``BERT4Rec``, ...).

An unknown name raises :class:`ModelNotFoundError`, which lists every available name. Prep hooks are found
the same way in the ``recbole_llmfuse.prep_hooks`` group (after those registered in the process). The
trainer of a model is found by :func:`recbole_llmfuse.trainer.get_trainer`. This module imports nothing of
the package but its errors: every layer may look a name up.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
from importlib import metadata
from typing import Dict, List, Optional, Type

from recbole_llmfuse.errors import ModelNotFoundError, PrepError

ENTRY_POINT_GROUP = "recbole_llmfuse.models"
HOOK_ENTRY_POINT_GROUP = "recbole_llmfuse.prep_hooks"

#: RecBole's model sub-packages. ``exlib_recommender`` (LightGBM/XGBoost) is only searched when its
#: libraries are installed: RecBole's own ``get_model`` answers an unknown name with
#: ``No module named 'lightgbm'`` because it imports that sub-package unconditionally.
_RECBOLE_SUBPACKAGES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
    "exlib_recommender",
)


#: RecBole models that import an optional package (at import or in the middle of training):
#: model -> (module, pip name, in the ``recbole-models`` extra)
OPTIONAL_PACKAGES = {
    "LightGBM": ("lightgbm", "lightgbm", True),
    "XGBoost": ("xgboost", "xgboost", True),
    "NCL": ("faiss", "faiss-cpu", True),
    "KGIN": ("torch_scatter", "torch-scatter", False),
    "MCCLK": ("torch_scatter", "torch-scatter", False),
    "KGAT": ("dgl", "dgl", False),
}


def _check_optional_package(name: str) -> None:
    """One clear line instead of RecBole's bare ImportError (at import, or epochs into training)."""
    if name not in OPTIONAL_PACKAGES:
        return
    module, pip_name, in_extra = OPTIONAL_PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        # the package alone: `pip install 'recbole-llmfuse[recbole-models]'` would re-resolve recbole's
        # ray<=2.6.3 and downgrade the Ray the documented install gives
        how = (f"pip install {pip_name} (all of them: the recbole-models extra, README Install)" if in_extra else
               f"pip install {pip_name} (no wheel matches torch {_torch_version()}: it builds from source)")
        raise ModelNotFoundError(f"RecBole's model '{name}' needs the package {pip_name}, which is not installed: {how}")


def _torch_version() -> str:
    import torch

    return torch.__version__


@functools.lru_cache(maxsize=None)
def entry_points(group: str) -> Dict[str, "metadata.EntryPoint"]:
    """``{name: entry point}`` of an entry-point group over every installed distribution (first wins on a
    clash), scanned once per process and group: models (``recbole_llmfuse.models``) and prep hooks
    (``recbole_llmfuse.prep_hooks``) are found the same way."""
    found: Dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=group):
        found.setdefault(ep.name, ep)
    return found


#: classes registered in this process (notebooks, tests, the docs' examples) by entry-point group, found before
#: the entry points; packages register theirs in the groups themselves, as this one does (setup.cfg)
REGISTERED: Dict[str, Dict[str, type]] = {ENTRY_POINT_GROUP: {}, HOOK_ENTRY_POINT_GROUP: {}}
REGISTERED_MODELS, REGISTERED_HOOKS = REGISTERED[ENTRY_POINT_GROUP], REGISTERED[HOOK_ENTRY_POINT_GROUP]


def register_model(cls: type) -> type:
    """Make a model class findable by its class name in this process (usable as a class decorator)."""
    REGISTERED_MODELS[cls.__name__] = cls
    return cls


def register_hook(cls: type) -> type:
    """Make a prep hook class findable by its ``name`` in this process (usable as a class decorator)."""
    REGISTERED_HOOKS[cls.name] = cls
    return cls


def plugin_entry_points() -> Dict[str, "metadata.EntryPoint"]:
    """``{name: entry point}`` of every installed plugin model."""
    return entry_points(ENTRY_POINT_GROUP)


@functools.lru_cache(maxsize=None)
def recbole_model_names() -> Dict[str, str]:
    """``{name: module}`` of RecBole's built-in models, read from its package layout (no heavy imports)."""
    import recbole.model as recbole_model

    names: Dict[str, str] = {}
    root = os.path.dirname(recbole_model.__file__)
    for sub in _RECBOLE_SUBPACKAGES:
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            continue
        for fname in sorted(os.listdir(folder)):
            if fname.endswith(".py") and not fname.startswith("_"):
                names[fname[:-3]] = f"recbole.model.{sub}.{fname[:-3]}"
    return names  # keys are lower-case module names; classes are resolved on demand


def refresh() -> None:
    """Forget cached lookups (after installing a package or changing ``sys.path`` at run time)."""
    entry_points.cache_clear()
    recbole_model_names.cache_clear()
    importlib.invalidate_caches()


def _recbole_class(name: str) -> Optional[type]:
    module_name = recbole_model_names().get(name.lower())
    if module_name is None:
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # e.g. exlib models without lightgbm/xgboost installed
        return None
    return getattr(module, name, None)


def available_models() -> Dict[str, str]:
    """``{name: source}`` for every model usable by name; source is a distribution or ``recbole``."""
    out: Dict[str, str] = {}
    from recbole.model.abstract_recommender import AbstractRecommender

    for module_name in sorted(set(recbole_model_names().values())):
        if ".exlib_recommender." in module_name:
            continue  # needs optional libraries; still found by get_model when they are installed
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, AbstractRecommender)
                and obj.__module__ == module_name
                and attr.lower() == module_name.rsplit(".", 1)[-1]
            ):
                out[attr] = "recbole"
    for name, ep in plugin_entry_points().items():
        dist = getattr(ep, "dist", None)
        out[name] = dist.metadata["Name"] if dist is not None else ep.value
    out.update({name: cls.__module__ for name, cls in REGISTERED_MODELS.items()})
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def get_model(name: str) -> Type:
    """The model class registered under ``name`` (plugins first, then RecBole)."""
    if not isinstance(name, str):
        return name
    if name in REGISTERED_MODELS:
        return REGISTERED_MODELS[name]
    ep = plugin_entry_points().get(name)
    if ep is not None:
        return ep.load()
    _check_optional_package(name)
    cls = _recbole_class(name)
    if cls is not None:
        return cls
    names = ", ".join(available_models())
    raise ModelNotFoundError(
        f"unknown model '{name}'. Available models: {names}. Names are case-sensitive; a model of "
        f"another package is found once that package is installed and declares it in the "
        f"'{ENTRY_POINT_GROUP}' entry-point group."
    )


def model_config_file(model_class: type) -> Optional[str]:
    """The default YAML of a plugin model: ``<top package>.properties`` / ``model/<Name>.yaml``, if present.

    A class may also name its file explicitly with a ``config_file`` attribute (absolute path).
    RecBole's own models return ``None``: RecBole's ``Config`` loads theirs.
    """
    explicit = getattr(model_class, "config_file", None)
    if explicit:
        return explicit
    module = model_class.__module__
    if module.startswith("recbole."):
        return None
    top = module.split(".")[0]
    folders = []
    try:  # a `properties` sub-package (ours is mapped there from the repository's top-level properties/)
        folders += list(importlib.import_module(f"{top}.properties").__path__)
    except ImportError:
        pass
    top_module = importlib.import_module(top)
    folders += [os.path.join(p, "properties") for p in getattr(top_module, "__path__", [])]
    for folder in folders:
        candidate = os.path.join(folder, "model", f"{model_class.__name__}.yaml")
        if os.path.isfile(candidate):
            return candidate
    return None


def hook_names() -> List[str]:
    """Every prep hook name, without importing any hook module."""
    return sorted({*REGISTERED_HOOKS, *entry_points(HOOK_ENTRY_POINT_GROUP)})


def get_hook(name: str) -> type:
    """The prep hook class registered under ``name`` (this process's registrations, then the entry points)."""
    if name in REGISTERED_HOOKS:
        return REGISTERED_HOOKS[name]
    found = entry_points(HOOK_ENTRY_POINT_GROUP).get(name)
    if found is None:
        raise PrepError(f"unknown prep hook '{name}'; available: {hook_names()}")
    return found.load()


def available_hooks() -> Dict[str, type]:
    """``{name: hook class}``: hooks registered in this process, then every ``recbole_llmfuse.prep_hooks``
    entry point (ours included: a hook is found like a model, by name)."""
    return {name: get_hook(name) for name in hook_names()}
