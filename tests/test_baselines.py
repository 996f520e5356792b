"""Strong-baseline comparison: the sparse long-tail recipe, sampled-softmax losses, shared projections,
budget-matched benches."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from recbole_llmfuse import Config
from recbole_llmfuse.data import embedded_dataset_dir
from recbole_llmfuse.dataset_prep.sparsify import SparsifyError, SparsifyOptions, sparsify
from recbole_llmfuse.model.fusion import TextTokens
from recbole_llmfuse.quick_start import build

from conftest import SMALL

CLI = os.path.join(os.path.dirname(sys.executable), "recbole-llmfuse")


def _rows(path):
    with open(path) as f:
        f.readline()
        return [line.rstrip("\n").split("\t") for line in f]


def test_sparsify_hits_the_target_and_keeps_each_users_order(tmp_path):
    options = SparsifyOptions(mean_length=10, min_user=5, min_item=2, seed=3)
    report = sparsify(embedded_dataset_dir("ml-100k"), "ml-100k", str(tmp_path), "sparse", options)
    folder = tmp_path / "sparse"
    rows = _rows(folder / "sparse.inter")
    source = {(r[0], r[1]): float(r[3]) for r in _rows(os.path.join(embedded_dataset_dir("ml-100k"), "ml-100k.inter"))}
    users, items = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    _, per_user = np.unique(users, return_counts=True)
    _, per_item = np.unique(items, return_counts=True)
    assert per_user.min() >= 5 and per_item.min() >= 2
    assert abs(per_user.mean() - 10) < 1.0  # the item filter removes a little after the subsampling
    assert all(source[(r[0], r[1])] == float(r[3]) for r in rows)  # rows copied unchanged
    assert report["after"]["interactions"] == len(rows) < report["before"]["interactions"] / 5
    assert report["after"]["median_per_item"] < report["before"]["median_per_item"] / 3  # a long tail
    kept_items = {r[0] for r in _rows(folder / "sparse.item")}
    assert kept_items == set(items)  # the item table follows the kept interactions
    assert json.loads((folder / "sparse.sparsify.json").read_text())["rule"]["seed"] == 3
    again = sparsify(embedded_dataset_dir("ml-100k"), "ml-100k", str(tmp_path), "again", options)
    assert _rows(tmp_path / "again" / "again.inter") == rows and again["after"] == report["after"]  # seeded
    with pytest.raises(SparsifyError, match="exists; choose another --name or pass --force"):
        sparsify(embedded_dataset_dir("ml-100k"), "ml-100k", str(tmp_path), "sparse", options)
    with pytest.raises(SparsifyError, match="not below"):
        sparsify(embedded_dataset_dir("ml-100k"), "ml-100k", str(tmp_path), "dense", SparsifyOptions(mean_length=500))
    assert not (tmp_path / "dense").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sparsify_cli_and_a_sequential_model_reads_time_without_load_col(tmp_path):
    proc = subprocess.run([CLI, "prep", "sparsify", "-d", "ml-100k", "--name", "ml-sp", "--data_path", str(tmp_path),
                           "--mean_length", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| after | 943 |" in proc.stdout
    again = subprocess.run([CLI, "prep", "sparsify", "-d", "ml-100k", "--name", "ml-sp", "--data_path", str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    # RecBole's default load_col reads user and item ids only; a sequential model needs the time column
    config = Config("FastSASRec", "ml-sp", config_dict={"data_path": str(tmp_path)}, argv=[])
    assert config["load_col"]["inter"] == ["user_id", "item_id", "timestamp"]
    config = Config("FastSASRec", "ml-sp", config_dict={"data_path": str(tmp_path),
                                                        "load_col": {"inter": ["user_id", "item_id"]}}, argv=[])
    assert config["load_col"]["inter"] == ["user_id", "item_id"]  # the user's own choice stays


def test_popularity_negatives_follow_training_counts_and_skip_the_target(small_cfg):
    config = Config("FastSASRec", SMALL, config_dict=small_cfg(loss_type="InfoNCE", infonce_sampler="popularity",
                                                             infonce_negatives=2000), argv=[])
    _, model, train_data, _, _ = build(config)
    from recbole_llmfuse.stats import training_counts
    from recbole_llmfuse.model.base import popularity_negatives

    counts = training_counts(train_data.dataset)[0]
    pos = torch.full((8,), int(np.argmax(counts)))
    draws, is_target = popularity_negatives(pos, 2000, model.infonce_log_q)
    assert (draws > 0).all() and is_target.sum() == (draws == pos[0]).sum()
    freq = np.bincount(draws.flatten().numpy(), minlength=len(counts))[1:]
    assert np.corrcoef(freq, counts[1:] + 1)[0, 1] > 0.95
    # draws equal to the target take no part in the softmax: with the target's score far above every
    # other item, the loss is ~0 although the (most popular) target is drawn as a "negative" many times;
    # unmasked, each such copy would add its own full share (loss >= log 2)
    model.eval()
    model.cosine, model.infonce_temperature = False, 1.0
    seq = 1e5 * model.item_embedding.weight[pos].detach()
    with torch.no_grad():
        loss = model.sampled_softmax(seq, pos)
    assert is_target.sum() > 0 and float(loss) < 1e-3


@pytest.mark.parametrize("loss_type", ["BCE", "CE", "InfoNCE"])
def test_each_step_projects_the_text_table_once_and_changes_no_result(small_cfg, with_embeddings, loss_type):
    """Without dropout, the shared per-step projection gives the same loss as projecting per call."""
    cfg = small_cfg(data_path=with_embeddings, mlp_hidden_sizes=[32], mlp_dropout_prob=0.0, hidden_dropout_prob=0.0,
                    attn_dropout_prob=0.0, loss_type=loss_type,
                    train_neg_sample_args={"distribution": "uniform", "sample_num": 1} if loss_type == "BCE" else None)
    config = Config("PAD", SMALL, config_dict=cfg, argv=[])
    _, model, train_data, _, _ = build(config)
    model.enter_stage("finetune")
    model.train()
    batch = next(iter(train_data))
    calls = []
    for module in model.modules():
        if isinstance(module, TextTokens):
            module.projector.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    shared = model.calculate_loss(batch)
    assert len(calls) == 2  # the alignment expert's and the text expert's projector, once each
    calls.clear()
    model._in_step = True  # an open scope elsewhere: no sharing, each call projects on its own
    torch.manual_seed(1)
    separate = model.calculate_loss(batch)
    model._in_step = False
    assert len(calls) > 2
    assert torch.allclose(shared, separate, atol=1e-5)


@pytest.mark.integration
def test_budget_matched_bench_tunes_every_model_with_the_same_budget(with_embeddings, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("loss_type: {choice: [CE, InfoNCE]}\nlearning_rate: {choice: [0.001, 0.003]}\n")
    out = tmp_path / "bench"
    proc = subprocess.run(
        [CLI, "bench", f"--dataset={SMALL}", "--models=SASRec[loss_type=CE];MoRec;FastSASRec[learning_rate=-1.0]",
         "--seeds=0", f"--out={out}",
         "--tune", str(space), "--tune_samples=2", "--jobs=2", f"--data_path={with_embeddings}", "--epochs=1",
         "--MAX_ITEM_LIST_LENGTH=10", "--hidden_size=32", "--train_batch_size=512"],
        capture_output=True, text=True, timeout=900,
    )
    # a model whose every trial fails gets no choice on record (--resume sweeps it again), its runs fail: exit 1
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "tuning FastSASRec[learning_rate=-1.0]: no trial finished (2 of 2 failed" in proc.stderr
    assert not (out / "tune" / "FastSASRec_learning_rate=-1.0_" / "chosen.json").exists()
    chosen = {m: json.loads((out / "tune" / m.replace("[", "_").replace("]", "_") / "chosen.json").read_text())
              for m in ("SASRec[loss_type=CE]", "MoRec")}
    assert set(chosen["MoRec"]) == {"loss_type", "learning_rate"}
    assert set(chosen["SASRec[loss_type=CE]"]) == {"learning_rate"}  # loss fixed by its brackets
    for m in chosen:  # two trials each: the same budget
        trials = list(csv.DictReader(open(out / "tune" / m.replace("[", "_").replace("]", "_") / "results.csv")))
        assert len(trials) == 2
    rows = {r["model"]: r for r in csv.DictReader(open(out / "results.csv"))}
    for m, values in chosen.items():
        assert rows[m]["status"] == "ok" and json.loads(rows[m]["tuned"]) == values
    table = (out / "results.md").read_text()
    assert "Budget-matched" in table and "2 trials of space.yaml" in table and "- MoRec: loss_type=" in table


def test_tuned_values_are_read_per_model_and_a_missing_one_is_named(tmp_path):
    from recbole_llmfuse.bench import load_tuned
    from recbole_llmfuse.config import ConfigError

    (tmp_path / "PAD").mkdir()
    (tmp_path / "PAD" / "chosen.json").write_text('{"learning_rate": 0.001, "loss_type": "CE"}')
    (tmp_path / "budget.txt").write_text("6 trials of budget.yaml on ml-100k-sparse\n")
    tuning = load_tuned(["PAD"], str(tmp_path))
    assert tuning["chosen"] == {"PAD": {"learning_rate": 0.001, "loss_type": "CE"}}
    assert "6 trials of budget.yaml" in tuning["budget"]
    # a variant without a sweep of its own takes its model's values; a model without any is named
    assert load_tuned(["PAD[item_emb_hook=item_encoder_lora]"], str(tmp_path))["chosen"] == {
        "PAD[item_emb_hook=item_encoder_lora]": {"learning_rate": 0.001, "loss_type": "CE"}}
    with pytest.raises(ConfigError, match=r"FAERec.chosen.json; run a bench with --tune for FAERec\[backbone"):
        load_tuned(["PAD", "FAERec[backbone=FMLPRec]"], str(tmp_path))
