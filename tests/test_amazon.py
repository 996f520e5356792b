"""Amazon Reviews 2018 / 2023 -> atomic files, on fixtures written in the real formats."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

from recbole_llmfuse import Config, ConfigError, get_trainer
from recbole_llmfuse.dataset_prep.amazon import AmazonOptions, convert
from recbole_llmfuse.quick_start import build

N_USERS, N_ITEMS = 40, 30


def _write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def _interactions():
    """Deterministic (user, item, rating, t) with every user having 8-12 interactions."""
    out = []
    for u in range(N_USERS):
        for k in range(8 + u % 5):
            out.append((f"U{u:03d}", f"B{(u * 7 + k) % N_ITEMS:04d}", float(1 + (u + k) % 5), 1_500_000_000 + u * 1000 + k * 10))
    return out


@pytest.fixture
def amazon2018(tmp_path):
    rows = _interactions()
    lines = [json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t, "reviewText": "ok ☺",
                         "verified": True}) for u, i, r, t in rows]
    lines.append(lines[4])  # an exact duplicate review (rating 5: survives min_rating)
    lines.insert(5, '{"reviewerID": "U999", "asin": ')  # a truncated (malformed) line
    _write_gz(tmp_path / "Prime_Pantry.json.gz", lines)
    meta = []
    for j in range(N_ITEMS):
        rec = {"asin": f"B{j:04d}", "title": f"Snack &amp; Co. <b>bar</b> {j}\tmix", "brand": "Acme",
               "category": ["Prime Pantry", "Snacks"], "description": ["Crunchy.", "Tasty\nbar"], "price": "$3.49"}
        if j == 1:
            rec["title"] = ""  # item without title
        meta.append(json.dumps(rec))
    _write_gz(tmp_path / "meta_Prime_Pantry.json.gz", meta)
    return tmp_path / "Prime_Pantry.json.gz", tmp_path / "meta_Prime_Pantry.json.gz"


@pytest.fixture
def amazon2023(tmp_path):
    rows = _interactions()
    lines = [json.dumps({"user_id": u, "parent_asin": i, "asin": i + "x", "rating": r, "timestamp": t * 1000,
                         "title": "review title", "text": "Très bon"}) for u, i, r, t in rows]
    _write_gz(tmp_path / "All_Beauty.jsonl.gz", lines)
    meta = [json.dumps({"parent_asin": f"B{j:04d}", "title": f"Crème № {j}", "store": "Beauté",
                        "categories": ["Beauty", "Skin"], "features": ["Soft"], "description": [],
                        "price": None if j % 2 else 12.5}) for j in range(N_ITEMS)]
    _write_gz(tmp_path / "meta_All_Beauty.jsonl.gz", meta)
    return tmp_path / "All_Beauty.jsonl.gz", tmp_path / "meta_All_Beauty.jsonl.gz"


def _train_one_epoch(out_dir, name):
    config = Config("SASRec", name, config_dict={
        "data_path": str(out_dir), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 5, "epochs": 1, "train_batch_size": 64, "show_progress": False, "state": "WARNING",
        "hidden_size": 16, "inner_size": 32}, argv=[])
    dataset, model, train_data, valid_data, test_data = build(config)
    trainer = get_trainer(config["MODEL_TYPE"], "SASRec")(config, model)
    loss = trainer._train_epoch(train_data, 0, show_progress=False)
    result = trainer.evaluate(test_data, load_best_model=False)
    return dataset, loss, result


def test_2018_malformed_line_names_file_and_line(amazon2018, tmp_path):
    reviews, meta = amazon2018
    with pytest.raises(ConfigError, match=r"Prime_Pantry\.json\.gz, line 6: not a JSON object.*--skip_bad_lines"):
        convert("pantry", str(reviews), str(meta), str(tmp_path / "out"), AmazonOptions(version="2018"))
    assert not os.path.exists(tmp_path / "out" / "pantry" / "pantry.inter")  # nothing half-written


def test_2018_to_atomic_files_and_sasrec_trains(amazon2018, tmp_path):
    reviews, meta = amazon2018
    out = tmp_path / "out"
    report = convert("pantry", str(reviews), str(meta), str(out),
                     AmazonOptions(version="2018", min_rating=4, skip_bad_lines=True, user_k=2, item_k=2))
    assert report.bad_lines == {str(reviews): 1} and report.duplicates == 1
    inter = (out / "pantry" / "pantry.inter").read_text().splitlines()
    assert inter[0] == "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    assert all(float(line.split("\t")[2]) >= 4 for line in inter[1:])
    items = {l.split("\t")[0]: l.split("\t") for l in (out / "pantry" / "pantry.item").read_text().splitlines()[1:]}
    title = items["B0003"][1]
    assert title == "Snack & Co. bar 3 mix" and items["B0003"][3] == "Prime Pantry Snacks"
    assert items["B0003"][4] == "Crunchy. Tasty bar" and items["B0003"][5] == "3.49"
    assert report.interactions == len(inter) - 1 and "| pantry |" in report.table()
    dataset, loss, result = _train_one_epoch(out, "pantry")
    assert dataset.user_num - 1 == report.users and loss > 0
    assert set(result) >= {"recall@10", "ndcg@10"} and all(0.0 <= v <= 1.0 for v in result.values())  # NaN fails


def test_2023_to_atomic_files_and_sasrec_trains(amazon2023, tmp_path):
    reviews, meta = amazon2023
    out = tmp_path / "out"
    report = convert("beauty", str(reviews), str(meta), str(out), AmazonOptions(version="2023", last_n=6))
    inter = [l.split("\t") for l in (out / "beauty" / "beauty.inter").read_text().splitlines()[1:]]
    assert int(inter[0][3]) < 10**10  # milliseconds became seconds
    per_user = {}
    for u, i, r, t in inter:
        per_user.setdefault(u, []).append(int(t))
    assert max(len(v) for v in per_user.values()) == 6
    assert all(ts == sorted(ts) for ts in per_user.values())  # chronological
    items = {l.split("\t")[0]: l.split("\t") for l in (out / "beauty" / "beauty.item").read_text().splitlines()[1:]}
    assert items["B0002"][1] == "Crème № 2" and items["B0002"][2] == "Beauté" and items["B0002"][5] == "12.5"
    assert items["B0001"][5] == ""  # price None -> unknown
    dataset, loss, _ = _train_one_epoch(out, "beauty")
    assert dataset.user_num - 1 == report.users and dataset.item_num - 1 == report.items and loss > 0


def test_cli_converts_and_prints_statistics(amazon2023, tmp_path):
    reviews, meta = amazon2023
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "recbole-llmfuse"), "prep", "amazon", "--name=beauty",
         "--version=2023", f"--reviews={reviews}", f"--meta={meta}", f"--out={tmp_path / 'out'}", "--k_core=5"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| dataset | users | items | interactions | density | avg. length |" in proc.stdout
    assert (tmp_path / "out" / "beauty" / "beauty.inter").exists()


def test_the_synthetic_category_converts_with_a_long_tail_and_titles_that_name_the_line(tmp_path):
    """The made-up category the paper plans run on (examples/papers/README.md): real 2018 format, a long tail, and a
    title that names each item's product line."""
    from collections import Counter

    from recbole_llmfuse.dataset_prep.amazon import RECIPES
    from recbole_llmfuse.synthetic import PRODUCT_LINES, write_amazon_category

    reviews, meta = write_amazon_category(str(tmp_path / "raw"))  # the plans' size: 1,500 users, 1,000 items
    report = convert("synth", reviews, meta, str(tmp_path / "out"),
                     AmazonOptions(version="2018", **RECIPES["pad"]["options"]))
    assert not report.bad_lines and report.items_without_title == 0 and report.users > 500
    rows = [line.split("\t") for line in (tmp_path / "out" / "synth" / "synth.inter").read_text().splitlines()[1:]]
    counts = sorted(Counter(r[1] for r in rows).values(), reverse=True)
    head = counts[: len(counts) // 5]
    assert sum(head) > 0.5 * sum(counts) and counts[len(counts) // 2] <= 5  # the top 20% hold most interactions
    titles = [line.split("\t")[1] for line in (tmp_path / "out" / "synth" / "synth.item").read_text().splitlines()[1:]]
    assert all(any(p in t for p in PRODUCT_LINES) for t in titles)
