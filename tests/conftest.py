"""Shared fixtures. Tests run in a temporary working directory (RecBole writes ./log, ./saved)."""
from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest
import torch

import recbole_llmfuse  # noqa: F401  (applies the compat shims first)
from recbole_llmfuse.data import embedded_dataset_dir
from recbole_llmfuse.dataset_prep.itememb import write_item_embeddings
from recbole_llmfuse.synthetic import write_random_llama, write_walks

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


# -- a tiny world with sequential signal, and tiny random LLMs (tests of LLM code paths) -------------------
TINY = "hdtiny"
N_ITEMS, N_USERS = 40, 60


def write_tiny_dataset(root):
    """60 users walking the 40 items in steps of +1 or +3 (mod 40): sequential signal a model can learn."""
    return write_walks(root, TINY, users=N_USERS, items=N_ITEMS)


def write_tiny_llama(path):
    """A 2-layer random Llama decoder with a word-level tokenizer of the tiny world's words."""
    texts = [f"title: widget {i}, brand: acme globex" for i in range(1, N_ITEMS + 1)]
    texts += ["Provide the next item's hidden state for each [SEQ]. User's history: ",
              "Provide the item's hidden state for [ALIGN]. Item Description: "]
    return write_random_llama(str(path), texts, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)


def tiny_causal_llama(path):
    """A randomly initialised 2-layer LLaMA with MiniLM's tokenizer, saved as a local HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from recbole_llmfuse.dataset_prep.embed import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def popularity_hit(train_dataset, test_dataset, k: int = 10) -> float:
    """hit@k of the popularity ranker on the same split: the ``k`` most frequent training items for every test
    instance (RecBole's sequential evaluation does not mask history items, so neither does this)."""
    iid = train_dataset.iid_field
    top = torch.bincount(train_dataset.inter_feat[iid], minlength=train_dataset.item_num).argsort(descending=True)[:k]
    return torch.isin(test_dataset.inter_feat[iid], top).float().mean().item()


#: a config that learns the tiny world's walks in a few epochs (no dropout, small model)
TINY_LEARN = {"load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "MAX_ITEM_LIST_LENGTH": 5, "hidden_size": 16,
              "inner_size": 32, "n_heads": 2, "train_batch_size": 64, "eval_batch_size": 256, "learning_rate": 0.005,
              "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "seed": 0, "show_progress": False,
              "state": "WARNING", "epochs": 1, "stopping_step": 100}
#: how much better than the popularity ranker (hit@10; ~0.33 on the tiny world) a model that learned must be
LEARNS_MARGIN = 0.3


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The tiny world's folder (``data_path``), shared: models that need text vectors make them (MiniLM) once."""
    return write_tiny_dataset(str(tmp_path_factory.mktemp("tiny_world")))


def fit_and_test(config, epochs: int):
    """``epochs`` training epochs, then the test split: ``(model, trainer, losses, result, pop_hit)`` where
    ``pop_hit`` is the popularity ranker's hit@10 on the same split."""
    from recbole_llmfuse.quick_start import build, make_trainer

    _, model, train_data, _, test_data = build(config)
    trainer = make_trainer(config, model)
    losses = [trainer._train_epoch(train_data, epoch, show_progress=False) for epoch in range(epochs)]
    trainer.eval_collector.data_collect(train_data)  # training-split popularity (group metrics), as fit() does
    result = trainer.evaluate(test_data, load_best_model=False)
    return model, trainer, losses, result, popularity_hit(train_data.dataset, test_data.dataset)


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray (2 CPUs) for every test that needs one, started with the settings ``recbole-llmfuse tune`` uses;
    sweeps and Ray prep runs use it instead of starting (and stopping) their own."""
    from recbole_llmfuse.ray_runtime import ray_session, worker_setup

    with ray_session(None, 2, runtime_env={"worker_process_setup_hook": worker_setup}) as ray:
        yield ray
