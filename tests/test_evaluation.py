"""Group metrics (popularity / bucket / user-history groups) and the bench command."""
from __future__ import annotations

import csv
import glob
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from recbole.data.interaction import Interaction

from recbole_llmfuse import Config, create_dataset, data_preparation
from recbole_llmfuse.evaluation import GroupCollector, GroupEvaluator
from recbole_llmfuse.stats import item_groups, tail_users, training_counts

from conftest import SMALL, TINY

NEG = float("-inf")


def test_group_values_on_a_hand_made_case(small_data_path):
    config = Config("FastSASRec", SMALL, config_dict={
        "data_path": small_data_path, "metrics": ["Recall", "NDCG", "MRR"], "topk": [2], "valid_metric": "MRR@2",
        "group_metrics": True,
    }, argv=[])
    collector = GroupCollector(config)
    collector.groups = {
        "is_head": np.array([False, True, True, False, False]),
        "bucket": np.array([0, 1, 1, 2, 2]),
        "tail_user": np.array([False, True, True, False, False]),
    }
    scores = torch.tensor([
        [NEG, 0.9, 0.1, 0.2, 0.3],  # user 1, target 1: rank 1
        [NEG, 0.9, 0.8, 0.7, 0.1],  # user 2, target 3: rank 3
        [NEG, 0.9, 0.8, 0.1, 0.2],  # user 3, target 2: rank 2
        [NEG, 0.1, 0.2, 0.3, 0.9],  # user 4, target 4: rank 1
    ])
    collector.eval_batch_collect(scores, Interaction({"user_id": torch.tensor([1, 2, 3, 4])}),
                                 torch.tensor([0, 1, 2, 3]), torch.tensor([1, 3, 2, 4]))
    result = GroupEvaluator(config).evaluate(collector.get_data_struct())
    ndcg_rank2 = 1 / math.log2(3)
    expected = {
        "recall@2": 0.75, "full_mrr": (1 + 1 / 3 + 0.5 + 1) / 4,
        "recall@2/head": 1.0, "ndcg@2/head": (1 + ndcg_rank2) / 2, "mrr@2/head": 0.75, "full_mrr/head": 0.75,
        "recall@2/tail": 0.5, "ndcg@2/tail": 0.5, "mrr@2/tail": 0.5, "full_mrr/tail": (1 / 3 + 1) / 2,
        "recall@2/b01": 1.0, "recall@2/b02": 0.5,
        "recall@2/tail_users": 0.5, "full_mrr/tail_users": (1 + 1 / 3) / 2,
        "ndcg@2/head_users": (ndcg_rank2 + 1) / 2, "mrr@2/head_users": 0.75,
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-4), key


def test_buckets_count_training_interactions_only(tmp_path):
    """An item seen only in a test (or valid) interaction falls in the coldest bucket."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    rows = []
    for u in range(1, 9):
        seq = [f"i{(u + k) % 6}" for k in range(6)]
        if u == 1:
            seq[-1] = "only_test"
        if u == 2:
            seq[-2] = "only_valid"
        rows += [f"{u}\t{item}\t{100 * u + t}" for t, item in enumerate(seq)]
    (folder / "tiny.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    config = Config("FastSASRec", "tiny", config_dict={"data_path": str(tmp_path),
                                                       "load_col": {"inter": ["user_id", "item_id", "timestamp"]}}, argv=[])
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    item_counts, user_counts = training_counts(train.dataset)
    tok = lambda t: dataset.token2id(dataset.iid_field, t)  # noqa: E731
    assert item_counts[tok("only_test")] == 0 and item_counts[tok("only_valid")] == 0
    assert item_counts.sum() == 8 * 4  # every user's first four interactions are training
    assert (user_counts[1:] == 4).all()
    groups = item_groups(item_counts, head_ratio=0.2, n_buckets=4)
    assert groups["bucket"][tok("only_test")] == 4 and groups["bucket"][tok("only_valid")] == 4
    assert not groups["is_head"][tok("only_test")]
    assert groups["bucket"][0] == 0 and sorted(set(groups["bucket"][1:])) == [1, 2, 3, 4]


def test_tail_users_are_the_shortest_histories():
    counts = np.array([0, 5, 1, 3, 10, 2])
    assert list(np.flatnonzero(tail_users(counts, 0.8))) == [1, 2, 3, 5]  # user 4 (10 interactions) is head


@pytest.mark.integration
def test_bench_two_models_one_seed(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "recbole-llmfuse"), "bench", "--dataset=ml-100k",
         "--models=SASRec,GRU4Rec", "--seeds=0", f"--out={out}", "--epochs=1", "--MAX_ITEM_LIST_LENGTH=10",
         "--jobs=2"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[1/2] SASRec seed=0: ok" in proc.stdout and "[2/2] GRU4Rec seed=0: ok" in proc.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))  # run order, whichever of the 2 jobs ended first
    assert [r["model"] for r in rows] == ["SASRec", "GRU4Rec"] and all(r["status"] == "ok" for r in rows)
    for model in ("SASRec", "GRU4Rec"):  # one checkpoint folder per run: parallel runs never share a file name
        assert [p.name.split("-")[0] for p in (out / "saved" / f"{model}-seed0").iterdir()] == [model]
    for r in rows:
        assert float(r["test_ndcg@10"]) > 0 and 0.0 <= float(r["test_ndcg@10/b01"]) <= 1.0  # the bucket is filled (NaN fails)
        assert float(r["epoch_s"]) > 0 and float(r["peak_mem_mb"]) > 100 and int(r["trainable_params"]) > 0
    table = (out / "results.md").read_text()
    assert "| SASRec | 1/1 |" in table and "ndcg@10/tail" in table
    import matplotlib.image

    for png in ("buckets.png", "valid_curves.png"):
        assert matplotlib.image.imread(str(out / png)).shape[0] > 100


@pytest.mark.integration
def test_bench_records_a_failed_run_and_goes_on(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "recbole-llmfuse"), "bench", f"--dataset={SMALL}",
         "--models=FastSASRec,Pop", "--seeds=0,1", f"--out={out}", "--epochs=1", "--MAX_ITEM_LIST_LENGTH=5",
         "--jobs=3",
         f"--data_path={os.path.dirname(os.path.dirname(__file__))}/nonexistent"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 1  # nothing succeeded (the data path is wrong for both): recorded, not crashed
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["status"] for r in rows] == ["failed"] * 4
    assert [(r["model"], r["seed"]) for r in rows] == [("FastSASRec", "0"), ("Pop", "0"), ("FastSASRec", "1"), ("Pop", "1")]
    assert all("not found" in r["error"] for r in rows)
    # an unknown model name is refused before the first run (exit 2, nothing written)
    bad = subprocess.run([os.path.join(os.path.dirname(sys.executable), "recbole-llmfuse"), "bench", f"--dataset={SMALL}",
                          "--models=FastSASRec,NoSuchModel", f"--out={tmp_path / 'never'}"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "unknown model 'NoSuchModel'" in bad.stderr and not (tmp_path / "never").exists()


def test_bench_model_variants_parse_and_fail_clearly():
    from recbole_llmfuse.bench import parse_variant
    from recbole_llmfuse.config import ConfigError

    assert parse_variant("FAERec") == ("FAERec", {})
    assert parse_variant("FAERec[backbone=FMLPRec,align_alpha=0.3]") == ("FAERec", {"backbone": "FMLPRec", "align_alpha": 0.3})
    assert parse_variant("PtE[pte_profiles={backend: hf, tag: smol},topk=[10, 20],seed=1]") == (
        "PtE", {"pte_profiles": {"backend": "hf", "tag": "smol"}, "topk": [10, 20], "seed": 1})
    with pytest.raises(ConfigError, match="key=value"):
        parse_variant("FAERec[backbone]")


def test_bench_variants_phase_rows_and_resume(tiny_world, tmp_path, capsys):
    """Variants of one model side by side, PAD's phases as rows, and --resume reuses finished runs (the tiny world,
    through the command's own entry point in this process)."""
    from recbole_llmfuse import cli

    out = tmp_path / "bench"
    cmd = ["bench", f"--dataset={TINY}", "--models=FastSASRec;FastSASRec[n_layers=1];PAD", "--seeds=0",
           f"--out={out}", "--epochs=1", "--MAX_ITEM_LIST_LENGTH=5", "--hidden_size=16", f"--data_path={tiny_world}",
           "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}", "--baseline=PAD/pretrain"]
    assert cli.main(cmd) == 0, capsys.readouterr()
    rows = {r["model"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"FastSASRec", "FastSASRec[n_layers=1]", "PAD", "PAD/pretrain", "PAD/align"}
    assert int(rows["FastSASRec[n_layers=1]"]["trainable_params"]) < int(rows["FastSASRec"]["trainable_params"])
    assert float(rows["PAD"]["epoch_s_finetune"]) > 0 and float(rows["PAD/pretrain"]["test_ndcg@10"]) > 0
    assert "| PAD/pretrain |" in (out / "results.md").read_text()
    capsys.readouterr()
    assert cli.main(cmd + ["--resume"]) == 0 and capsys.readouterr().out.count("done earlier") == 3
    assert {r["model"]: r["test_ndcg@10"] for r in csv.DictReader(open(out / "results.csv"))} == {
        m: r["test_ndcg@10"] for m, r in rows.items()}


def test_bench_plan_fills_flags_the_command_line_does_not_give(tmp_path):
    import argparse

    from recbole_llmfuse.bench import add_arguments, apply_plan
    from recbole_llmfuse.config import ConfigError

    (tmp_path / "plans").mkdir()
    plan = tmp_path / "plans" / "p.yaml"
    plan.write_text("models: [FastSASRec, 'PAD[align_loss=none]']\nseeds: [0, 1]\nconfig_files: ../base.yaml\n"
                    "tune: ../space.yaml\ntune_samples: 3\nsettings: {epochs: 3, topk: [10, 20]}\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args, rest = parser.parse_known_args(["--plan", str(plan), "--seeds", "5", "--epochs=1"])
    overrides = apply_plan(args, rest)
    assert args.models == "FastSASRec;PAD[align_loss=none]" and args.seeds == "5"  # the command line wins
    assert args.config_files == str(tmp_path / "base.yaml") and args.tune == str(tmp_path / "space.yaml")
    assert args.tune_samples == 3 and args.dataset == "ml-100k" and args.out == "bench_out"  # plan, then defaults
    assert overrides == ["--topk=[10, 20]", "--epochs=1"]  # the plan's epochs gives way to the command line's
    args, rest = parser.parse_known_args(["--plan", str(plan), "--tuned", "earlier/tune"])
    apply_plan(args, rest)
    assert args.tune is None and args.tuned == "earlier/tune"  # values chosen earlier replace the plan's sweep
    plan.write_text("models: [FastSASRec]\nepochs: 3\n")
    with pytest.raises(ConfigError, match="p.yaml: unknown key 'epochs'; a bench plan takes .*settings"):
        apply_plan(*parser.parse_known_args(["--plan", str(plan)]))
    with pytest.raises(ConfigError, match="give --models, or a --plan file with models:"):
        apply_plan(*parser.parse_known_args([]))


def test_the_papers_plans_name_registered_models_and_existing_files():
    import argparse

    from recbole_llmfuse.bench import add_arguments, apply_plan, parse_variant
    from recbole_llmfuse.registry import get_model

    folder = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "papers")
    plans = sorted(glob.glob(os.path.join(folder, "*.yaml")))
    assert {os.path.basename(p) for p in plans} >= {"PAD.yaml", "FAERec.yaml", "PtE_longtail.yaml", "PtE_coldstart.yaml"}
    for plan in plans:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args, rest = parser.parse_known_args(["--plan", plan])
        apply_plan(args, rest)
        for label in args.models.split(";"):
            get_model(parse_variant(label)[0])
        for path in args.config_files.split() + [args.tune]:
            assert os.path.isfile(path), (plan, path)


def test_bench_plan_runs_dreamrec_beside_an_id_model(tiny_world, tmp_path, capsys):
    from recbole_llmfuse import cli

    plan = tmp_path / "plan.yaml"
    plan.write_text(f"dataset: {TINY}\nmodels: [FastSASRec, 'DreamRec[loss_type=MSE]']\nseeds: [0]\n"
                    "settings: {epochs: 1, MAX_ITEM_LIST_LENGTH: 5, hidden_size: 16, "
                    "load_col: {inter: [user_id, item_id, timestamp]}}\n")
    out = tmp_path / "bench"
    assert cli.main(["bench", "--plan", str(plan), f"--out={out}", f"--data_path={tiny_world}"]) == 0, capsys.readouterr()
    rows = {r["model"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"FastSASRec", "DreamRec[loss_type=MSE]"} and all(r["status"] == "ok" for r in rows.values())
    assert float(rows["DreamRec[loss_type=MSE]"]["epoch_s"]) > 0
