"""Shims that let RecBole 1.2.1 run on today's stack (numpy 2, torch >= 2.6, pandas 3, ray).

Applied once, on ``import recbole_llmfuse``, before anything else imports RecBole. Every shim is small,
scoped to RecBole's own modules, and a no-op where the installed version does not need it. Each one
names the upstream problem it answers. See ``shared/notes/stack.md`` for the measured traces.
"""
from __future__ import annotations

import functools
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


class _TrustedTorch(types.ModuleType):
    """``torch`` as seen by RecBole's trainer: identical, except ``load`` defaults to ``weights_only=False``.

    torch 2.6 made ``weights_only=True`` the default of ``torch.load``. RecBole's checkpoints pickle the
    whole ``Config``, so the best-model reload in ``Trainer.evaluate`` and ``resume_checkpoint`` fail with
    ``UnpicklingError: Weights only load failed`` (RUCAIBox/RecBole PR #2155, issue #2212). The files
    are the ones the same run just wrote, so loading them fully is safe; the global default of torch is left alone (no
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable).
    """

    def __init__(self, torch_module):
        super().__init__("torch")
        self._torch = torch_module

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def load(self, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return self._torch.load(*args, **kwargs)


def trusted_torch_load(path, map_location=None):
    """Load a checkpoint written by RecBole or by this package (it contains a pickled ``Config``)."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=False)


def _torch_checkpoint_loading() -> None:
    import importlib

    import torch

    proxy = _TrustedTorch(torch)
    for name in (
        "recbole.trainer.trainer",
        "recbole.quick_start.quick_start",
        "recbole.model.sequential_recommender.s3rec",
    ):
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy


class _SeqFillingPandas(types.ModuleType):
    """``pandas`` as seen by RecBole's ``Dataset``: ``read_csv`` fills blank sequence cells with ``""``.

    pandas 3 made copy-on-write the only mode, so ``df[field].fillna(value="", inplace=True)`` in
    ``Dataset._load_feat`` silently does nothing and a blank ``token_seq``/``float_seq`` cell crashes
    with ``'float' object has no attribute 'split'`` (pandas PDEP-7 "Copy-on-Write"; no RecBole fix
    upstream as of 1.2.1).
    Filling the blank cells right after reading gives exactly what RecBole intended.
    """

    def __init__(self, pandas_module):
        super().__init__("pandas")
        self._pd = pandas_module

    def __getattr__(self, name):
        return getattr(self._pd, name)

    def read_csv(self, *args, **kwargs):
        df = self._pd.read_csv(*args, **kwargs)
        for column in df.columns:
            if str(column).endswith(("token_seq", "float_seq")):
                df[column] = df[column].fillna("")
        return df


def _fill_nan(self):
    """Copy-on-write-safe twin of ``recbole.data.dataset.Dataset._fill_nan`` (same semantics)."""
    import numpy as np
    from recbole.utils import FeatureType

    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in feat:
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(
                    lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x
                )


def _pandas_copy_on_write() -> None:
    import pandas as pd

    if int(pd.__version__.split(".")[0]) < 3:
        return
    from recbole.data.dataset import dataset as dataset_module

    if getattr(dataset_module, "pd", None) is pd:
        dataset_module.pd = _SeqFillingPandas(pd)
    dataset_module.Dataset._fill_nan = _fill_nan


def _autograd_anomaly_off() -> None:
    """RecBole 1.2.1's ``sequential_recommender/sine.py`` runs ``torch.autograd.set_detect_anomaly(True)``
    at import, and ``recbole.model.sequential_recommender`` imports it with every sequential model: every
    RecBole training in the process then runs in PyTorch's debugging mode (NaN checks on every backward
    op, 1.5-2x slower SASRec epochs measured here). Results are unchanged by turning it off; call
    ``torch.autograd.set_detect_anomaly(True)`` yourself to debug.
    """
    import importlib

    import torch

    importlib.import_module("recbole.model.sequential_recommender.sine")
    torch.autograd.set_detect_anomaly(False)


def apply() -> None:
    """Apply every shim once (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _numpy_aliases()
    _torch_checkpoint_loading()
    _pandas_copy_on_write()
    _autograd_anomaly_off()
    _APPLIED = True


@functools.lru_cache(maxsize=None)
def stack_versions() -> dict:
    """Versions of the packages the shims care about (for logs and bug reports)."""
    from importlib import metadata

    out = {}
    for dist in ("recbole", "torch", "numpy", "pandas", "scipy", "ray", "transformers", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
