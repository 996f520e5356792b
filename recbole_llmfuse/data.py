"""Dataset creation: RecBole's ``create_dataset`` plus clear errors and the embedded ml-100k copy."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from logging import getLogger
from typing import Optional, Sequence, Tuple

import numpy as np
import recbole
from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation  # noqa: F401  (re-exported: RecBole's splitting is reused as is)
from recbole.data.dataset import SequentialDataset
from recbole.utils import FeatureSource, FeatureType, ModelType

from recbole_llmfuse import registry
from recbole_llmfuse.atomic import AtomicFileError, check_dataset, header_names
from recbole_llmfuse.dataset_prep import amazon, itememb
from recbole_llmfuse.dataset_prep import hooks as prep_hooks
from recbole_llmfuse.errors import DatasetNotFoundError, ItemEmbeddingError
from recbole_llmfuse.files import atomic_write_text, temp_dir
from recbole_llmfuse.stats import check_protocol, cold_start_user_groups

EMBEDDED_DATASETS = ("ml-100k",)


def embedded_dataset_dir(name: str) -> str:
    """Folder of a dataset shipped inside the ``recbole`` wheel (read-only in many installs)."""
    return os.path.join(os.path.dirname(recbole.__file__), "dataset_example", name)


def materialize_embedded(name: str, target_dir: str) -> bool:
    """Copy an embedded dataset to ``target_dir`` unless its ``.inter`` is already there.

    Only into an absent or empty folder: files already there (a user's own ``.item`` or ``.user``, split files)
    are never written over; such a folder stops with one line naming them. The copy goes to a temporary
    sibling folder first and is renamed into place, so an interrupted copy never leaves a half-written
    dataset. Returns True when files were copied.
    """
    if os.path.isfile(os.path.join(target_dir, f"{name}.inter")):
        return False
    present = sorted(os.listdir(target_dir)) if os.path.isdir(target_dir) else []
    if present:
        shown = ", ".join(present[:6]) + (f" and {len(present) - 6} more" if len(present) > 6 else "")
        raise DatasetNotFoundError(
            f"{target_dir} holds {shown} but no {name}.inter; the embedded {name} copy goes only into an empty "
            f"folder, so nothing was written. Add your {name}.inter there, or use --data_path=OTHER_FOLDER for "
            f"the embedded copy")
    source = embedded_dataset_dir(name)
    parent = os.path.dirname(os.path.abspath(target_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = temp_dir(parent, f".{name}-")
    try:
        for fname in os.listdir(source):
            shutil.copy2(os.path.join(source, fname), os.path.join(tmp, fname))
        if os.path.isdir(target_dir):  # empty: rename over it
            os.rmdir(target_dir)
        os.replace(tmp, target_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    getLogger().info(f"copied the embedded {name} dataset to {target_dir}")
    return True


def write_ml100k_slice(root: str, name: str, users: int, last: Optional[int] = None) -> str:
    """``<root>/<name>/<name>.{inter,item}``: the embedded ml-100k's first ``users`` users (by id), each with
    only their ``last`` interactions in time when given, and the items they touched. For CPU-sized runs
    and examples; returns the folder (kept if it exists)."""
    folder = os.path.join(root, name)
    if os.path.isfile(os.path.join(folder, f"{name}.inter")):
        return folder
    src = embedded_dataset_dir("ml-100k")
    rows: dict = {}
    with open(os.path.join(src, "ml-100k.inter")) as f:
        header = f.readline()
        for line in f:
            user, item, _, stamp = line.rstrip("\n").split("\t")
            if int(user) <= users:
                rows.setdefault(user, []).append((float(stamp), item, line))
    kept = [entry for seq in rows.values() for entry in sorted(seq)[-last if last else 0:]]  # (stamp, item, line)
    items = {item for _, item, _ in kept}
    with open(os.path.join(src, "ml-100k.item")) as f_in:
        item_text = f_in.readline() + "".join(line for line in f_in if line.split("\t", 1)[0] in items)
    # .item first, each file whole (temp file, then rename): a slice with its .inter is a complete slice
    atomic_write_text(os.path.join(folder, f"{name}.item"), item_text)
    atomic_write_text(os.path.join(folder, f"{name}.inter"), header + "".join(line for _, _, line in kept))
    return folder


def _check_atomic_files(config) -> None:
    """The dataset exists (else :class:`DatasetNotFoundError`) and its atomic files are well-formed
    (``check_atomic_files``; :mod:`recbole_llmfuse.atomic`)."""
    name, path = config["dataset"], config["data_path"]
    inter = os.path.join(path, f"{name}.inter")
    if os.path.isfile(inter):
        sequential = config["MODEL_TYPE"] == ModelType.SEQUENTIAL
        if config["check_atomic_files"]:
            check_dataset(path, name, config["TIME_FIELD"] if sequential else None)
        time_field = config["TIME_FIELD"]
        if sequential and time_field and time_field not in header_names(inter):
            raise AtomicFileError(
                f"{inter}: no '{time_field}' column, which sequential models need to order each user's items; add "
                f"a '{time_field}:float' column (any number rising along each user's sequence will do) or set "
                f"TIME_FIELD to the column that holds the time")
        return
    if _has_split_files(config):
        return
    root = os.path.dirname(path)
    make = (f" Make it from the Amazon Reviews files: `{amazon.prep_command(name, config['model'], root)}`."
            if name in amazon.CATEGORIES or name in amazon.CATEGORIES.values() else
            " Convert Amazon reviews with `recbole-llmfuse prep amazon` (see --help).")
    raise DatasetNotFoundError(
        f"dataset '{name}' not found: looked for {os.path.join(path, name + '.inter')}.{make} Or point "
        f"--data_path at the folder that holds '{name}/{name}.inter'. Offline out of the box: "
        f"{', '.join(EMBEDDED_DATASETS)}."
    )


def _has_split_files(config) -> bool:
    name, path, benchmark = config["dataset"], config["data_path"], config["benchmark_filename"]
    return bool(benchmark) and all(os.path.isfile(os.path.join(path, f"{name}.{part}.inter")) for part in benchmark)


def prepare_folder(config) -> None:
    """The dataset's folder ready to read: an embedded dataset copied there (unless split files are), the
    atomic files checked."""
    if config["dataset"] in EMBEDDED_DATASETS and not _has_split_files(config):
        materialize_embedded(config["dataset"], config["data_path"])  # data_path is already <root>/<dataset>
    _check_atomic_files(config)


def prepare(config) -> list:
    """Everything before the dataset is read: the folder (:func:`prepare_folder`), then the prep hooks of the
    model's feature tables and ``prep_hooks`` (unless ``prep_auto_run: false``). Returns the hooks that ran.
    ``bench`` and ``tune`` call it once in the driver, so their workers find the files made."""
    prepare_folder(config)
    if not config["prep_auto_run"]:
        return []
    return prep_hooks.ensure(config, [table_hook(config, t) for t in model_tables(config["model"])])


def dataset_folder(dataset: str, data_path: str = "dataset/") -> str:
    """Absolute folder of a dataset's atomic files (``<data_path>/<dataset>``); embedded ones are copied there."""
    folder = os.path.abspath(os.path.join(os.path.expanduser(data_path), dataset))
    if dataset in EMBEDDED_DATASETS:
        materialize_embedded(dataset, folder)
    return folder


@dataclass(frozen=True)
class FeatureTable:
    """A table a model declares (class attribute ``feature_tables``), loaded row-aligned with RecBole's ids.

    ``name``: the model's buffer (``self.<name>``) and ``dataset.feature_table(name)``; ``hook``: the prep
    hook that produces it (its output file is the table; a file the user put there is used as is);
    ``kind``: ``item`` (``[n_items, ...]``) or ``user`` (``[n_users, ...]``); ``options``: prefix of the
    config keys ``<options>_format`` (auto | npz | text), ``<options>_dim`` and ``<options>_missing``
    (error | zero); ``ragged``: variable-length integer rows (token ids) instead of vectors;
    ``description``: words for error messages; ``output``: which of the hook's tables, for hooks that write
    several (``hook.table_files(output)``).
    """

    name: str
    hook: str
    kind: str = "item"
    options: str = "item_emb"
    ragged: bool = False
    description: str = "a feature table"
    output: str = ""


def table_hook(config, table: FeatureTable) -> str:
    """The prep hook whose output fills ``table``: config key ``<options>_hook`` when set (e.g. ``item_emb_hook:
    item_encoder_lora`` feeds a model the LoRA-tuned item vectors), else the hook the model declares."""
    return config[f"{table.options}_hook"] or table.hook


def model_tables(model_name) -> Tuple[FeatureTable, ...]:
    return tuple(getattr(registry.get_model(model_name), "feature_tables", ()) or ())


def create_dataset(config):
    """Build the RecBole dataset for ``config`` (plugin-aware).

    * ``ml-100k`` is copied from the recbole wheel to ``config['data_path']`` on first use, so files
      written beside it (``.itememb``, profiles) land in a writable folder;
    * a missing dataset raises :class:`DatasetNotFoundError` naming the expected file (RecBole would
      try to download it and fail with a network error on an offline machine);
    * the preparation hooks that produce the model's feature tables (and those ``prep_hooks`` names) run
      first when their outputs are missing (:mod:`recbole_llmfuse.dataset_prep.hooks`); ``prep_auto_run:
      false`` uses the files as they are;
    * a model that declares ``feature_tables`` gets a :class:`FeatureSequentialDataset`; a model class
      with a ``dataset_class`` attribute gets that class; otherwise RecBole's rule applies.
    """
    prepare(config)
    tables = model_tables(config["model"])
    protocol = check_protocol(config)
    if tables or protocol != "recbole":
        if protocol != "recbole" and config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
            raise ItemEmbeddingError(f"eval_protocol: {protocol} needs a sequential model; {config['model']} is "
                                     f"{config['MODEL_TYPE'].name.lower()}. Use eval_protocol: recbole (eval_args).")
        return FeatureSequentialDataset(config, tables)
    dataset_class = getattr(registry.get_model(config["model"]), "dataset_class", None)
    if dataset_class is not None:
        return dataset_class(config)
    return recbole_create_dataset(config)


#: the interaction field holding each sequential instance's true history length (before the window cut)
PREFIX_LENGTH_FIELD = "prefix_length"


class FeatureSequentialDataset(SequentialDataset):
    """``SequentialDataset`` that also loads the model's declared :class:`FeatureTable` s.

    After construction, :meth:`feature_table` returns each table with row ``i`` = RecBole's internal id
    ``i`` (row 0, padding, zero): float32 ``[n, dim]``, or for ragged tables ``(ids [n, max_len]`` int64
    padded with -1, ``lengths [n])``. Each table is the first output of its hook
    (``<dataset>.<suffix>.npz``), else the hook's text twin (``<options>_format: auto``), read by
    :func:`~recbole_llmfuse.dataset_prep.itememb.read_table` and aligned by the original id tokens after
    RecBole's filtering and remapping, so ids the dataset does not have never become candidates and
    RecBole's ``normalize_all`` leaves the vectors alone. Validation (each error names the file and the
    fix): wrong dim, ragged text rows, duplicate ids, NaN/inf, dataset ids without a row.
    """

    def __init__(self, config, tables: Sequence[FeatureTable]):
        self._tables = tuple(tables)
        super().__init__(config)
        self._feature_tables = {t.name: self._load_table(t) for t in self._tables}

    def data_augmentation(self):
        """RecBole's prefix augmentation, plus :data:`PREFIX_LENGTH_FIELD`: each instance's number of earlier
        interactions of its user (``item_length`` is cut at ``MAX_ITEM_LIST_LENGTH``; this is not). Models
        that look up per-prefix user data (PtE's profile snapshots, spec §5.1.1) read it."""
        super().data_augmentation()
        import pandas as pd
        import torch

        users = pd.Series(self.inter_feat[self.uid_field].numpy())
        position = users.groupby(users, sort=False).cumcount().to_numpy() + 1  # rows are in (user, time) order
        self.inter_feat[PREFIX_LENGTH_FIELD] = torch.from_numpy(position.astype(np.int64))
        self.set_field_property(PREFIX_LENGTH_FIELD, FeatureType.TOKEN, FeatureSource.INTERACTION, 1)

    def build(self):
        """RecBole's split, or with ``eval_protocol: cold_start_user`` the cold-start-user split (every prefix
        of a held-out user is an instance; :func:`cold_start_user_groups`). With ``train_rows: windows`` the training split keeps one row per window of
        ``MAX_ITEM_LIST_LENGTH`` items (non-overlapping, plus each user's last training row) instead of one row
        per prefix: for models that supervise every position of a row (HDRec), every training item is still
        a target once, at a fraction of the rows."""
        if check_protocol(self.config) == "cold_start_user":
            self._change_feat_format()
            feat = self.inter_feat
            users = feat[self.uid_field].numpy()
            group = cold_start_user_groups(users, feat[self.time_field].numpy(), self.config["cold_start_ratios"])
            import torch

            datasets = [self.copy(feat[torch.from_numpy(np.flatnonzero(group[users] == g))]) for g in range(3)]
        else:
            datasets = super().build()
        mode = self.config["train_rows"]
        if mode not in ("all", "windows"):
            raise ItemEmbeddingError(f"train_rows must be all or windows, not {mode!r}")
        if mode == "windows":
            import pandas as pd
            import torch

            train = datasets[0]
            users = pd.Series(train.inter_feat[self.uid_field].numpy())
            k = users.groupby(users, sort=False).cumcount().to_numpy() + 1  # prefix length (rows keep time order)
            last = k == users.map(users.value_counts()).to_numpy()
            keep = np.flatnonzero((k % self.config["MAX_ITEM_LIST_LENGTH"] == 0) | last)
            datasets[0] = train.copy(train.inter_feat[torch.from_numpy(keep)])
        return datasets

    def _load_table(self, table: FeatureTable):
        config = self.config
        fmt, missing, dim = (config[f"{table.options}_{k}"] for k in ("format", "missing", "dim"))
        if fmt not in ("auto", "npz", "text") or missing not in ("error", "zero"):
            raise ItemEmbeddingError(
                f"{table.options}_format must be auto | npz | text and {table.options}_missing error | zero; got "
                f"{fmt!r} and {missing!r}")
        hook = prep_hooks.make_hook(table_hook(config, table), config)
        npz_path, text_path = hook.table_files(table.output)
        if fmt == "auto":
            fmt = "npz" if os.path.isfile(npz_path) else "text" if text_path and os.path.isfile(text_path) else None
        path = {"npz": npz_path, "text": text_path}.get(fmt)
        if not path or not os.path.isfile(path):
            where = " nor ".join(p for p in (npz_path, text_path) if p)
            raise ItemEmbeddingError(
                f"model {config['model']} needs {table.description}, but neither {where} exists "
                f"({table.options}_format: {config[f'{table.options}_format']}). Make them with "
                f"`{hook.command()}`, or let the model do it (prep_auto_run: true)."
            )
        tokens, values = itememb.read_table(path, expected_dim=dim, kind=table.kind)
        field = self.iid_field if table.kind == "item" else self.uid_field
        n_rows = self.item_num if table.kind == "item" else self.user_num
        return itememb.align(tokens, values, self.field2token_id[field], n_rows, path, missing)

    def feature_table(self, name: str):
        """The table ``name`` (see class docstring)."""
        if name not in self._feature_tables:
            raise KeyError(f"no feature table '{name}'; this dataset has {sorted(self._feature_tables)}")
        return self._feature_tables[name]
