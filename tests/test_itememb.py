"""Item text-embedding tables: row-aligned with RecBole's internal ids, both formats, clear errors."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from recbole_llmfuse import Config, create_dataset
from recbole_llmfuse.dataset_prep.itememb import ItemEmbeddingError, paths, write_item_embeddings

from conftest import SMALL


def _item_tokens(data_path, name=SMALL):
    with open(os.path.join(data_path, name, f"{name}.item")) as f:
        f.readline()
        return [line.split("\t", 1)[0] for line in f]


@pytest.fixture
def emb_data(small_data_path, tmp_path):
    """A private copy of ml-small (tests write embedding files beside it)."""
    root = tmp_path / "data"
    shutil.copytree(os.path.join(small_data_path, SMALL), root / SMALL)
    return str(root)


def _vectors(tokens, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((len(tokens), dim)).astype(np.float32)


def _dataset(data_path, **cfg):
    config = Config(
        "MoRec", SMALL,
        config_dict={"data_path": data_path, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
                     "prep_auto_run": False, **cfg},  # these tests check the files themselves, not the hook
        argv=[],
    )
    return create_dataset(config)


@pytest.mark.parametrize("fmt", ["npz", "text"])
def test_rows_follow_internal_ids(emb_data, fmt):
    tokens = _item_tokens(emb_data)
    vectors = _vectors(tokens)
    write_item_embeddings(os.path.join(emb_data, SMALL), SMALL, tokens, vectors, formats=[fmt])
    dataset = _dataset(emb_data, item_emb_format=fmt, normalize_all=True)  # normalize_all must not touch them
    table = dataset.feature_table("item_text_emb")
    assert table.shape == (dataset.item_num, 8) and table.dtype == np.float32
    assert not table[0].any()
    rng = np.random.default_rng(1)
    for internal in rng.choice(np.arange(1, dataset.item_num), 5, replace=False):
        token = dataset.id2token(dataset.iid_field, internal)
        np.testing.assert_allclose(table[internal], vectors[tokens.index(token)], rtol=1e-6)


def test_text_and_npz_agree_and_extra_ids_never_become_items(emb_data):
    tokens = _item_tokens(emb_data)
    vectors = _vectors(tokens)
    extra = ["not-an-item-1", "not-an-item-2"]
    write_item_embeddings(
        os.path.join(emb_data, SMALL), SMALL, tokens + extra, np.vstack([vectors, _vectors(extra, seed=5)])
    )
    text = _dataset(emb_data, item_emb_format="text")
    binary = _dataset(emb_data, item_emb_format="npz")
    assert text.item_num == binary.item_num == len(tokens) + 1  # extras were not added to the item space
    np.testing.assert_allclose(text.feature_table("item_text_emb"), binary.feature_table("item_text_emb"), rtol=1e-6)


def test_missing_items_error_or_zero(emb_data):
    tokens = _item_tokens(emb_data)
    write_item_embeddings(os.path.join(emb_data, SMALL), SMALL, tokens[3:], _vectors(tokens[3:]), formats=["npz"])
    with pytest.raises(ItemEmbeddingError, match=r"3 of the dataset's .* items have no vector.*item_emb_missing"):
        _dataset(emb_data)
    table = _dataset(emb_data, item_emb_missing="zero").feature_table("item_text_emb")
    assert (~table.any(axis=1)).sum() == 4  # padding + 3 missing


def test_wrong_dim(emb_data):
    tokens = _item_tokens(emb_data)
    write_item_embeddings(os.path.join(emb_data, SMALL), SMALL, tokens, _vectors(tokens), formats=["npz"])
    with pytest.raises(ItemEmbeddingError, match=r"\.npz: vectors have 8 dims but item_emb_dim is 16"):
        _dataset(emb_data, item_emb_dim=16)


def test_duplicates_and_nan_refused_at_write_and_read(emb_data):
    tokens = _item_tokens(emb_data)
    vectors = _vectors(tokens)
    with pytest.raises(ItemEmbeddingError, match="appears twice"):
        write_item_embeddings(emb_data, SMALL, tokens + tokens[:1], np.vstack([vectors, vectors[:1]]))
    bad = vectors.copy()
    bad[4, 2] = np.nan
    _, npz_path = paths(os.path.join(emb_data, SMALL), SMALL)
    np.savez(npz_path, item_id=np.asarray(tokens), embedding=bad)  # written by someone else
    with pytest.raises(ItemEmbeddingError, match=rf"item '{tokens[4]}' \(row 4, counted from 0\) contains NaN"):
        _dataset(emb_data)


def test_text_file_ragged_line_and_header(emb_data):
    tokens = _item_tokens(emb_data)
    text_path, _ = paths(os.path.join(emb_data, SMALL), SMALL)
    write_item_embeddings(os.path.join(emb_data, SMALL), SMALL, tokens, _vectors(tokens), formats=["text"])
    lines = open(text_path).read().splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0]  # drop one value on line 4
    open(text_path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(ItemEmbeddingError, match=r"line 4: vector of item .* has 7 values, line 2 has 8"):
        _dataset(emb_data)
    lines[0] = "item_id:token\titem_emb:float_seq"
    open(text_path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(ItemEmbeddingError, match=r"line 1 must be the header .*\(not item_id\)"):
        _dataset(emb_data)


def test_no_embedding_file_says_how_to_make_one(emb_data):
    with pytest.raises(ItemEmbeddingError, match=r"needs item text embeddings, but neither .*itememb\.npz.*prep embed"):
        _dataset(emb_data)


def test_writes_are_atomic(emb_data, monkeypatch):
    """A crash while writing leaves neither a partial file nor a temp file behind."""
    tokens = _item_tokens(emb_data)
    folder = os.path.join(emb_data, SMALL)
    before = set(os.listdir(folder))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(RuntimeError):
        write_item_embeddings(folder, SMALL, tokens, _vectors(tokens), formats=["npz"])
    assert set(os.listdir(folder)) == before
