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
import tempfile
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

ID_FIELD = "iid"
VALUE_FIELD = "item_emb"
TEXT_HEADER = f"{ID_FIELD}:token\t{VALUE_FIELD}:float_seq"
DEFAULT_SUFFIX = "itememb"


class ItemEmbeddingError(ValueError):
    """An item-embedding file that cannot be used as is; the message names the file and the fix."""


def paths(data_path: str, dataset: str, suffix: str = DEFAULT_SUFFIX) -> Tuple[str, str]:
    """``(text_path, npz_path)`` of a dataset's embedding files."""
    text = os.path.join(data_path, f"{dataset}.{suffix}")
    return text, text + ".npz"


def atomic_write(path: str, write) -> None:
    """Call ``write(binary_file)`` on a temp file beside ``path``, then rename it to ``path`` (no partial files)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


def check_matrix(tokens: Sequence[str], matrix: np.ndarray, source: str, expected_dim: Optional[int] = None) -> None:
    """Shape, dimension, duplicate-id and finiteness checks shared by both formats."""
    if matrix.ndim != 2 or matrix.shape[0] != len(tokens):
        raise ItemEmbeddingError(
            f"{source}: expected an [n_items, dim] matrix with one row per id, got shape {matrix.shape} "
            f"for {len(tokens)} ids. Re-run the embedding step."
        )
    if expected_dim is not None and matrix.shape[1] != expected_dim:
        raise ItemEmbeddingError(
            f"{source}: vectors have {matrix.shape[1]} dims but item_emb_dim is {expected_dim}. "
            f"Set item_emb_dim: {matrix.shape[1]} or re-run the embedding step with the intended model."
        )
    seen: Dict[str, int] = {}
    for row, token in enumerate(tokens):
        if token in seen:
            raise ItemEmbeddingError(
                f"{source}: item id '{token}' appears twice (rows {seen[token]} and {row}). Each item "
                f"needs exactly one vector; re-run the embedding step or remove the duplicate."
            )
        seen[token] = row
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ItemEmbeddingError(
            f"{source}: the vector of item '{tokens[bad]}' (row {bad}) contains NaN or inf "
            f"({int((~finite).sum())} such rows). Re-run the embedding step (check fp16 overflow)."
        )


def read_npz(path: str, expected_dim: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(tokens, matrix)`` from a ``.itememb.npz`` file, validated."""
    try:
        with np.load(path, allow_pickle=False) as data:
            tokens, matrix = data["item_id"].astype(str), data["embedding"]
    except KeyError as err:
        raise ItemEmbeddingError(
            f"{path}: missing array {err}; the file must hold 'item_id' and 'embedding'. Re-run the embedding step."
        ) from None
    except (OSError, ValueError) as err:
        raise ItemEmbeddingError(f"{path}: not a readable .npz file ({err}). Delete it and re-run the embedding step.") from None
    check_matrix(list(tokens), matrix, source=path, expected_dim=expected_dim)
    return tokens, matrix


def align(
    tokens: Sequence[str],
    matrix: np.ndarray,
    token2id: Dict[str, int],
    n_items: int,
    source: str,
    missing: str = "error",
) -> np.ndarray:
    """Rows re-ordered to RecBole's internal item ids: ``out[token2id[t]] = matrix[row of t]``.

    Ids in the file that the dataset does not have are skipped. Dataset items without a vector raise
    :class:`ItemEmbeddingError` (``missing='error'``) or get a zero row (``missing='zero'``).
    Returns float32 ``[n_items, dim]`` with row 0 (padding) zero.
    """
    out = np.zeros((n_items, matrix.shape[1]), dtype=np.float32)
    have = np.zeros(n_items, dtype=bool)
    have[0] = True
    for row, token in enumerate(tokens):
        idx = token2id.get(token)
        if idx is not None and idx > 0:
            out[idx] = matrix[row]
            have[idx] = True
    check_coverage(have, lambda i: {v: k for k, v in token2id.items()}[i], source, missing)
    return out


def check_coverage(have: np.ndarray, id2token, source: str, missing: str = "error") -> None:
    """Raise :class:`ItemEmbeddingError` if some dataset item (``have[i]`` False, ``i > 0``) has no vector,
    unless ``missing='zero'``. ``id2token(i)`` names an item in the message."""
    lacking = np.flatnonzero(~have[1:]) + 1
    if len(lacking) and missing != "zero":
        examples = ", ".join(repr(id2token(i)) for i in lacking[:5])
        raise ItemEmbeddingError(
            f"{source}: {len(lacking)} of the dataset's {len(have) - 1} items have no vector "
            f"(e.g. {examples}). Re-run the embedding step on this dataset, or set "
            f"item_emb_missing: zero to give them zero vectors."
        )
