"""Dataset-preparation hooks: LLM-side work that writes files beside a dataset's atomic files.

A hook (item text embeddings, SASRec pre-training, profile generation, LoRA tuning ...) declares its
output files, the hooks it ``requires``, and a *fingerprint* of everything its outputs depend on (its
parameters, hashes of input files, the fingerprints of the hooks it requires, and, for hooks that read
interactions, the training split's digest). After a run it writes ``<first output>.manifest.json``.

Rules that let a hook carry GPU-hours of work:

* **Who runs it.** A model's feature tables name the hooks that produce them (``recbole_llmfuse.data``),
  ``prep_hooks`` in the config adds more; ``ensure(config, names)`` runs what is missing, after what it
  requires. ``recbole-llmfuse prep hook NAME`` runs one by hand. Hooks with ``auto_run: false``
  (expensive ones) never start from a model run: the run stops with the exact ``prep`` command instead.
* **Leakage boundary.** A hook sees the config and :class:`TrainingSplit`: the training interactions of
  RecBole's own split of that config; validation and test interactions are not in it.
* **One producer.** A per-dataset, per-hook file lock: concurrent runs (bench ``--jobs``, Tune trials, DDP
  ranks) wait for the one that produces, then find the output fresh.
* **Never overwrite a user's work.** An output without a manifest was put there by the user and is used
  as is. An output made with *other settings* than the run asks for is not replaced: the run stops with
  an error naming both settings and the two ways out (``prep_stale: use`` to take the file as it is, or
  ``--force`` / ``prep_stale: rerun`` to rebuild). An output whose settings match but whose inputs
  changed (the ``.item`` file, an upstream hook's output) is rebuilt: that is what the fingerprint is for.
* **Crash safety.** A ``.pending`` marker exists from the start of a run until its manifest is written,
  so an interrupted run's half-written outputs are never mistaken for a user's files; a failed run
  removes its empty work folders; ``force`` removes every leftover and always starts clean.
* **Record cache.** :class:`RecordCache` keeps one entry per item / user / prompt (SQLite), so a
  generation hook's rerun computes only the missing records.

Hooks are found by name like models (:mod:`recbole_llmfuse.registry`: the ``recbole_llmfuse.prep_hooks``
entry-point group, ours included, after hooks registered in the process). Each
hook's parameters come from the config key of the same name (a dict), over the hook's defaults
(``properties/hooks/<name>.yaml`` for ours).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sqlite3
import time
from logging import getLogger
from typing import Dict, Iterable, List, Optional

import yaml

import recbole_llmfuse.properties as props
from recbole_llmfuse.errors import HookConflictError, PrepError, PrepRequiredError  # noqa: F401  (re-exported)
from recbole_llmfuse.files import atomic_write, atomic_write_text  # noqa: F401  (hooks import it from here)
from recbole_llmfuse.registry import available_hooks, get_hook, hook_names, register_hook  # noqa: F401  (re-exported)
from recbole_llmfuse.stats import check_protocol, cold_start_user_groups

MANIFEST_VERSION = 2
STALE_POLICIES = ("error", "use", "rerun")


def hook_defaults_file(name: str) -> str:
    """``properties/hooks/<name>.yaml`` of this package (the commented defaults of a built-in hook)."""
    return os.path.join(os.path.dirname(props.__file__), "hooks", f"{name}.yaml")


@functools.lru_cache(maxsize=None)
def _read_yaml(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def torch_index(mask):
    import numpy as np
    import torch

    return torch.from_numpy(np.flatnonzero(mask))


class TrainingSplit:
    """The training interactions of ``config``'s split, as original tokens: what a hook may learn from.

    Built with RecBole's own ``Dataset`` and ``build()`` on the same config (filters, ordering, split), so
    the boundary is exactly the one the model trains on; with leave-one-out, each user's last two
    interactions (validation and test) are not here. ``users``, ``items`` (str tokens) and ``timestamps``
    (float, or None) are row-aligned, in RecBole's order (by time when the split is time-ordered).
    """

    def __init__(self, config):
        self.config = config

    @functools.cached_property
    def _arrays(self):
        import numpy as np
        from recbole.data.dataset import Dataset

        dataset = Dataset(self.config)
        uid, iid, tid = dataset.uid_field, dataset.iid_field, dataset.time_field
        heldout = None
        if check_protocol(self.config) == "cold_start_user":
            # every interaction of the oldest users trains; held-out users' sequences are prediction inputs
            dataset._change_feat_format()
            dataset.sort(by=tid)
            feat = dataset.inter_feat
            group = cold_start_user_groups(feat[uid].numpy(), feat[tid].numpy(), self.config["cold_start_ratios"])
            mask = group[feat[uid].numpy()]
            train, heldout = feat[torch_index(mask == 0)], feat[torch_index(mask > 0)]
        else:
            train = dataset.build()[0].inter_feat

        def tokens(feat):
            return (np.asarray(dataset.id2token(uid, feat[uid].numpy()), dtype=str),
                    np.asarray(dataset.id2token(iid, feat[iid].numpy()), dtype=str))

        users, items = tokens(train)
        times = train[tid].numpy().astype(np.float64) if tid and tid in train.columns else None
        self._heldout = tokens(heldout) if heldout is not None else (np.zeros(0, str), np.zeros(0, str))
        return users, items, times

    @property
    def users(self):
        return self._arrays[0]

    @property
    def items(self):
        return self._arrays[1]

    @property
    def timestamps(self):
        return self._arrays[2]

    def user_histories(self) -> Dict[str, List[str]]:
        """``{user token: [item tokens in split order]}``."""
        out: Dict[str, List[str]] = {}
        for u, i in zip(self.users, self.items):
            out.setdefault(u, []).append(i)
        return out

    def heldout_histories(self) -> Dict[str, List[str]]:
        """Cold-start-user protocol only (else empty): ``{held-out user: [item tokens in time order]}``.
        These sequences are the model's *inputs* at prediction time; a hook may use a prefix of one only
        for predictions after that prefix (PtE's snapshots, spec §5.1.1), never as training signal."""
        self._arrays  # noqa: B018  (builds the split)
        out: Dict[str, List[str]] = {}
        for u, i in zip(*self._heldout):
            out.setdefault(u, []).append(i)
        return out

    @functools.cached_property
    def digest(self) -> str:
        h = hashlib.sha256()
        for arr in (*self._arrays, *self._heldout):  # held-out parts: empty except in the cold-start protocol
            if arr is not None and len(arr):
                h.update("\x1f".join(map(str, arr.tolist())).encode())
        return h.hexdigest()


class RecordCache:
    """A keyed store of generated records (one per item / user / prompt) in one SQLite file.

    ``get_many(keys)`` returns the cached ones; ``put_many({key: value})`` commits new ones at once, so a
    killed run keeps every record committed before the kill. ``hits``/``misses`` count lookups.
    SQLite (standard library) is used for its crash-safe transactions and its safe concurrent writers.
    """

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.hits = self.misses = 0
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def _connect(self):
        return contextlib.closing(sqlite3.connect(self.path, timeout=600, isolation_level=None))

    @staticmethod
    def key(*parts) -> str:
        """A stable key from JSON-able parts (backend, model fingerprint, prompt, sampling settings ...)."""
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get_many(self, keys: Iterable[str]) -> Dict[str, object]:
        keys = list(keys)
        found: Dict[str, object] = {}
        with self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                rows = db.execute(f"SELECT key, value FROM records WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                found.update((k, json.loads(v)) for k, v in rows)
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put_many(self, records: Dict[str, object]) -> None:
        with self._connect() as db:
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO records VALUES (?, ?)",
                           [(k, json.dumps(v)) for k, v in records.items()])
            db.execute("COMMIT")

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM records").fetchone()[0]


class PrepHook:
    """Base class. Subclasses set ``name`` (and ``requires``, ``uses_split``, ``defaults_file`` or ``defaults``)
    and implement ``outputs``, ``fingerprint`` and ``run``; ``work_dirs`` lists folders a run may leave."""

    name: str = ""
    #: hooks whose outputs this one reads (run first; their fingerprints join this one's): names, or ``(name,
    #: {param: value})`` for that hook with some of the run's parameters replaced (e.g. PtE's tuning reads the
    #: untuned profile set while the run's ``pte_profiles`` asks for the tuned one)
    requires: tuple = ()
    #: True: the fingerprint includes the training split's digest (hooks that read interactions)
    uses_split: bool = False
    #: commented YAML with the parameters' defaults (built-ins); other packages may set ``defaults``
    defaults_file: Optional[str] = None
    defaults: Dict = {}
    #: parameters that do not change the outputs (left out of the fingerprint)
    runtime_params: tuple = ("auto_run",)
    #: ``recbole-llmfuse prep <cli>`` runs this hook (default: ``prep hook <name>``); ``summary``: its help line
    cli: Optional[str] = None
    summary: str = ""
    #: parameters added after the hook's outputs were first made: left out of the fingerprint while at their
    #: default, so outputs made before they existed stay fresh (not rebuilt on upgrade)
    late_params: tuple = ()

    def __init__(self, data_path: str, dataset: str, params: Optional[dict] = None, config=None):
        """``data_path``: the dataset's own folder (``<data_path>/<dataset>`` in RecBole terms).
        ``config``: the run's RecBole config (needed by hooks that read the training split)."""
        self.data_path = data_path
        self.dataset = dataset
        self.config = config
        defaults = self.default_params()
        unknown = sorted(set(params or {}) - set(defaults))
        if unknown:
            raise PrepError(f"unknown parameter(s) {unknown} for prep hook '{self.name}'; known: {sorted(defaults)}")
        self.params = {**defaults, **(params or {})}
        self.inputs: Dict[str, str] = {}  # required hook -> its digest (set by resolve())

    @classmethod
    def default_params(cls) -> dict:
        base = {"auto_run": True}
        if cls.defaults_file:
            return {**base, **_read_yaml(cls.defaults_file)}
        return {**base, **cls.defaults}

    # -- to implement -------------------------------------------------------------------------------
    def outputs(self) -> List[str]:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """JSON-able description of everything the outputs depend on besides the required hooks and the split.
        Must contain ``params`` (the parameters that shape the outputs)."""
        return {"params": self.shaping_params()}

    def run(self, **options) -> dict:
        """Compute and write the outputs (temp files, then rename), then :meth:`write_manifest`. Returns a report."""
        raise NotImplementedError

    def required_outputs(self) -> List[str]:
        """Outputs that must exist for the hook to count as done (default: all of them)."""
        return self.outputs()

    def table_files(self, output: str = ""):
        """``(binary path, text path or None)`` of the table a model reads from this hook's outputs (``output``
        names one table of a hook that writes several)."""
        return self.outputs()[0], None

    def work_dirs(self) -> List[str]:
        """Folders a run works in (e.g. shard parts): removed by ``force``, and when empty after a failure."""
        return []

    def auto_runs(self) -> bool:
        """Whether a model run may make the outputs by itself (parameter ``auto_run``)."""
        return bool(self.params["auto_run"])

    # -- shared -------------------------------------------------------------------------------------
    def shaping_params(self) -> dict:
        defaults = self.default_params() if self.late_params else {}
        return {k: v for k, v in self.params.items()
                if k not in self.runtime_params and not (k in self.late_params and v == defaults.get(k))}

    @functools.cached_property
    def split(self) -> TrainingSplit:
        if self.config is None:
            raise PrepError(f"prep hook '{self.name}' reads the training split and needs the run's config")
        return TrainingSplit(self.config)

    def full_fingerprint(self) -> dict:
        out = {"version": MANIFEST_VERSION, "hook": self.name, **self.fingerprint()}
        if self.inputs:
            out["inputs"] = dict(sorted(self.inputs.items()))
        if self.uses_split:
            out["training_split"] = self.split.digest
        return out

    def fingerprint_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.full_fingerprint(), sort_keys=True, default=str).encode()).hexdigest()

    @property
    def manifest_path(self) -> str:
        return self.outputs()[0] + ".manifest.json"

    @property
    def pending_path(self) -> str:
        return self.outputs()[0] + ".pending"

    @property
    def lock_path(self) -> str:
        return os.path.join(self.data_path, f".{self.dataset}.{self.name}.lock")

    def cache(self, namespace: str = "records") -> RecordCache:
        """This hook's record cache for ``dataset`` (kept across settings: keys carry what shapes a record)."""
        return RecordCache(os.path.join(self.data_path, f".{self.dataset}.cache", f"{self.name}.{namespace}.sqlite"))

    def manifest(self) -> Optional[dict]:
        if not os.path.exists(self.manifest_path):
            return None
        with open(self.manifest_path) as f:
            return json.load(f)

    def status(self) -> str:
        """``fresh``; ``missing``; ``pending`` (an interrupted run's leftovers: ours to redo); ``user`` (outputs
        without a manifest: the user's files, used as they are); ``stale`` (same settings, changed inputs:
        rebuilt); ``conflict`` (made with other settings: not replaced without being asked)."""
        if os.path.exists(self.pending_path):
            return "pending"
        manifest = self.manifest()
        if manifest is None:
            return "user" if any(os.path.exists(p) for p in self.outputs()) else "missing"
        if not os.path.exists(self.outputs()[0]):
            return "missing"
        made = manifest.get("fingerprint", {}).get("params")
        if made is None or self._param_diff(made, self._wanted_params()):
            return "conflict"
        if not all(os.path.exists(p) for p in self.required_outputs()):
            return "missing"
        return "fresh" if manifest.get("digest") == self.fingerprint_digest() else "stale"

    def _wanted_params(self) -> dict:
        """This run's shaping parameters as a manifest stores them (through JSON)."""
        return json.loads(json.dumps(self.fingerprint()["params"], default=str))

    def _made_params(self, made: dict) -> dict:
        """A manifest's parameters, a key it lacks taken as that parameter's default: it was added to the hook
        after the output was made, and new parameters default to the old behaviour (so upgrading the package
        does not turn earlier outputs into conflicts)."""
        defaults = json.loads(json.dumps(self.default_params(), default=str))
        return {**{k: v for k, v in defaults.items() if k not in self.runtime_params}, **made}

    def _param_diff(self, made: dict, wanted: dict) -> set:
        made, wanted = self._made_params(made), self._made_params(wanted)
        return {k for k in set(made) | set(wanted) if made.get(k) != wanted.get(k)}

    def conflict_message(self) -> str:
        made = self._made_params((self.manifest() or {}).get("fingerprint", {}).get("params", {}))
        wanted = self._wanted_params()
        diff = self._param_diff(made, wanted)
        made_s = ", ".join(f"{k}={made.get(k)!r}" for k in sorted(diff))
        wanted_s = ", ".join(f"{k}={wanted.get(k)!r}" for k in sorted(diff))
        return (
            f"{self.outputs()[0]} was made by prep hook '{self.name}' with {made_s}, but this run asks for "
            f"{wanted_s}. It is not replaced without being asked. Use the file as it is: --prep_stale=use "
            f"(or set these '{self.name}' parameters to match); or rebuild it: --prep_stale=rerun, or "
            f"`{self.command(force=True)}`."
        )

    def command(self, force: bool = False) -> str:
        """The ``recbole-llmfuse prep`` command that runs this hook with these parameters."""
        import shlex

        defaults = self.default_params()
        args = " ".join(shlex.quote(f"{k}={v if isinstance(v, str) else json.dumps(v)}") for k, v in self.params.items()
                        if k != "auto_run" and v != defaults.get(k))
        data_path = os.path.dirname(os.path.abspath(self.data_path))
        split = ""
        if self.uses_split and self.config is not None:  # the split the hook reads: the run's model and protocol
            split = f" --model {self.config['model']}"
            if self.config["eval_protocol"] not in (None, "recbole"):
                split += f" --set eval_protocol={self.config['eval_protocol']}"
        return (f"recbole-llmfuse prep {self.cli or 'hook ' + self.name} --dataset {self.dataset} --data_path {data_path}"
                + split + (f" {args}" if args else "") + (" --force" if force else ""))

    def write_manifest(self, extra: Optional[dict] = None) -> None:
        """Record the outputs as complete (call last in ``run``): the manifest, then the pending marker goes."""
        manifest = {"hook": self.name, "digest": self.fingerprint_digest(), "fingerprint": self.full_fingerprint(),
                    **(extra or {})}
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True, default=str))
        if os.path.exists(self.pending_path):
            os.remove(self.pending_path)

    @contextlib.contextmanager
    def lock(self):
        """Exclusive per-dataset, per-hook lock (waits for another producer, then re-checks)."""
        try:
            os.makedirs(self.data_path, exist_ok=True)
            handle = open(self.lock_path, "a")
        except PermissionError:
            raise PrepError(f"{self.data_path} is not writable, and prep hook {self.name} must write "
                            f"{os.path.basename(self.outputs()[0])} there; make the folder writable, or copy the "
                            f"dataset to a writable folder and pass --data_path") from None
        with handle as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                getLogger().info(f"prep hook {self.name}: another process is producing {self.outputs()[0]}; waiting")
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def clean_work_dirs(self, only_empty: bool) -> None:
        for folder in self.work_dirs():
            if os.path.isdir(folder) and (not only_empty or not os.listdir(folder)):
                shutil.rmtree(folder, ignore_errors=True)

    def produce(self, force: bool = False, replace: bool = False, **options) -> Optional[dict]:
        """Run under the lock unless, once the lock is held, the outputs are fresh or the user's.

        ``replace``: an output made with other settings may be rebuilt; ``force``: always run, from a clean
        state (no leftover work folders). Returns the run's report, or None when nothing had to be done.
        """
        with self.lock():
            state = self.status()
            if not force and (state in ("fresh", "user") or (state == "conflict" and not replace)):
                return None
            if force:
                self.clean_work_dirs(only_empty=False)
            atomic_write_text(self.pending_path, json.dumps({"pid": os.getpid(), "started": time.time()}))
            try:
                return self.run(**options)
            except BaseException:
                self.clean_work_dirs(only_empty=True)
                if not any(os.path.exists(p) for p in self.outputs()):
                    os.remove(self.pending_path)  # nothing half-written to mark
                raise


def make_hook(name: str, config, data_path: Optional[str] = None, overrides: Optional[dict] = None) -> PrepHook:
    """Hook ``name`` for ``config``'s dataset, parameterised from ``config[name]`` (then ``overrides``)."""
    params = config[name] or {}
    if not isinstance(params, dict):
        raise PrepError(f"config key '{name}' must be a dict of the hook's parameters, got {params!r}")
    return get_hook(name)(data_path or config["data_path"], config["dataset"], {**params, **(overrides or {})},
                          config=config)


def resolve(config, names: Iterable, data_path: Optional[str] = None) -> List[PrepHook]:
    """The hooks ``names`` and everything they require, in dependency order, each with its inputs' digests.
    A requirement is a name or ``(name, overrides)`` (see :attr:`PrepHook.requires`)."""
    ordered: Dict[str, PrepHook] = {}
    visiting: set = set()

    def visit(req) -> PrepHook:
        name, overrides = (req, {}) if isinstance(req, str) else (req[0], dict(req[1]))
        key = name + (json.dumps(overrides, sort_keys=True, default=str) if overrides else "")
        if key in ordered:
            return ordered[key]
        if key in visiting:
            raise PrepError(f"prep hooks require each other in a cycle through '{name}'")
        visiting.add(key)
        hook = make_hook(name, config, data_path, overrides)
        for dep in hook.requires:
            needed = visit(dep)
            hook.inputs[needed.name] = needed.fingerprint_digest()
        visiting.discard(key)
        ordered[key] = hook
        return hook

    for name in names:
        visit(name)
    return list(ordered.values())


def ensure(config, names: Iterable[str] = ()) -> List[str]:
    """Make the outputs of hooks ``names`` and ``config['prep_hooks']`` usable (module docstring for the
    rules). Returns the names of the hooks that ran."""
    wanted = list(dict.fromkeys([*names, *config["prep_hooks"]]))
    policy = config["prep_stale"]
    if policy not in STALE_POLICIES:
        raise PrepError(f"prep_stale '{policy}': choose one of {STALE_POLICIES}")
    ran = []
    for hook in resolve(config, wanted):
        state = hook.status()
        if state in ("fresh", "user"):
            continue
        if state == "conflict":
            if policy == "use":
                getLogger().warning(f"prep_stale: use - {hook.conflict_message().split('. It is not')[0]}")
                continue
            if policy == "error":
                raise HookConflictError(hook.conflict_message())
        if not hook.auto_runs():
            raise PrepRequiredError(
                f"{hook.outputs()[0]} is {state} and prep hook '{hook.name}' does not run by itself "
                f"(auto_run: {json.dumps(hook.params['auto_run'])}; it can take hours). Run it first: `{hook.command(force=state == 'conflict')}`"
            )
        getLogger().info(f"prep hook {hook.name}: outputs {state}, running")
        if hook.produce(replace=True) is not None:
            ran.append(hook.name)
    return ran

