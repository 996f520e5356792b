"""The analyze tools: Kendall-tau distance concordance (PAD §4.3), ISI (PtE §3) and how far a ranking follows popularity:
known values, invariances, the analyze command."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from recbole_llmfuse import Config, ConfigError, get_trainer
from recbole_llmfuse.analysis import kendall_by_bucket, popularity_profile, sequence_pairs
from recbole_llmfuse.cli import main
from recbole_llmfuse.quick_start import build

from conftest import SMALL


def test_sequence_pairs_are_every_earlier_behaviour_with_a_later_target():
    seqs = np.array([[1, 2, 0], [4, 0, 0]])
    src, tgt = sequence_pairs(seqs, np.array([2, 1]), targets=np.array([3, 5]))
    assert sorted(zip(src.tolist(), tgt.tolist())) == [(1, 2), (1, 3), (2, 3), (4, 5)]


def _random_case(seed=0, n_items=60, dim=8):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((n_items, dim))
    seqs = rng.integers(1, n_items, size=(40, 10))
    src, tgt = sequence_pairs(seqs, np.full(40, 10))
    bucket = np.r_[0, np.repeat(np.arange(1, 6), (n_items - 1) // 5 + 1)[: n_items - 1]]
    return table, src, tgt, bucket


def test_identical_spaces_give_one_and_scaling_or_rotation_changes_nothing():
    table, src, tgt, bucket = _random_case()
    rotation, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((8, 8)))
    for other in (table, 3.0 * table, table @ rotation):
        result = kendall_by_bucket(table, other, src, tgt, bucket)
        assert all(tau == pytest.approx(1.0) for tau, _ in result.values())
    assert set(result) == {"overall", "b01", "b02", "b03", "b04", "b05"}
    assert sum(result[f"b{k:02d}"][1] for k in range(1, 6)) == result["overall"][1]


def test_unrelated_spaces_are_near_zero_and_a_perturbation_in_between():
    table, src, tgt, bucket = _random_case(n_items=400)  # few repeated items: repeats are concordant ties
    rng = np.random.default_rng(2)
    unrelated = kendall_by_bucket(table, rng.standard_normal(table.shape), src, tgt, bucket)["overall"][0]
    noisy = kendall_by_bucket(table, table + 0.5 * rng.standard_normal(table.shape), src, tgt, bucket)["overall"][0]
    assert abs(unrelated) < 0.1 < noisy < 0.95
    # spaces of different sizes are fine (an ID table against a wide LLM table)
    wide = np.hstack([table, np.zeros((table.shape[0], 100))])
    assert kendall_by_bucket(table, wide, src, tgt, bucket)["overall"][0] == pytest.approx(1.0)


def test_analyze_command_writes_table_and_plot(small_cfg, with_embeddings, tmp_path, capsys):
    config = Config("MoRec", SMALL, config_dict=small_cfg(data_path=with_embeddings), argv=[])
    _, model, train_data, valid_data, _ = build(config)
    trainer = get_trainer(config["MODEL_TYPE"], "MoRec")(config, model)
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    ckpt = trainer.saved_model_file
    out = tmp_path / "kt"
    assert main(["analyze", "kendall", "--ref", f"{ckpt}:item", "--cmp", f"{ckpt}:item", "--cmp", f"{ckpt}:llm",
                 "--out", str(out), "--buckets", "5"]) == 0
    with open(out / "kendall.csv") as f:
        rows = list(csv.DictReader(f))
    self_rows = [r for r in rows if r["comparison"].endswith(":item") and r["comparison"].count(":item") == 2]
    assert len(self_rows) == 6 and all(float(r["tau"]) == pytest.approx(1.0) for r in self_rows)
    llm = next(r for r in rows if r["comparison"].endswith(":llm") and r["group"] == "overall")
    assert -1.0 <= float(llm["tau"]) < 1.0 and int(llm["pairs"]) > 1000
    assert Image.open(out / "kendall.png").size[0] > 100
    assert main(["analyze", "kendall", "--ref", f"{ckpt}:nope", "--cmp", f"{ckpt}:item", "--out", str(out)]) == 2
    assert "no item table 'nope'" in capsys.readouterr().err


def test_isi_rises_as_v_becomes_a_function_of_u_and_is_near_zero_for_independent_spaces():
    """Spec PtE §9: with V = A U + noise, shrinking noise raises ISI(U -> V); independent spaces give ~0."""
    from recbole_llmfuse.analysis import isi

    rng = np.random.default_rng(0)
    u = rng.standard_normal((600, 8))
    a = rng.standard_normal((8, 6))
    values = [isi(u, u @ a + noise * rng.standard_normal((600, 6)), seeds=(0, 1), clusters=8,
                  families=("linear",))["best"][0] for noise in (3.0, 1.0, 0.1)]
    assert values[0] < values[1] < values[2] and values[2] > 0.5, values
    independent = isi(u, rng.standard_normal((600, 6)), seeds=(0, 1), clusters=8, families=("linear",))["best"][0]
    assert abs(independent) < 0.05, independent


def test_isi_report_writes_csv_and_plot_for_every_ordered_pair(tmp_path):
    from recbole_llmfuse.analysis import isi_report
    from recbole_llmfuse.dataset_prep.itememb import write_table

    rng = np.random.default_rng(0)
    tokens = [f"i{k}" for k in range(300)]
    base = rng.standard_normal((300, 5))
    write_table(str(tmp_path / "a.npz"), tokens, base.astype(np.float32))
    write_table(str(tmp_path / "b.npz"), tokens[::-1], (base @ rng.standard_normal((5, 4)))[::-1].astype(np.float32))
    rows = isi_report([f"a={tmp_path / 'a.npz'}", f"b={tmp_path / 'b.npz'}"], str(tmp_path / "out"), seeds=(0,),
                      clusters=6)
    assert {(r["source"], r["target"]) for r in rows} == {("a", "b"), ("b", "a")}
    best = {(r["source"], r["target"]): r["isi"] for r in rows if r["family"] == "best"}
    assert best[("a", "b")] > 0.5  # rows were matched by token although the files list them in other orders
    assert (tmp_path / "out" / "isi.csv").exists() and (tmp_path / "out" / "isi.png").stat().st_size > 0


def test_popularity_profile_by_hand():
    # 6 items (column 0 padding): counts fall with the id; row i of the table has norm i
    counts = np.array([0, 50, 40, 30, 20, 10, 0])
    table = np.vstack([np.zeros(3)] + [np.full(3, i / np.sqrt(3)) for i in range(1, 7)])
    popular = np.array([[-np.inf, 6, 5, 4, 3, 2, 1]] * 2, dtype=float)  # the popularity ranker
    contrary = np.array([[-np.inf, 1, 2, 3, 4, 5, 6],
                         [-np.inf, 1, 2, 3, 4, 5, -np.inf]])  # user 2 has seen item 6: out of its rho and its top-k
    up = popularity_profile(popular, table, counts, n_buckets=3, k=2)
    assert up["overall"]["score_rho"] == pytest.approx(1.0) and up["overall"]["norm_rho"] == pytest.approx(-1.0)
    assert up["b01"]["topk_share"] == 1.0 and up["b03"]["topk_share"] == 0.0
    assert up["b01"]["norm"] < 1.0 < up["b03"]["norm"]
    down = popularity_profile(contrary, None, counts, n_buckets=3, k=2)
    assert down["overall"]["score_rho"] == pytest.approx(-1.0) and np.isnan(down["overall"]["norm_rho"])
    assert down["b03"]["topk_share"] == pytest.approx(0.75) and down["b02"]["topk_share"] == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="use a checkpoint of this dataset"):
        popularity_profile(popular[:, :5], None, counts)


def test_analyze_popularity_command_writes_table_and_plot(small_cfg, tmp_path, capsys):
    checkpoints = []
    for name in ("Popularity", "FastSASRec"):
        config = Config(name, SMALL, config_dict=small_cfg(epochs=1), argv=[])
        _, model, train_data, valid_data, _ = build(config)
        trainer = get_trainer(config["MODEL_TYPE"], name)(config, model)
        trainer.fit(train_data, valid_data, saved=True, show_progress=False)
        checkpoints.append(trainer.saved_model_file)
    out = tmp_path / "pop"
    assert main(["analyze", "popularity", "--model", checkpoints[0], "--model", f"{checkpoints[1]}:item",
                 "--out", str(out), "--buckets", "4", "--max_users", "50"]) == 0
    with open(out / "popularity.csv") as f:
        rows = list(csv.DictReader(f))
    pop, fast = rows[:5], rows[5:]
    assert [r["group"] for r in pop] == ["overall", "b01", "b02", "b03", "b04"]
    assert float(pop[0]["score_rho"]) > 0.99 and float(pop[1]["topk_share"]) == 1.0  # the ranker is popularity
    assert float(fast[0]["score_rho"]) < 0.99 and -1 <= float(fast[0]["norm_rho"]) <= 1
    assert sum(float(r["topk_share"]) for r in fast[1:]) == pytest.approx(1.0)
    assert Image.open(out / "popularity.png").size[0] > 100
    assert "wrote" in capsys.readouterr().out
