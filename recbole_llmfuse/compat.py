"""Shims that let RecBole 1.2.1 run on today's stack (numpy 2, torch >= 2.6, ray 2.6.3).

pandas 3 is *pinned out* (``pandas<3`` in setup.cfg) rather than shimmed: besides copy-on-write making
RecBole's ``df[col].fillna(..., inplace=True)`` a no-op (3 call sites), pandas 3 changed
``Series.agg(len)`` / ``Series.agg(np.concatenate)`` to act on the whole Series instead of on each
element, which RecBole uses at 11 call sites (id remapping of every ``token_seq`` column, normalisation,
discretisation, KG and benchmark-file loading). Measured on pandas 3.1.1: any dataset that loads a
``token_seq`` column (e.g. ml-100k's titles and genres) fails in ``_remap``. A shim would re-implement six
RecBole methods.

Applied once, on ``import recbole_llmfuse``, before anything else imports RecBole. Every shim is small,
scoped to RecBole's own modules, and a no-op where the installed version does not need it. Each one
names the upstream problem it answers.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import types

_APPLIED = False


def _numpy_aliases() -> None:
    """numpy 2 removed ``np.float_``, ``np.complex_``, ``np.unicode_`` and ``np.bool8``.

    RecBole's ``Config.compatibility_settings`` reads ``np.float_``/``np.complex_``/``np.unicode_``
    (RUCAIBox/RecBole PR #2203 "Fix numpy 2 compat"; not in a release), and ray 2.6.3's
    ``tune/logger/tensorboardx.py`` reads ``np.bool8`` (RUCAIBox/RecBole PR #2155). RecBole's metrics
    and layers then use the old ``np.float``/``np.int``/``np.bool``/``np.long`` aliases that its ``compatibility_settings``
    sets; we set them here too so code that runs before any ``Config`` exists also works.
    """
    import numpy as np

    aliases = {
        "float_": "float64",
        "complex_": "complex128",
        "unicode_": "str_",
        "bool8": "bool_",
        "float": "float64",
        "int": "int_",
        "bool": "bool_",
        "long": "int_",
        "complex": "complex128",
        "object": "object_",
        "str": "str_",
        "unicode": "str_",
    }
    for old, new in aliases.items():
        if old not in vars(np):  # not getattr: numpy 2 warns on the expired names before raising
            setattr(np, old, getattr(np, new))


class _Proxy(types.ModuleType):
    """A module as seen by some RecBole modules: the original, with a few names replaced."""

    def __init__(self, module, **overrides):
        super().__init__(module.__name__)
        self._module = module
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._module, name)


def trusted_torch_load(path, map_location=None):
    """Load a checkpoint written by RecBole or by this package (it contains a pickled ``Config``)."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=False)


# -- patches, each applied to one RecBole module right after it is imported ----------------------------------
def _torch_checkpoint_loading(module) -> None:
    """``torch`` as seen by RecBole's trainer, quick start and S3Rec: ``load`` defaults to ``weights_only=False``.

    torch 2.6 made ``weights_only=True`` the default of ``torch.load``. RecBole's checkpoints pickle the
    whole ``Config``, so the best-model reload in ``Trainer.evaluate`` and ``resume_checkpoint`` fail with
    ``UnpicklingError: Weights only load failed`` (RUCAIBox/RecBole PR #2155, issue #2212). The files
    are the ones the same run just wrote, so loading them fully is safe; the global default of torch is left alone (no
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable).
    """
    import torch

    if getattr(module, "torch", None) is torch:
        module.torch = _Proxy(torch, load=lambda *args, **kwargs: torch.load(*args, **{"weights_only": False, **kwargs}))


#: RecBole 1.2.1 modules that fill a ``scipy.sparse.dok_matrix`` with ``A._update(dict)`` (graph models)
DOK_UPDATE_MODULES = tuple(f"recbole.model.general_recommender.{m}" for m in ("lightgcn", "ngcf", "gcmc", "spectralcf", "ncl")) + \
    tuple(f"recbole.model.knowledge_aware_recommender.{m}" for m in ("kgin", "mcclk"))
#: RecBole 1.2.1 modules that build sparse tensors with the deprecated ``torch.sparse.FloatTensor``
SPARSE_TENSOR_MODULES = DOK_UPDATE_MODULES + tuple(
    f"recbole.model.general_recommender.{m}" for m in ("sgl", "dmf", "dgcf")) + (
    "recbole.model.layers", "recbole.model.knowledge_aware_recommender.kgat")


def _sparse_tensors(module) -> None:
    """``torch.sparse.FloatTensor(indices, values[, size])`` warns since torch 2.x; RecBole's graph models and
    layers get a ``torch.sparse.FloatTensor`` that is ``torch.sparse_coo_tensor``. Upstream: RUCAIBox/RecBole
    issue #2007 / PR #2021 (not in a release)."""
    import torch

    if getattr(module, "torch", None) is torch:
        sparse = _Proxy(torch.sparse, FloatTensor=lambda *args, **kw: torch.sparse_coo_tensor(
            *args, **{"check_invariants": False, **kw}))
        module.torch = _Proxy(torch, sparse=sparse)


def _dok_update(module) -> None:
    """RecBole's graph models (LightGCN, NGCF, GCMC, SpectralCF, NCL, KGIN, MCCLK) fill their adjacency with
    ``dok_matrix._update(dict)``, removed in scipy 1.13 (``AttributeError``); their ``scipy.sparse`` gets a
    ``dok_matrix`` with ``_update`` (an unchecked bulk insert into the matrix's ``_dict``, what the old
    ``dict.update`` did)."""
    import scipy.sparse as sp

    dok = sp.dok_matrix
    if hasattr(dok, "_update") or not isinstance(getattr(dok((1, 1)), "_dict", None), dict):
        return
    if getattr(module, "sp", None) is sp:
        dok = type("dok_matrix", (sp.dok_matrix,), {"_update": lambda self, data: self._dict.update(data)})
        module.sp = _Proxy(sp, dok_matrix=dok)


def _trainer_amp(module) -> None:
    """RecBole's trainer builds ``torch.cuda.amp.GradScaler(enabled=...)`` and ``torch.cuda.amp.autocast``, which
    warn (FutureWarning) on every trainer since torch 2.4; its ``amp`` becomes ``torch.amp`` with device
    ``cuda`` (the same objects the deprecated names return)."""
    import functools

    import torch

    if getattr(module, "amp", None) is getattr(torch.cuda, "amp", None) and hasattr(torch.amp, "GradScaler"):
        module.amp = _Proxy(torch.cuda.amp, GradScaler=functools.partial(torch.amp.GradScaler, "cuda"),
                            autocast=functools.partial(torch.amp.autocast, "cuda"))


def _cpu_ddp(module) -> None:
    """RecBole's trainer wraps the model as ``DistributedDataParallel(model, device_ids=[local_rank])``, which
    torch refuses for a CPU module (``device_ids`` must be None there); with the gloo backend on CPU
    (``Config._init_device``) the wrapper drops ``device_ids`` for CPU models."""
    from torch.nn.parallel import DistributedDataParallel

    def ddp(model, device_ids=None, **kwargs):
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        return DistributedDataParallel(model, device_ids=None if on_cpu else device_ids, **kwargs)

    if getattr(module, "DistributedDataParallel", None) is DistributedDataParallel:
        module.DistributedDataParallel = ddp


#: the modules that hold RecBole's ``ensure_dir`` (its home first)
ENSURE_DIR_MODULES = ("recbole.utils.utils", "recbole.utils", "recbole.utils.logger", "recbole.trainer.trainer",
                      "recbole.data.utils", "recbole.data.dataset.dataset")
_ORIGINAL_ENSURE_DIR = []


def _race_free_ensure_dir(dir_path) -> None:
    import os

    os.makedirs(dir_path, exist_ok=True)


def _concurrent_ensure_dir(module) -> None:
    """RecBole's ``ensure_dir`` is ``if not os.path.exists(p): os.makedirs(p)``: two DDP ranks starting together
    both see ``./log`` missing and the second ``makedirs`` raises ``FileExistsError`` (seen in CI with 2 CPU
    ranks). It becomes ``os.makedirs(p, exist_ok=True)``, the same result without the race: replaced in its
    home module as it is imported (every later ``from recbole.utils.utils import ensure_dir`` gets the new
    one), and in modules that had already copied the original when the shims were applied."""
    current = getattr(module, "ensure_dir", None)
    if module.__name__ == ENSURE_DIR_MODULES[0] and current is not _race_free_ensure_dir:
        _ORIGINAL_ENSURE_DIR.append(current)
    if current is not None and current in _ORIGINAL_ENSURE_DIR:
        module.ensure_dir = _race_free_ensure_dir


def _autograd_anomaly_off(module) -> None:
    """RecBole 1.2.1's ``sequential_recommender/sine.py`` runs ``torch.autograd.set_detect_anomaly(True)``
    at import, and ``recbole.model.sequential_recommender`` imports it with every sequential model: every
    RecBole training in the process then runs in PyTorch's debugging mode (NaN checks on every backward
    op, 1.5-2x slower SASRec epochs measured here). Results are unchanged by turning it off; call
    ``torch.autograd.set_detect_anomaly(True)`` yourself to debug.
    """
    import torch

    torch.autograd.set_detect_anomaly(False)


def _literal_atomic_files(module) -> None:
    """RecBole's ``Dataset._load_feat`` reads atomic files with ``pandas.read_csv`` and pandas' default quoting,
    so a value starting with ``"`` (a MovieLens title such as ``"Great Performances" Cats``) opens a quoted field
    that runs on across tabs and lines. The atomic format has no quoting: its ``pd`` reads with
    ``quoting=csv.QUOTE_NONE``, every field literally (what :mod:`recbole_llmfuse.atomic` checks)."""
    import csv
    import functools

    import pandas as pd

    if getattr(module, "pd", None) is pd:
        module.pd = _Proxy(pd, read_csv=functools.partial(pd.read_csv, quoting=csv.QUOTE_NONE))


#: module -> the patches applied to it right after its import (or at once, if it is already imported)
PATCHES: dict = {}
for _names, _patches in (
    (ENSURE_DIR_MODULES, [_concurrent_ensure_dir]),  # its home module first
    (("recbole.trainer.trainer", "recbole.quick_start.quick_start", "recbole.model.sequential_recommender.s3rec"),
     [_torch_checkpoint_loading]),
    (("recbole.trainer.trainer",), [_trainer_amp, _cpu_ddp]),
    (("recbole.model.sequential_recommender.sine",), [_autograd_anomaly_off]),
    (("recbole.data.dataset.dataset",), [_literal_atomic_files]),
    (SPARSE_TENSOR_MODULES, [_sparse_tensors]),
    (DOK_UPDATE_MODULES, [_dok_update]),
):
    for _name in _names:
        PATCHES.setdefault(_name, []).extend(_patches)

#: heavy packages that a RecBole module imports at module level but uses inside one rarely called function:
#: module -> packages whose names it binds are imported on first use instead. ``recbole.quick_start`` does
#: ``from ray import tune`` for ``objective_function``'s ``tune.report`` alone (~590 Ray modules, seconds in
#: every process; RUCAIBox/RecBole PR #2187 asks for the same); the evaluator's metrics import
#: ``sklearn.metrics`` (and through it scipy.stats) for the AUC, MAE and RMSE metrics alone; ``recbole.utils``
#: imports TensorBoard (and protobuf) for the trainer's ``SummaryWriter`` alone.
DEFERRED_IMPORTS = {
    "recbole.quick_start.quick_start": ("ray",),
    "recbole.evaluator.metrics": ("sklearn.metrics",),
    "recbole.utils.utils": ("torch.utils.tensorboard",),
}


class _Deferred:
    """A name that a RecBole module bound with ``from <package> import <name>``, imported on first use."""

    def __init__(self, package: str, name: str):
        object.__setattr__(self, "_where", (package, name))
        object.__setattr__(self, "_target", None)

    def _resolve(self):
        if self._target is None:
            package, name = self._where
            try:  # a submodule (``ray.tune``) ...
                target = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as error:  # ... or a plain attribute (``sklearn.metrics.auc``)
                if error.name != f"{package}.{name}":
                    raise
                target = getattr(importlib.import_module(package), name)
            object.__setattr__(self, "_target", target)
        return self._target

    def __getattr__(self, attr):
        return getattr(self._resolve(), attr)

    def __call__(self, *args, **kwargs):
        return self._resolve()(*args, **kwargs)

    def __repr__(self):
        return f"<deferred {'.'.join(self._where)}>"


class _DeferredPackage(types.ModuleType):
    """Stands in ``sys.modules`` for a package while one RecBole module is executed; every name taken from it
    is a :class:`_Deferred`."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Deferred(self.__name__, name)


class _HookedLoader(importlib.abc.Loader):
    """The loader of a module named in :data:`PATCHES` or :data:`DEFERRED_IMPORTS`: executes it with its heavy
    imports deferred, then applies its patches."""

    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # not imported yet (absent, or None: an import known to fail, as where the package is not installed)
        stubs = {p: _DeferredPackage(p) for p in DEFERRED_IMPORTS.get(self._name, ()) if sys.modules.get(p) is None}
        before = {p: sys.modules[p] for p in stubs if p in sys.modules}
        sys.modules.update(stubs)
        try:
            self._loader.exec_module(module)
        finally:
            for package, stub in stubs.items():
                if sys.modules.get(package) is stub:
                    if package in before:
                        sys.modules[package] = before[package]
                    else:
                        del sys.modules[package]
        for patch in PATCHES.get(self._name, ()):
            patch(module)

    def __getattr__(self, attr):  # get_source, get_code, ... of the wrapped loader
        return getattr(self._loader, attr)


class _RecBoleImportHooks(importlib.abc.MetaPathFinder):
    """Finds the RecBole modules we patch with the finders after it, and hooks their loaders. Written by hand:
    the standard library has no post-import hook (PEP 369 was withdrawn) and ``importlib.util.LazyLoader``
    cannot defer a name bound by ``from x import y``."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHES and fullname not in DEFERRED_IMPORTS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _HookedLoader):
                    spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None


def _pkg_resources_packaging() -> None:
    """ray 2.6.3 (the newest recbole accepts) imports ``packaging`` through setuptools' ``pkg_resources``:
    ``from pkg_resources import packaging`` (``ray.air``, so ``ray.tune``) and
    ``pkg_resources._vendor.packaging.version`` (Ray Data). setuptools 71 stopped vendoring it there,
    and torch 2.13 requires setuptools >= 77: point those names at the installed ``packaging``
    (upstream: ray-project/ray moved to plain ``packaging`` after 2.6).
    """
    from importlib import metadata

    try:
        if tuple(int(x) for x in metadata.version("ray").split(".")[:2]) > (2, 6):
            return  # a current Ray imports plain ``packaging``
        import packaging.version
        import pkg_resources
    except (ImportError, ValueError):  # no Ray (or no setuptools): nothing to shim
        return
    if not hasattr(pkg_resources, "packaging"):
        pkg_resources.packaging = packaging
    if "pkg_resources._vendor.packaging" not in sys.modules:
        try:
            importlib.import_module("pkg_resources._vendor.packaging.version")
        except ImportError:
            vendor = types.ModuleType("pkg_resources._vendor")
            vendor.packaging = packaging
            sys.modules.setdefault("pkg_resources._vendor", vendor)
            sys.modules["pkg_resources._vendor.packaging"] = packaging
            sys.modules["pkg_resources._vendor.packaging.version"] = packaging.version


TRIM_EVERY = 25  # optimizer steps


def _trim_malloc_heap() -> bool:
    """Keep glibc from growing the process without bound when tensor shapes vary from step to step.

    glibc raises its mmap threshold (dynamically, up to 32 MiB) each time a large mmapped block is freed;
    from then on tensors of that size come from the heap, and blocks of ever-different sizes (a batch's
    distinct items, ``torch.unique``, the last short batch) fragment it: measured here, PAD's phase 3 on
    ml-100k grew from 1.4 GB to 3.1 GB RSS in 20 steps and to 7 GB in one run. ``malloc_trim(0)`` every
    ``TRIM_EVERY`` optimizer steps (a global optimizer-step hook) hands the free fragments back. Measured
    alternatives: trimming after every step keeps RSS flat at 0.6 GB but makes steps 1.55x slower (freed
    pages fault in again), and a fixed ``M_MMAP_THRESHOLD`` of 4 MiB makes them 2x slower. Linux/glibc
    only; ``RECBOLE_LLMFUSE_MALLOC_TUNING=0`` leaves malloc alone.
    """
    import ctypes
    import ctypes.util
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("RECBOLE_LLMFUSE_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = [0]

    def trim_now_and_then(*_):
        steps[0] += 1
        if steps[0] % TRIM_EVERY == 0:
            trim(0)

    register_optimizer_step_post_hook(trim_now_and_then)
    return True


def _patch_imported() -> None:
    """Patch the modules of :data:`PATCHES` that were imported before the shims were applied."""
    for name, patches in PATCHES.items():
        if name in sys.modules:
            for patch in patches:
                patch(sys.modules[name])


def apply() -> None:
    """Apply every shim once (idempotent): the RecBole modules named in :data:`PATCHES` are patched as they
    are imported (at once if they already are), so importing this package imports none of them itself."""
    global _APPLIED
    if _APPLIED:
        return
    import warnings

    # ray <= 2.6.3 imports pkg_resources on `import ray` (and recbole imports ray): not actionable by users.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    _numpy_aliases()
    _pkg_resources_packaging()
    _patch_imported()
    sys.meta_path.insert(0, _RecBoleImportHooks())
    _trim_malloc_heap()
    _APPLIED = True
