"""Dataset-preparation hooks: LLM-side work that writes files beside a dataset's atomic files.

A hook (item text embeddings today; LLM profile generation and LoRA tuning use the same interface)
declares its output files and a *fingerprint* of everything its outputs depend on (parameters, model,
hashes of input files). After a run it writes ``<first output>.manifest.json`` holding that fingerprint.

* ``ensure(config)`` runs every hook named by the config key ``prep_hooks`` whose outputs are missing or
  whose manifest fingerprint differs (stale); an output that exists *without* a manifest was put there by
  the user and is left alone. ``recbole_llmfuse.create_dataset`` calls it before building the dataset.
* ``recbole-llmfuse prep <hook> --dataset ...`` runs one hook by hand.

Hooks are found by name: built-ins here, plus the ``recbole_llmfuse.prep_hooks`` entry-point group.
Each hook's parameters come from the config key of the same name (a dict), over the hook's defaults.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from logging import getLogger
from typing import Dict, List, Optional, Type

from recbole_llmfuse.config import ConfigError
from recbole_llmfuse.dataset_prep.itememb import atomic_write

ENTRY_POINT_GROUP = "recbole_llmfuse.prep_hooks"
MANIFEST_VERSION = 1


class PrepHook:
    """Base class. Subclasses set ``name`` and ``defaults`` and implement ``outputs``, ``fingerprint``, ``run``."""

    name: str = ""
    defaults: Dict = {}

    def __init__(self, data_path: str, dataset: str, params: Optional[dict] = None):
        """``data_path``: the dataset's own folder (``<data_path>/<dataset>`` in RecBole terms)."""
        self.data_path = data_path
        self.dataset = dataset
        unknown = sorted(set(params or {}) - set(self.defaults))
        if unknown:
            raise ConfigError(f"unknown parameter(s) {unknown} for prep hook '{self.name}'; known: {sorted(self.defaults)}")
        self.params = {**self.defaults, **(params or {})}

    # -- to implement -------------------------------------------------------------------------------
    def outputs(self) -> List[str]:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """JSON-able description of everything the outputs depend on."""
        raise NotImplementedError

    def run(self, **options) -> None:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> str:
        return self.outputs()[0] + ".manifest.json"

    def fingerprint_digest(self) -> str:
        blob = json.dumps({"version": MANIFEST_VERSION, "hook": self.name, **self.fingerprint()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def status(self) -> str:
        """``fresh``, ``missing``, ``stale`` or ``user`` (an output exists without a manifest: the user's files,
        not ours to replace)."""
        present = [os.path.exists(p) for p in self.outputs()]
        if not os.path.exists(self.manifest_path):
            return "user" if any(present) else "missing"
        if not all(present):
            return "missing"
        with open(self.manifest_path) as f:
            manifest = json.load(f)
        return "fresh" if manifest.get("digest") == self.fingerprint_digest() else "stale"

    def write_manifest(self, extra: Optional[dict] = None) -> None:
        manifest = {"hook": self.name, "digest": self.fingerprint_digest(), "fingerprint": self.fingerprint(), **(extra or {})}
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def builtin_hooks() -> Dict[str, Type[PrepHook]]:
    from recbole_llmfuse.dataset_prep.embed import ItemTextEmbeddingHook

    return {ItemTextEmbeddingHook.name: ItemTextEmbeddingHook}


def get_hook(name: str) -> Type[PrepHook]:
    hooks = builtin_hooks()
    eps = metadata.entry_points()
    for ep in eps.select(group=ENTRY_POINT_GROUP) if hasattr(eps, "select") else eps.get(ENTRY_POINT_GROUP, []):
        hooks.setdefault(ep.name, ep.load())
    if name not in hooks:
        raise ConfigError(f"unknown prep hook '{name}'; available: {sorted(hooks)}")
    return hooks[name]


def hooks_for(config) -> List[PrepHook]:
    """The hooks a config asks for (``prep_hooks: [name, ...]``), parameterised from ``config[name]``."""
    out = []
    for name in config["prep_hooks"] or []:
        params = config[name] or {}
        if not isinstance(params, dict):
            raise ConfigError(f"config key '{name}' must be a dict of the hook's parameters, got {params!r}")
        out.append(get_hook(name)(config["data_path"], config["dataset"], params))
    return out


def ensure(config) -> List[str]:
    """Run the config's hooks whose outputs are missing or stale. Returns the names of the hooks run."""
    ran = []
    for hook in hooks_for(config):
        state = hook.status()
        if state in ("missing", "stale"):
            getLogger().info(f"prep hook {hook.name}: outputs {state}, running")
            hook.run()
            ran.append(hook.name)
    return ran
