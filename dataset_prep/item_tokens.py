"""The ``item_tokens`` hook: each item's text as token ids of one tokenizer, a ragged table.

One file per tokenizer (``<dataset>.itemtok-<key>.npz``, the key from the tokenizer's path), so switching
LLMs never conflicts with an earlier file and switching back finds it again; the fingerprint holds the
vocabulary's hash, the ``.item`` file's hash and the rendering settings. Rows are keyed by item token
(:func:`~recbole_llmfuse.dataset_prep.itememb.write_table`), models read them row-aligned (``FeatureTable``
with ``ragged=True``).
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import List

import numpy as np

from recbole_llmfuse.dataset_prep import itememb
from recbole_llmfuse.dataset_prep.hooks import PrepError, PrepHook, hook_defaults_file
from recbole_llmfuse.dataset_prep.item_text import ItemTextError, item_file_digest, read_item_file
from recbole_llmfuse.llm import load_tokenizer, tokenizer_fingerprint


def render_attributes(row: dict, fields: List[str], drop_empty: bool) -> List[str]:
    """``["title: Toy Story", ", year: 1995"]``: HDRec's per-attribute strings (spec HDRec §2.2)."""
    parts = []
    for name in fields:
        value = " ".join(row[name].split())
        if drop_empty and not value:
            continue
        parts.append(("" if not parts else ", ") + f"{name.replace('_', ' ')}: {value}")
    return parts


class ItemTokensHook(PrepHook):
    name = "item_tokens"
    defaults_file = hook_defaults_file(name)

    @property
    def model(self) -> str:
        model = self.params["model"] or (self.config["llm_path"] if self.config is not None else None)
        if not model:
            raise PrepError("prep hook item_tokens needs a tokenizer: set item_tokens: {model: ...} or llm_path")
        return str(model)

    def outputs(self) -> List[str]:
        key = hashlib.sha256(f"{self.model}|{self.params['gguf_file']}".encode()).hexdigest()[:10]
        return [os.path.join(self.data_path, f"{self.dataset}.itemtok-{key}.npz")]

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.model, self.params["gguf_file"])

    @functools.cached_property
    def _item_file(self) -> str:
        return os.path.join(self.data_path, f"{self.dataset}.item")

    def fingerprint(self) -> dict:
        return {"params": {**self.shaping_params(), "model": self.model},
                "tokenizer": tokenizer_fingerprint(self.tokenizer),
                "item_file_sha256": item_file_digest(self._item_file)}

    def run(self, **_) -> dict:
        if not os.path.isfile(self._item_file):
            raise ItemTextError(f"{self._item_file} not found: item tokens need the dataset's .item file")
        columns, rows = read_item_file(self._item_file)
        fields = list(self.params["item_text_fields"] or [c for c in columns if c != "item_id"])
        unknown = sorted(set(fields) - set(columns))
        if unknown:
            raise ItemTextError(f"item_text_fields names {unknown}, which {self._item_file} does not have; its columns: {columns}")
        cap = int(self.params["max_attr_tokens"])
        tokens, lists = [], []
        for row in rows:
            parts = render_attributes(row, fields, bool(self.params["drop_empty_attrs"]))
            ids = self.tokenizer(parts, add_special_tokens=False)["input_ids"] if parts else []
            lists.append([t for attr in ids for t in attr[:cap]])
            tokens.append(row["item_id"])
        offsets = np.cumsum([0] + [len(x) for x in lists])
        values = np.fromiter((t for x in lists for t in x), dtype=np.int64, count=int(offsets[-1]))
        itememb.write_table(self.outputs()[0], tokens, itememb.Ragged(values, offsets))
        report = {"items": len(tokens), "mean_tokens": float(np.mean(np.diff(offsets))) if tokens else 0.0}
        self.write_manifest({"report": report})
        return report
