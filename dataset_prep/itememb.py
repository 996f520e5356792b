"""Item text-embedding files: the format every LLM-fused model reads and every embedding hook writes.

Two files, same content, beside the dataset's atomic files:

* ``<dataset>.itememb`` — RecBole's own text format, loaded through ``additional_feat_suffix`` /
  ``alias_of_item_id`` / ``preload_weight``. Header: ``iid:token<TAB>item_emb:float_seq``; one item per
  line, the vector space-separated. The id column is ``iid`` (not ``item_id``: RecBole would then merge it
  into the interaction's item field). Parsing is slow for large dims (4096-d: seconds per thousand items).
* ``<dataset>.itememb.npz`` — the fast binary twin: arrays ``item_id`` (str tokens) and ``embedding``
  (``[n, dim]`` float16/float32). Read first when present.

Rows are keyed by the *original* item token, so one file serves every filtering/remapping RecBole does;
models receive a table whose row ``i`` is RecBole's internal item id ``i`` (row 0 = padding = zeros).
"""
from __future__ import annotations

import os
import zipfile
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from recbole_llmfuse.atomic import is_float
from recbole_llmfuse.errors import ItemEmbeddingError  # noqa: F401  (re-exported: its users import it here)
from recbole_llmfuse.files import atomic_write

ID_FIELD = "iid"
VALUE_FIELD = "item_emb"
TEXT_HEADER = f"{ID_FIELD}:token\t{VALUE_FIELD}:float_seq"
#: text headers of dense tables by kind (a user table: ``uid:token<TAB>user_emb:float_seq``)
TEXT_HEADERS = {"item": TEXT_HEADER, "user": "uid:token\tuser_emb:float_seq"}
#: the id array of a ``.npz`` table, by kind
NPZ_ID_KEYS = {"item": "item_id", "user": "user_id"}
DEFAULT_SUFFIX = "itememb"


def paths(data_path: str, dataset: str, suffix: str = DEFAULT_SUFFIX) -> Tuple[str, str]:
    """``(text_path, npz_path)`` of a dataset's embedding files."""
    text = os.path.join(data_path, f"{dataset}.{suffix}")
    return text, text + ".npz"


def write_item_embeddings(
    data_path: str,
    dataset: str,
    tokens: Sequence[str],
    embeddings: np.ndarray,
    suffix: str = DEFAULT_SUFFIX,
    formats: Iterable[str] = ("npz", "text"),
    dtype=np.float32,
) -> Dict[str, str]:
    """Write ``embeddings[i]`` for item token ``tokens[i]`` in the given formats (temp file, then rename).

    Returns ``{format: path}``.
    """
    matrix = np.asarray(embeddings)
    tokens = [str(t) for t in tokens]
    check_matrix(tokens, matrix, source="embeddings to write")
    text_path, npz_path = paths(data_path, dataset, suffix)
    written = {}
    for fmt in formats:
        if fmt == "npz":
            atomic_write(
                npz_path,
                lambda f: np.savez(f, item_id=np.asarray(tokens, dtype=str), embedding=matrix.astype(dtype)),
            )
            written["npz"] = npz_path
        elif fmt == "text":

            def write_text(f):
                f.write((TEXT_HEADER + "\n").encode())
                for token, row in zip(tokens, matrix.astype(dtype)):
                    f.write((token + "\t" + " ".join(repr(float(x)) for x in row) + "\n").encode())

            atomic_write(text_path, write_text)
            written["text"] = text_path
        else:
            raise ValueError(f"unknown format '{fmt}'; use 'npz' or 'text'")
    return written


def write_table(path: str, tokens: Sequence[str], values, kind: str = "item") -> str:
    """Write a ``.npz`` table (dense ``[n, dim]`` matrix or :class:`Ragged`) keyed by original id tokens,
    temp file then rename. Any hook's table output goes through here; :func:`read_table` reads it back."""
    tokens = [str(t) for t in tokens]
    id_key = NPZ_ID_KEYS[kind]
    if isinstance(values, Ragged):
        if len(values) != len(tokens):
            raise ItemEmbeddingError(f"{path}: {len(values)} rows for {len(tokens)} ids")
        check_ids(tokens, path)
        arrays = {id_key: np.asarray(tokens, dtype=str), "values": values.values, "offsets": values.offsets}
    else:
        matrix = np.asarray(values)
        check_matrix(tokens, matrix, source=path)
        arrays = {id_key: np.asarray(tokens, dtype=str), "embedding": matrix.astype(np.float32)}
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def check_matrix(tokens: Sequence[str], matrix: np.ndarray, source: str, expected_dim: Optional[int] = None) -> None:
    """Shape, dimension, duplicate-id and finiteness checks shared by both formats."""
    if matrix.ndim < 2 or matrix.shape[0] != len(tokens):
        raise ItemEmbeddingError(
            f"{source}: expected an [n_items, dim] matrix with one row per id, got shape {matrix.shape} "
            f"for {len(tokens)} ids. Re-run the embedding step."
        )
    if expected_dim is not None and matrix.shape[-1] != expected_dim:
        raise ItemEmbeddingError(
            f"{source}: vectors have {matrix.shape[-1]} dims but item_emb_dim is {expected_dim}. "
            f"Set item_emb_dim: {matrix.shape[-1]} or re-run the embedding step with the intended model."
        )
    check_ids(tokens, source)
    finite = np.isfinite(matrix).all(axis=tuple(range(1, matrix.ndim)))
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        where = f"row {bad}, counted from 0" if source.endswith(".npz") else f"line {bad + 2}"  # text: after the header
        raise ItemEmbeddingError(
            f"{source}: the vector of item '{tokens[bad]}' ({where}) contains NaN or inf "
            f"({int((~finite).sum())} such rows). Re-run the embedding step (check fp16 overflow)."
        )


class Ragged:
    """Variable-length integer rows (e.g. an item's text token ids): ``values[offsets[i]:offsets[i+1]]`` is row ``i``."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values, self.offsets = np.asarray(values, dtype=np.int64), np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]


def check_ids(tokens: Sequence[str], source: str) -> None:
    seen: Dict[str, int] = {}
    for row, token in enumerate(tokens):
        if token in seen:
            raise ItemEmbeddingError(
                f"{source}: item id '{token}' appears twice (rows {seen[token]} and {row}). Each item "
                f"needs exactly one vector; re-run the embedding step or remove the duplicate."
            )
        seen[token] = row


def read_npz(path: str, expected_dim: Optional[int] = None, kind: str = "item"):
    """``(tokens, matrix)`` (dense: ``embedding``) or ``(tokens, Ragged)`` (``values`` + ``offsets``) from a
    ``.npz`` table, validated."""
    id_key = NPZ_ID_KEYS[kind]
    try:
        with np.load(path, allow_pickle=False) as data:
            if id_key not in data.files:
                raise KeyError(id_key)
            tokens = data[id_key].astype(str)
            if "values" in data.files and "offsets" in data.files:
                ragged = Ragged(data["values"], data["offsets"])
                if len(ragged) != len(tokens) or ragged.offsets[0] != 0 or (np.diff(ragged.offsets) < 0).any() \
                        or ragged.offsets[-1] != len(ragged.values):
                    raise ItemEmbeddingError(f"{path}: 'offsets' must rise from 0 to len(values) with one row per id. "
                                             f"Re-run the step that wrote it.")
                check_ids(list(tokens), path)
                return tokens, ragged
            matrix = data["embedding"]
    except KeyError as err:
        raise ItemEmbeddingError(
            f"{path}: missing array {err}; the file must hold '{id_key}' and 'embedding' (or 'values' and "
            f"'offsets'). Re-run the embedding step."
        ) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # a truncated file: BadZipFile / EOFError
        if isinstance(err, ItemEmbeddingError):
            raise
        raise ItemEmbeddingError(f"{path}: not a readable .npz file ({err or type(err).__name__}: damaged or "
                                 f"truncated?). Delete it and re-run the step that wrote it.") from None
    check_matrix(list(tokens), matrix, source=path, expected_dim=expected_dim)
    return tokens, matrix


def read_text(path: str, expected_dim: Optional[int] = None, kind: str = "item") -> Tuple[np.ndarray, np.ndarray]:
    """``(tokens, matrix)`` from a text table (``TEXT_HEADERS[kind]``, one id and its space-separated vector a line)."""
    header_want = TEXT_HEADERS[kind]
    tokens, rows = [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n")
        if header.split("\t") != header_want.split("\t"):
            raise ItemEmbeddingError(
                f"{path}: line 1 must be the header '{header_want.replace(chr(9), '<TAB>')}', found "
                f"{header[:80]!r}. The id column must be '{header_want.split(':')[0]}' (not {kind}_id)."
            )
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            token, sep, values = line.partition("\t")
            if not sep:
                raise ItemEmbeddingError(f"{path}, line {lineno}: expected '<id><TAB><values>', found {line[:60]!r}.")
            try:
                vec = np.array(values.split(), dtype=np.float32)
            except ValueError:
                bad = next(v for v in values.split() if not is_float(v))
                raise ItemEmbeddingError(
                    f"{path}, line {lineno}: value {bad!r} in the vector of {kind} '{token}' is not a number; "
                    f"re-run the embedding step."
                ) from None
            if rows and len(vec) != len(rows[0]):
                raise ItemEmbeddingError(
                    f"{path}, line {lineno}: vector of {kind} '{token}' has {len(vec)} values, line 2 has "
                    f"{len(rows[0])}. Every vector needs the same dim; re-run the embedding step."
                )
            tokens.append(token)
            rows.append(vec)
    matrix = np.stack(rows) if rows else np.zeros((0, expected_dim or 0), dtype=np.float32)
    check_matrix(tokens, matrix, source=path, expected_dim=expected_dim)
    return np.asarray(tokens, dtype=str), matrix


def read_table(path: str, expected_dim: Optional[int] = None, kind: str = "item"):
    """Any table file: ``.npz`` (dense or ragged) or the text format. The one reader every model uses."""
    return read_npz(path, expected_dim, kind) if path.endswith(".npz") else read_text(path, expected_dim, kind)


def align(
    tokens: Sequence[str],
    values,
    token2id: Dict[str, int],
    n_rows: int,
    source: str,
    missing: str = "error",
):
    """Rows re-ordered to RecBole's internal ids: ``out[token2id[t]] = values[row of t]``.

    Ids in the file that the dataset does not have are skipped. Dataset ids without a row raise
    :class:`ItemEmbeddingError` (``missing='error'``) or get a zero / empty row (``missing='zero'``).
    Dense: float32 ``[n_rows, dim]`` (or ``[n_rows, ..., dim]`` for a ``.npz`` table with more axes) with row 0 (padding) zero. Ragged: ``(ids [n_rows, max_len]`` int64
    padded with -1, ``lengths [n_rows])``.
    """
    source_row = np.full(n_rows, -1, dtype=np.int64)
    for row, token in enumerate(tokens):
        idx = token2id.get(token)
        if idx is not None and idx > 0:
            source_row[idx] = row
    have = source_row >= 0
    have[0] = True
    check_coverage(have, lambda i: {v: k for k, v in token2id.items()}[i], source, missing)
    if isinstance(values, Ragged):
        lengths = np.zeros(n_rows, dtype=np.int64)
        lengths[source_row >= 0] = np.diff(values.offsets)[source_row[source_row >= 0]]
        out = np.full((n_rows, max(1, int(lengths.max()))), -1, dtype=np.int64)
        for i in np.flatnonzero(source_row >= 0):
            out[i, :lengths[i]] = values.row(source_row[i])
        return out, lengths
    out = np.zeros((n_rows, *values.shape[1:]), dtype=np.float32)
    out[source_row >= 0] = values[source_row[source_row >= 0]]
    return out


def check_coverage(have: np.ndarray, id2token, source: str, missing: str = "error") -> None:
    """Raise :class:`ItemEmbeddingError` if some dataset item (``have[i]`` False, ``i > 0``) has no vector,
    unless ``missing='zero'``. ``id2token(i)`` names an item in the message."""
    lacking = np.flatnonzero(~have[1:]) + 1
    if len(lacking) and missing != "zero":
        examples = ", ".join(repr(str(id2token(i))) for i in lacking[:5])
        if len(lacking) == len(have) - 1:
            raise ItemEmbeddingError(
                f"{source}: no row matches an item of the dataset (it is empty, or made for another dataset: "
                f"e.g. {examples} are missing). Re-run the embedding step on this dataset.")
        raise ItemEmbeddingError(
            f"{source}: {len(lacking)} of the dataset's {len(have) - 1} items have no vector "
            f"(e.g. {examples}). Re-run the embedding step on this dataset, or set "
            f"item_emb_missing: zero to give them zero vectors."
        )
