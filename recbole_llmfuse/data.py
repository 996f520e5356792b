"""Dataset creation: RecBole's ``create_dataset`` plus clear errors and the embedded ml-100k copy."""
from __future__ import annotations

import os
import shutil
import tempfile
from logging import getLogger

import numpy as np
import recbole
from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation  # noqa: F401  (re-exported: RecBole's splitting is reused as is)
from recbole.data.dataset import SequentialDataset

from recbole_llmfuse import registry
from recbole_llmfuse.dataset_prep import hooks as prep_hooks
from recbole_llmfuse.dataset_prep import itememb
from recbole_llmfuse.dataset_prep.itememb import ItemEmbeddingError

EMBEDDED_DATASETS = ("ml-100k",)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's atomic files are not where the config says."""


def embedded_dataset_dir(name: str) -> str:
    """Folder of a dataset shipped inside the ``recbole`` wheel (read-only in many installs)."""
    return os.path.join(os.path.dirname(recbole.__file__), "dataset_example", name)


def materialize_embedded(name: str, target_dir: str) -> bool:
    """Copy an embedded dataset to ``target_dir`` unless its ``.inter`` is already there.

    The copy goes to a temporary sibling folder first and is renamed into place, so an interrupted
    copy never leaves a half-written dataset. Returns True when files were copied.
    """
    if os.path.isfile(os.path.join(target_dir, f"{name}.inter")):
        return False
    source = embedded_dataset_dir(name)
    parent = os.path.dirname(os.path.abspath(target_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=parent)
    try:
        for fname in os.listdir(source):
            shutil.copy2(os.path.join(source, fname), os.path.join(tmp, fname))
        if os.path.isdir(target_dir):  # a folder with other files (e.g. an .itememb) but no .inter
            for fname in os.listdir(tmp):
                os.replace(os.path.join(tmp, fname), os.path.join(target_dir, fname))
            os.rmdir(tmp)
        else:
            os.replace(tmp, target_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    getLogger().info(f"copied the embedded {name} dataset to {target_dir}")
    return True


def _check_atomic_files(config) -> None:
    name, path = config["dataset"], config["data_path"]
    if os.path.isfile(os.path.join(path, f"{name}.inter")):
        return
    benchmark = config["benchmark_filename"]
    if benchmark and all(os.path.isfile(os.path.join(path, f"{name}.{part}.inter")) for part in benchmark):
        return
    raise DatasetNotFoundError(
        f"dataset '{name}' not found: expected the atomic file {os.path.join(path, name + '.inter')}. "
        f"Point --data_path at the folder that contains '{name}/{name}.inter', or prepare the dataset "
        f"first. Datasets that work offline out of the box: {', '.join(EMBEDDED_DATASETS)}."
    )


def dataset_folder(dataset: str, data_path: str = "dataset/") -> str:
    """Absolute folder of a dataset's atomic files (``<data_path>/<dataset>``); embedded ones are copied there."""
    folder = os.path.abspath(os.path.join(os.path.expanduser(data_path), dataset))
    if dataset in EMBEDDED_DATASETS:
        materialize_embedded(dataset, folder)
    return folder


def create_dataset(config):
    """Build the RecBole dataset for ``config`` (plugin-aware).

    * ``ml-100k`` is copied from the recbole wheel to ``config['data_path']`` on first use, so files
      written beside it (``.itememb``, profiles) land in a writable folder;
    * a missing dataset raises :class:`DatasetNotFoundError` naming the expected file (RecBole would
      try to download it and fail with a network error on an offline machine);
    * the preparation hooks the config names (``prep_hooks``) run first when their outputs are missing
      or stale (:mod:`recbole_llmfuse.dataset_prep.hooks`);
    * a model class with a ``dataset_class`` attribute gets that class; otherwise RecBole's rule
      (``<Model>Dataset`` or the model type's dataset) applies.
    """
    if config["dataset"] in EMBEDDED_DATASETS:
        materialize_embedded(config["dataset"], config["data_path"])  # data_path is already <root>/<dataset>
    _check_atomic_files(config)
    prep_hooks.ensure(config)
    dataset_class = getattr(registry.get_model(config["model"]), "dataset_class", None)
    if dataset_class is not None:
        return dataset_class(config)
    return recbole_create_dataset(config)


class LLMSequentialDataset(SequentialDataset):
    """``SequentialDataset`` that also loads the item text-embedding table of ``<dataset>.itememb``.

    After construction, :meth:`item_embedding_table` returns float32 ``[n_items, dim]`` whose row ``i``
    is RecBole's internal item id ``i`` (row 0, padding, is zero). Sources, first found wins
    (``item_emb_format: auto``): the binary ``<dataset>.itememb.npz``, then the text
    ``<dataset>.itememb`` through RecBole's ``additional_feat_suffix``/``alias_of_item_id``/
    ``preload_weight``. Config keys: ``item_emb_suffix`` (default ``itememb``), ``item_emb_format``
    (``auto | npz | text``), ``item_emb_dim`` (expected dim, optional), ``item_emb_missing``
    (``error | zero``).

    Validation (each error names the file and the fix): wrong dim, ragged rows, duplicate ids,
    NaN/inf, dataset items without a vector. Vectors of ids the dataset does not have are dropped
    before RecBole remaps ids, so they never become ranking candidates; and RecBole's
    ``normalize_all`` (on for ml-100k) leaves the vectors alone.
    """

    def __init__(self, config):
        self._emb_suffix = config["item_emb_suffix"] or itememb.DEFAULT_SUFFIX
        self._emb_dim = config["item_emb_dim"]
        self._emb_missing = config["item_emb_missing"] or "error"
        if self._emb_missing not in ("error", "zero"):
            raise ItemEmbeddingError(f"item_emb_missing must be 'error' or 'zero', not {self._emb_missing!r}")
        text_path, npz_path = itememb.paths(config["data_path"], config["dataset"], self._emb_suffix)
        fmt = config["item_emb_format"] or "auto"
        if fmt == "auto":
            fmt = "npz" if os.path.isfile(npz_path) else "text" if os.path.isfile(text_path) else None
        if fmt not in ("npz", "text"):
            raise ItemEmbeddingError(
                f"model {config['model']} needs item text embeddings, but neither {npz_path} nor "
                f"{text_path} exists (item_emb_format: {config['item_emb_format']}). Make them with "
                f"`recbole-llmfuse prep embed --dataset {config['dataset']}`, or let the model do it: "
                f"prep_hooks: [item_text_embedding]."
            )
        self._emb_path = npz_path if fmt == "npz" else text_path
        if fmt == "text":
            self._configure_text_source(config, text_path)
        self._emb_format = fmt
        super().__init__(config)
        self._item_table = self._build_item_table()

    # -- text path: RecBole's own loading, with checks at the points where raw tokens are visible ------
    def _configure_text_source(self, config, path: str) -> None:
        with open(path, encoding="utf-8") as f:
            header = f.readline().rstrip("\n")
        if header.split("\t") != itememb.TEXT_HEADER.split("\t"):
            raise ItemEmbeddingError(
                f"{path}: line 1 must be the header '{itememb.TEXT_HEADER.replace(chr(9), '<TAB>')}', found "
                f"{header[:80]!r}. The id column must be '{itememb.ID_FIELD}' (not item_id)."
            )
        suffixes = list(config["additional_feat_suffix"] or [])
        if self._emb_suffix not in suffixes:
            config["additional_feat_suffix"] = suffixes + [self._emb_suffix]
        load_col = dict(config["load_col"] or {})
        load_col[self._emb_suffix] = [itememb.ID_FIELD, itememb.VALUE_FIELD]
        config["load_col"] = load_col
        alias = list(config["alias_of_item_id"] or [])
        if itememb.ID_FIELD not in alias:
            config["alias_of_item_id"] = alias + [itememb.ID_FIELD]
        preload = dict(config["preload_weight"] or {})
        preload[itememb.ID_FIELD] = itememb.VALUE_FIELD
        config["preload_weight"] = preload

    def _load_feat(self, filepath, source):
        df = super()._load_feat(filepath, source)
        if source == self._emb_suffix and df is not None:
            rows = df[itememb.VALUE_FIELD].values
            lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
            if len(rows) and (lengths != lengths[0]).any():
                bad = int(np.flatnonzero(lengths != lengths[0])[0])
                raise ItemEmbeddingError(
                    f"{filepath}, line {bad + 2}: vector of item '{df[itememb.ID_FIELD].iloc[bad]}' has "
                    f"{lengths[bad]} values, line 2 has {lengths[0]}. Every vector needs the same dim; "
                    f"re-run the embedding step."
                )
            matrix = np.stack(rows) if len(rows) else np.zeros((0, self._emb_dim or 0))
            itememb.check_matrix(df[itememb.ID_FIELD].tolist(), matrix, source=filepath, expected_dim=self._emb_dim)
        return df

    def _remap_ID_all(self):
        feat = getattr(self, f"{self._emb_suffix}_feat", None)
        if self._emb_format == "text" and feat is not None:
            known = set(self.inter_feat[self.iid_field])
            if self.item_feat is not None:
                known |= set(self.item_feat[self.iid_field])
            keep = feat[itememb.ID_FIELD].isin(known)
            if not keep.all():
                self.logger.info(f"{self._emb_path}: ignoring {int((~keep).sum())} vectors of items not in the dataset")
                setattr(self, f"{self._emb_suffix}_feat", feat[keep].reset_index(drop=True))
        super()._remap_ID_all()

    @property
    def float_like_fields(self):
        return [f for f in super().float_like_fields if f != itememb.VALUE_FIELD]

    # -- the table ----------------------------------------------------------------------------------
    def _build_item_table(self) -> np.ndarray:
        n_items = self.item_num
        if self._emb_format == "npz":
            tokens, matrix = itememb.read_npz(self._emb_path, expected_dim=self._emb_dim)
            return itememb.align(
                tokens, matrix, self.field2token_id[self.iid_field], n_items, self._emb_path, self._emb_missing
            )
        # RecBole's preload matrix is already indexed by internal id; only coverage is left to check
        feat = getattr(self, f"{self._emb_suffix}_feat")
        have = np.zeros(n_items, dtype=bool)
        have[np.asarray(feat[itememb.ID_FIELD].values, dtype=np.int64)] = True  # remapped internal ids
        id2token = self.field2id_token[self.iid_field]
        itememb.check_coverage(have, id2token.__getitem__, self._emb_path, self._emb_missing)
        table = np.asarray(self.get_preload_weight(itememb.ID_FIELD), dtype=np.float32)
        table[~have] = 0.0  # padding and (with item_emb_missing: zero) items without a vector
        return table

    def item_embedding_table(self) -> np.ndarray:
        """float32 ``[n_items, dim]``; row = RecBole internal item id; row 0 zero."""
        return self._item_table
