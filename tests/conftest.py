"""Shared fixtures. Tests run in a temporary working directory (RecBole writes ./log, ./saved)."""
from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest

import recbole_llmfuse  # noqa: F401  (applies the compat shims first)
from recbole_llmfuse.data import embedded_dataset_dir
from recbole_llmfuse.dataset_prep.itememb import write_item_embeddings

SMALL = "ml-small"
SMALL_USERS = 300


@pytest.fixture(autouse=True)
def _workdir(tmp_path, monkeypatch):
    """Every test runs in its own empty folder."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture(scope="session")
def small_data_path(tmp_path_factory):
    """``<root>/ml-small/ml-small.{inter,item}``: the first 150 users of the embedded ml-100k, real format."""
    root = tmp_path_factory.mktemp("data")
    out = root / SMALL
    out.mkdir()
    src = embedded_dataset_dir("ml-100k")
    items = set()
    with open(os.path.join(src, "ml-100k.inter")) as f_in, open(out / f"{SMALL}.inter", "w") as f_out:
        header = f_in.readline()
        f_out.write(header)
        for line in f_in:
            user, item = line.split("\t", 2)[:2]
            if int(user) <= SMALL_USERS:
                f_out.write(line)
                items.add(item)
    with open(os.path.join(src, "ml-100k.item")) as f_in, open(out / f"{SMALL}.item", "w") as f_out:
        f_out.write(f_in.readline())
        for line in f_in:
            if line.split("\t", 1)[0] in items:
                f_out.write(line)
    return str(root)


@pytest.fixture
def folder(small_data_path, tmp_path):
    """A private copy of ml-small's folder (hooks write next to the data)."""
    dst = tmp_path / "data" / SMALL
    shutil.copytree(os.path.join(small_data_path, SMALL), dst)
    return str(dst)


def small_config(data_path: str, **overrides) -> dict:
    """A config that trains in seconds: short sequences, small hidden size, one epoch."""
    cfg = {
        "data_path": data_path,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 10,
        "hidden_size": 32,
        "inner_size": 64,
        "n_heads": 2,
        "train_batch_size": 256,
        "eval_batch_size": 1024,
        "epochs": 1,
        "stopping_step": 100,
        "show_progress": False,
        "seed": 2020,
        "state": "WARNING",
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
def small_cfg(small_data_path):
    def make(**overrides):
        return small_config(overrides.pop("data_path", small_data_path), **overrides)

    return make


def read_atomic(path: str):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


@pytest.fixture
def with_embeddings(small_data_path, tmp_path):
    """ml-small plus a random 32-d .itememb.npz (the embedding hook writes real ones)."""
    root = tmp_path / "data"
    shutil.copytree(os.path.join(small_data_path, SMALL), root / SMALL)
    with open(root / SMALL / f"{SMALL}.item") as f:
        f.readline()
        tokens = [line.split("\t", 1)[0] for line in f]
    vectors = np.random.default_rng(0).standard_normal((len(tokens), 32)).astype(np.float32)
    write_item_embeddings(str(root / SMALL), SMALL, tokens, vectors, formats=["npz"])
    return str(root)
