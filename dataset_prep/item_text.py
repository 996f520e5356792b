"""Item text for language models, built from a dataset's ``.item`` atomic file.

Config (the ``item_text_embedding`` hook's params, or any caller's):

* ``item_text_template`` — a format string over ``.item`` columns by name, e.g. FAERec's
  ``"The {categories} item has the following attributes: name is {title}; brand is {brand}; price is {price}."``
  A column that is empty for an item renders as ``unknown``.
* ``item_text_fields`` — without a template: the columns to join as ``"field: value; ..."``. Default:
  every column except the item id, in file order (for ml-100k: title, year and genres).
* ``item_text_fallback`` — text of an item whose fields are all empty (default ``"unknown item"``, PAD's
  rule); such items are counted in :attr:`ItemTexts.n_fallback`.

The ``.item`` file is read as raw text (RecBole would split ``token_seq`` columns into word ids).
"""
from __future__ import annotations

import csv
import hashlib
import os
import string
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

from recbole_llmfuse.atomic import header_names
from recbole_llmfuse.errors import ConfigError, ItemTextError  # noqa: F401  (ItemTextError re-exported)

DEFAULT_FALLBACK = "unknown item"


@dataclass
class ItemTexts:
    tokens: List[str]  # original item ids, file order
    texts: List[str]
    n_fallback: int
    item_file: str


def item_file_digest(path: str):
    """The SHA-256 of a dataset's ``.item`` file for a hook's fingerprint; None when there is none."""
    return sha256_file(path) if os.path.isfile(path) else None


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_item_file(path: str, id_field: str = "item_id") -> tuple:
    """``(columns, rows)`` of a RecBole ``.item`` file: column names without ``:type``, rows as dicts."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(reader)
        except StopIteration:
            raise ItemTextError(f"{path}: empty file; expected a header such as 'item_id:token<TAB>title:token_seq'") from None
        columns = header_names(path, header)
        if id_field not in columns:
            raise ItemTextError(f"{path}, line 1: no '{id_field}' column in header {header}; the item id column must be named {id_field}:token")
        rows = []
        for lineno, values in enumerate(reader, start=2):
            if len(values) != len(columns):
                raise ItemTextError(
                    f"{path}, line {lineno}: {len(values)} tab-separated fields, header has {len(columns)}. "
                    f"Fix the line (tabs inside text must be removed)."
                )
            rows.append(dict(zip(columns, values)))
    return columns, rows


def build_item_texts(
    data_path: str,
    dataset: str,
    template: Optional[str] = None,
    fields: Optional[List[str]] = None,
    fallback: str = DEFAULT_FALLBACK,
    id_field: str = "item_id",
) -> ItemTexts:
    """One text per item of ``<data_path>/<dataset>.item`` (see module docstring)."""
    path = os.path.join(data_path, f"{dataset}.item")
    if not os.path.isfile(path):
        raise ItemTextError(f"{path} not found: item text needs the dataset's .item file (item_id plus text columns).")
    columns, rows = read_item_file(path, id_field)
    if template:
        wanted = [name for _, name, _, _ in string.Formatter().parse(template) if name]
        unknown = sorted(set(wanted) - set(columns))
        if unknown:
            raise ItemTextError(f"item_text_template uses {unknown}, which {path} does not have; its columns: {columns}")
    else:
        if isinstance(fields, str):  # one column from a command line (--item_text_fields=movie_title), or "a,b"
            fields = [f.strip() for f in fields.split(",") if f.strip()]
        if fields is not None and not fields:  # [] or "": not "all columns" in disguise
            raise ItemTextError(f"item_text_fields is empty; name the {path} columns to embed (its columns: "
                                f"{columns}), or leave it unset (~) for all of them")
        fields = list(fields) if fields else [c for c in columns if c != id_field]
        unknown = sorted(set(fields) - set(columns))
        if unknown:
            raise ItemTextError(f"item_text_fields names {unknown}, which {path} does not have; its columns: {columns}")
    tokens, texts, n_fallback = [], [], 0
    for row in rows:
        values: Dict[str, str] = {k: " ".join(v.split()) for k, v in row.items()}
        if template:
            filled = [values[name] for name in wanted]
            text = template.format(**{k: (v or "unknown") for k, v in values.items()}) if any(filled) else ""
        else:
            text = "; ".join(f"{f.replace('_', ' ')}: {values[f]}" for f in fields if values[f])
        if not text:
            text, n_fallback = fallback, n_fallback + 1
        tokens.append(row[id_field])
        texts.append(text)
    return ItemTexts(tokens, texts, n_fallback, path)
