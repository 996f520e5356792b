"""A newcomer's real data (issue "Real data in"): every bad input is one line with exit 2 and leaves the user's
files as they were; quoted titles load literally; paper recipes for Amazon; unknown settings are refused."""
from __future__ import annotations

import ast
import gzip
import hashlib
import json
import glob
import os
import re
import socket
import time

import numpy as np
import pytest

from recbole_llmfuse.synthetic import write_walks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTER_HEAD = "user_id:token\titem_id:token\ttimestamp:float\n"


def _digests(root: str) -> dict:
    """Every file under ``root`` with its MD5 (a hook's empty lock file aside: it stays by design)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".lock"):
                path = os.path.join(folder, name)
                out[os.path.relpath(path, root)] = hashlib.md5(open(path, "rb").read()).hexdigest()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the table: input -> exit code -> words of the one line -> files unchanged ------------------------------
# Each case writes its input under `data` (a folder holding the tiny dataset `w`) and returns the argv of
# `recbole-llmfuse`; `env` entries are set for the call.


def _w(data):
    return ["run", "--model=FastSASRec", "--dataset=w", f"--data_path={data}", "--epochs=1"]


def _dataset(data, name, inter=None, item=None, raw=None):
    folder = os.path.join(data, name)
    os.makedirs(folder, exist_ok=True)
    for suffix, text in (("inter", inter), ("item", item)):
        if text is not None:
            with open(os.path.join(folder, f"{name}.{suffix}"), "wb") as f:
                f.write(text.encode("utf-8") if isinstance(text, str) else text)
    return name


def _rows(users=6, per_user=5):
    return "".join(f"u{u}\ti{(u + t) % 9 + 1}\t{100 * u + t}\n" for u in range(1, users + 1) for t in range(per_user))


def case_misspelt_key(data):
    return [*_w(data), "--learnin_rate=0.01"]


def case_negative_epochs(data):
    return [*_w(data)[:-1], "--epochs=-1"]


def case_zero_history(data):
    return [*_w(data), "--MAX_ITEM_LIST_LENGTH=0"]


def case_valid_metric_not_in_topk(data):
    return [*_w(data), "--valid_metric=NDCG@20"]


def case_duplicate_header(data):
    name = _dataset(data, "dup", "user_id:token\titem_id:token\titem_id:token\ttimestamp:float\n" +
                    "".join(f"u1\ti{t}\ti{t}\t{t}\n" for t in range(5)))
    return ["run", "--model=FastSASRec", f"--dataset={name}", f"--data_path={data}"]


def case_not_utf8(data):
    name = _dataset(data, "latin", INTER_HEAD + _rows(), "item_id:token\ttitle:token_seq\ni1\tcaf\xe9\n".encode("latin-1"))
    return ["run", "--model=FastSASRec", f"--dataset={name}", f"--data_path={data}"]


def case_no_timestamp(data):
    name = _dataset(data, "nots", "user_id:token\titem_id:token\n" + "".join(f"u{u}\ti{t}\n" for u in range(6) for t in range(5)))
    return ["run", "--model=FastSASRec", f"--dataset={name}", f"--data_path={data}"]


def case_one_interaction_each(data):
    name = _dataset(data, "one", INTER_HEAD + "".join(f"u{u}\ti{u}\t{u}\n" for u in range(8)))
    return ["run", "--model=FastSASRec", f"--dataset={name}", f"--data_path={data}", "--epochs=1"]


def case_truncated_itememb(data):
    write_walks(data, "cut", users=12, items=10)
    np.savez(os.path.join(data, "cut", "cut.itememb.npz"), item_id=np.array([f"i{n}" for n in range(1, 11)]),
             embedding=np.ones((10, 8), np.float32))
    path = os.path.join(data, "cut", "cut.itememb.npz")
    blob = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    return ["run", "--model=MoRec", "--dataset=cut", f"--data_path={data}", "--epochs=1"]


def case_llm_path_not_a_model(data):
    os.makedirs(os.path.join(data, "not-a-model"), exist_ok=True)
    return [*_w(data)[:1], "--model=HDRec", *_w(data)[2:], f"--llm_path={os.path.join(data, 'not-a-model')}"]


def case_llm_path_missing(data):
    return [*_w(data)[:1], "--model=HDRec", *_w(data)[2:], f"--llm_path={os.path.join(data, 'no', 'such', 'model')}"]


def case_hub_id_offline(data):
    return [*_w(data)[:1], "--model=HDRec", *_w(data)[2:], "--llm_path=meta-llama/Meta-Llama-3-8B"]


def case_unwritable_checkpoint_dir(data):
    return [*_w(data), "--checkpoint_dir=/proc/recbole-llmfuse-test"]


def case_truncated_checkpoint(data):
    with open(os.path.join(data, "cut.pth"), "wb") as f:
        f.write(b"PK\x03\x04 not the whole checkpoint")
    np.savez(os.path.join(data, "other.npz"), item_id=np.array(["i1"]), embedding=np.ones((1, 2), np.float32))
    return ["analyze", "isi", "--space", f"a={os.path.join(data, 'cut.pth')}:item", "--space",
            f"b={os.path.join(data, 'other.npz')}", "--out", os.path.join(data, "analysis")]


def case_yaml_syntax_error(data):
    path = os.path.join(data, "bad.yaml")
    with open(path, "w") as f:
        f.write("epochs: 2\nlearning_rate: [0.001\nhidden_size: 64\n")
    return [*_w(data), f"--config_files={path}"]


def case_missing_dataset(data):
    return ["run", "--model=PAD", "--dataset=pantry", f"--data_path={data}"]


def case_bench_unknown_model(data):
    return ["bench", "--models", "FastSASRec,NoSuchModel", "--dataset", "w", f"--data_path={data}",
            "--out", os.path.join(data, "bench"), "--seeds", "0"]


def case_bench_empty_value(data):
    return ["bench", "--models", "PAD[loss_type=]", "--dataset", "w", "--out", os.path.join(data, "bench")]


def case_empty_item_text_fields(data):
    return [*_w(data)[:1], "--model=MoRec", *_w(data)[2:], "--item_text_embedding={item_text_fields: []}"]


def _truncated_gz(data):
    path = os.path.join(data, "Prime_Pantry.json.gz")
    blob = gzip.compress("".join(json.dumps({"reviewerID": f"U{n}", "asin": "B1", "overall": 5.0,
                                             "unixReviewTime": 1_500_000_000 + n}) + "\n" for n in range(400)).encode())
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    return path


def case_truncated_gzip(data):
    return ["prep", "amazon", "--name", "pantry", "--reviews", _truncated_gz(data), "--out", data]


def case_truncated_gzip_skip_bad_lines(data):
    return [*case_truncated_gzip(data), "--skip_bad_lines"]


def case_amazon_over_a_users_dataset(data):
    """Loss of work (regression): `prep amazon --out DIR` over DIR/<name>/ holding a (hand-edited) dataset."""
    _dataset(data, "pantry", INTER_HEAD + _rows(), "item_id:token\ttitle:token_seq\ni1\tmy own edit\n")
    path = os.path.join(data, "reviews.json")
    with open(path, "w") as f:
        f.write("".join(json.dumps({"reviewerID": f"U{n % 7}", "asin": f"B{n % 5}", "overall": 5.0,
                                    "unixReviewTime": 1_500_000_000 + n}) + "\n" for n in range(60)))
    return ["prep", "amazon", "--name", "pantry", "--reviews", path, "--out", data]


def case_embedded_copy_over_users_files(data):
    """Loss of work (regression): dataset/ml-100k/ holding the user's own .item / .user but no .inter."""
    _dataset(data, "ml-100k", None, "item_id:token\tmovie_title:token_seq\n1\tmy own catalogue\n")
    with open(os.path.join(data, "ml-100k", "ml-100k.user"), "w") as f:
        f.write("user_id:token\tage:float\n1\t30\n")
    return ["run", "--model=FastSASRec", "--dataset=ml-100k", f"--data_path={data}", "--epochs=1"]


def case_openai_refused(data):
    return ["prep", "profiles", "--dataset", "w", "--data_path", data, "backend=openai",
            f"base_url=http://127.0.0.1:{_free_port()}/v1", "model=served", "snapshots=false"]


def case_nan_row_in_text_table(data):
    write_walks(data, "nan", users=12, items=10)
    lines = [f"i{n}\t" + ("nan 1" if n == 4 else "1 2") for n in range(1, 11)]
    with open(os.path.join(data, "nan", "nan.itememb"), "w") as f:
        f.write("iid:token\titem_emb:float_seq\n" + "\n".join(lines) + "\n")
    return ["run", "--model=MoRec", "--dataset=nan", f"--data_path={data}", "--epochs=1", "--item_emb_format=text"]


#: (case, words the one line holds)
CASES = [
    (case_misspelt_key, ["unknown setting 'learnin_rate'", "did you mean 'learning_rate'", "--allow_unknown_keys"]),
    (case_negative_epochs, ["epochs -1", "whole number >= 1"]),
    (case_zero_history, ["MAX_ITEM_LIST_LENGTH 0"]),
    (case_valid_metric_not_in_topk, ["valid_metric NDCG@20", "not among topk [10]", "--topk=[10,20]"]),
    (case_duplicate_header, ["dup.inter, line 1", "'item_id' appears twice (columns 2 and 3)"]),
    (case_not_utf8, ["latin.item, line 2, byte offset", "not UTF-8", "iconv"]),
    (case_no_timestamp, ["nots.inter: no 'timestamp' column", "TIME_FIELD"]),
    (case_one_interaction_each, ["training split is empty", "at least 3"]),
    (case_truncated_itememb, ["cut.itememb.npz", "not a readable .npz", "truncated"]),
    (case_llm_path_not_a_model, ["not-a-model holds no model", "config.json"]),
    (case_llm_path_missing, ["does not exist", "offline models"]),
    (case_hub_id_offline, ["'meta-llama/Meta-Llama-3-8B' is not a local folder", "hf download"]),
    (case_unwritable_checkpoint_dir, ["checkpoint_dir", "cannot write there"]),
    (case_truncated_checkpoint, ["cut.pth cannot be read", "truncated"]),
    (case_yaml_syntax_error, ["bad.yaml, line", "YAML syntax error"]),
    (case_missing_dataset, ["pantry.inter", "recbole-llmfuse prep amazon --name pantry --recipe pad "
                            "--reviews Prime_Pantry.json.gz --meta meta_Prime_Pantry.json.gz"]),
    (case_bench_unknown_model, ["unknown model 'NoSuchModel'"]),
    (case_bench_empty_value, ["'loss_type=' has no value"]),
    (case_empty_item_text_fields, ["item_text_fields is empty", "leave it unset"]),
    (case_truncated_gzip, ["Prime_Pantry.json.gz: damaged or truncated gzip", "fetch the file again"]),
    (case_truncated_gzip_skip_bad_lines, ["damaged or truncated gzip"]),
    (case_amazon_over_a_users_dataset, ["already holds pantry.inter, pantry.item", "not made by prep amazon", "--force"]),
    (case_embedded_copy_over_users_files, ["holds ml-100k.item, ml-100k.user but no ml-100k.inter", "nothing was written"]),
    (case_openai_refused, ["cannot reach http://127.0.0.1:", "ConnectionRefusedError"]),
    (case_nan_row_in_text_table, ["nan.itememb", "'i4' (line 5)", "NaN"]),
]


@pytest.mark.parametrize("case, words", CASES, ids=[c.__name__[5:] for c, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_files_as_they_were(tmp_path, capsys, monkeypatch, case, words):
    from recbole_llmfuse.cli import main

    data = str(tmp_path / "data")
    write_walks(data, "w", users=12, items=10)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = case(data)
    before = _digests(data)
    capsys.readouterr()
    start = time.perf_counter()
    code = main(argv)
    took = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-3:]
    assert len(err) == 1, err  # one line, said once
    for word in words:
        assert word in err[0], err[0]
    assert _digests(data) == before  # nothing of the user's replaced, nothing half-written beside it
    assert took < 30, took  # no hub or server retries


def test_a_read_only_dataset_folder_where_a_hook_must_write_is_one_line(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the PermissionError cannot happen")
    from recbole_llmfuse.cli import main

    data = str(tmp_path / "data")
    write_walks(data, "w", users=12, items=10)
    os.chmod(os.path.join(data, "w"), 0o555)
    try:
        assert main(["run", "--model=MoRec", "--dataset=w", f"--data_path={data}", "--epochs=1"]) == 2
    finally:
        os.chmod(os.path.join(data, "w"), 0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not writable" in err[0] and "--data_path" in err[0], err


# -- nothing lost: the same command twice, --force -----------------------------------------------------------


def test_prep_amazon_twice_is_a_no_op_and_force_replaces(tmp_path, capsys):
    from recbole_llmfuse.cli import main

    path = tmp_path / "reviews.json"
    path.write_text("".join(json.dumps({"reviewerID": f"U{n % 7}", "asin": f"B{n % 5}", "overall": 5.0,
                                        "unixReviewTime": 1_500_000_000 + n}) + "\n" for n in range(60)))
    args = ["prep", "amazon", "--name", "mine", "--reviews", str(path), "--out", str(tmp_path)]
    assert main(args) == 0
    folder = tmp_path / "mine"
    made = _digests(str(folder))
    assert set(made) == {"mine.inter", "mine.item", "mine.amazon.json"}
    assert main(args) == 0 and _digests(str(folder)) == made  # the same settings: nothing rewritten
    assert main([*args, "--k_core", "2"]) == 2  # other settings: refused, files kept
    assert "other settings" in capsys.readouterr().err and _digests(str(folder)) == made
    assert main([*args, "--k_core", "2", "--force"]) == 0 and _digests(str(folder)) != made


def test_a_folder_with_only_split_files_is_not_given_the_embedded_copy(tmp_path):
    from recbole_llmfuse import Config
    from recbole_llmfuse.data import prepare_folder

    folder = tmp_path / "ml-100k"
    folder.mkdir()
    for part in ("train", "valid", "test"):
        (folder / f"ml-100k.{part}.inter").write_text(INTER_HEAD + _rows())
    before = _digests(str(folder))
    config = Config("FastSASRec", "ml-100k", config_dict={"data_path": str(tmp_path), "state": "WARNING",
                                                          "benchmark_filename": ["train", "valid", "test"]}, argv=[])
    prepare_folder(config)
    assert _digests(str(folder)) == before


# -- literal atomic files ------------------------------------------------------------------------------------

QUOTED = ['"Great Performances" Cats', 'Rock "n" Roll, part 2', '"Quoted"']


def _quoted_world(root: str) -> str:
    write_walks(root, "ml", users=30, items=12)
    folder = os.path.join(root, "ml")
    lines = open(os.path.join(folder, "ml.item"), encoding="utf-8").read().splitlines()
    head, rows = lines[0], lines[1:]
    for n, title in enumerate(QUOTED):  # the first items get MovieLens-style quoted titles
        fields = rows[n].split("\t")
        fields[1] = title
        rows[n] = "\t".join(fields)
    with open(os.path.join(folder, "ml.item"), "wb") as f:
        f.write(b"\xef\xbb\xbf" + ("\n".join([head, *rows]) + "\n").encode("utf-8"))  # and a BOM, as Excel writes
    return folder


def test_quoted_titles_load_literally_and_reach_the_embedding_text_verbatim(tmp_path, caplog):
    from recbole_llmfuse import Config, create_dataset
    from recbole_llmfuse.dataset_prep.item_text import build_item_texts

    folder = _quoted_world(str(tmp_path))
    config = Config("FastSASRec", "ml", config_dict={"data_path": str(tmp_path), "state": "WARNING",
                                                     "load_col": None}, argv=[])
    dataset = create_dataset(config)
    assert "title" in dataset.field2type and dataset.item_num == 13  # 12 items + padding: no row swallowed
    titles = {dataset.id2token("item_id", i): " ".join(dataset.id2token("title", t) for t in row if t)
              for i, row in enumerate(dataset.item_feat["title"].tolist()) if i}
    assert [titles[f"i{n}"] for n in (1, 2, 3)] == [" ".join(t.split()) for t in QUOTED]
    assert any("byte-order mark" in r.message for r in caplog.records)
    texts = build_item_texts(folder, "ml", "{title}", None, None)
    by_id = dict(zip(texts.tokens, texts.texts))
    assert [by_id[f"i{n}"] for n in (1, 2, 3)] == QUOTED


@pytest.mark.parametrize("model", ["SASRec", "MoRec"])
def test_quoted_titles_train_sasrec_and_morec(tmp_path, model):
    from recbole_llmfuse import Config
    from recbole_llmfuse.quick_start import execute

    _quoted_world(str(tmp_path))
    run = execute(Config(model, "ml", config_dict={
        "data_path": str(tmp_path), "state": "WARNING", "epochs": 2, "show_progress": False, "hidden_size": 32,
        "inner_size": 64, "n_heads": 2, "MAX_ITEM_LIST_LENGTH": 10,
        "item_text_embedding": {"model": "all-MiniLM-L6-v2", "item_text_fields": ["title"]}}, argv=[]), verbose=False)
    assert np.isfinite(run.test_result["ndcg@10"])


# -- settings: unknown keys, strict result line --------------------------------------------------------------


def test_allow_unknown_keys_lets_a_setting_of_ones_own_through_and_the_result_line_is_strict_json(tmp_path, capsys):
    from recbole_llmfuse.cli import main

    data = str(tmp_path / "data")
    write_walks(data, "w", users=12, items=10)
    base = ["run", "--model=FastSASRec", "--dataset=w", f"--data_path={data}", "--epochs=1", "--state=WARNING",
            "--show_progress=False", "--my_models_setting=3"]
    assert main(base) == 2
    assert "unknown setting 'my_models_setting'" in capsys.readouterr().err
    assert main([*base, "--allow_unknown_keys"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("result: "))

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    summary = json.loads(line[len("result: "):], parse_constant=refuse)
    assert summary["model"] == "FastSASRec" and 0 <= summary["test_result"]["ndcg@10"] <= 1


def _keys_in_readme_commands() -> set:
    """``--key=value`` settings of the run / bench / tune commands in the README and docs/ (the commands' own flags
    aside)."""
    import argparse

    from recbole_llmfuse import bench, tune
    from recbole_llmfuse.cli import _add_run_arguments

    flags = set()
    for add in (_add_run_arguments, bench.add_arguments, tune.add_arguments):
        parser = argparse.ArgumentParser()
        add(parser)
        flags |= {o.lstrip("-") for o in parser._option_string_actions}
    pages = [os.path.join(ROOT, "README.md")] + [p for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                       recursive=True) if "specs" not in p]
    text = "\n".join(open(p, encoding="utf-8").read() for p in pages)
    keys = set()
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if re.search(r"\b(run_recbole|recbole-llmfuse (run|bench|tune))\b", line):
                keys |= set(re.findall(r"(?<![\w-])--([A-Za-z_][\w.]*)=", line)) - flags
    return keys


def _keys_in_python_examples() -> set:
    """Keys of the settings dicts the examples pass to Config (``config_dict={...}`` and the dicts merged
    into it by name)."""
    keys = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "examples")):
        for name in files:
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
            named = {t.id: node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                     for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Dict)}

            def top_keys(d):
                for k, v in zip(d.keys, d.values):
                    if isinstance(k, ast.Constant) and isinstance(k.value, str):
                        keys.add(k.value)
                    elif k is None and isinstance(v, ast.Name) and v.id in named:  # **common
                        top_keys(named[v.id])

            for node in ast.walk(tree):
                if isinstance(node, ast.keyword) and node.arg == "config_dict" and isinstance(node.value, ast.Dict):
                    allowed = any(isinstance(k, ast.Constant) and k.value == "allow_unknown_keys"
                                  for k in node.value.keys)
                    if not allowed:  # a file with a model of its own says so
                        top_keys(node.value)
    return keys


def _keys_in_yaml_files() -> set:
    import yaml

    keys = set()
    for base in ("examples", "properties"):
        for folder, _, files in os.walk(os.path.join(ROOT, base)):
            if os.path.basename(folder) == "hooks":  # a hook's parameters live under its name, not at the top
                continue
            for name in files:
                if name.endswith((".yaml", ".yml")):
                    data = yaml.safe_load(open(os.path.join(folder, name), encoding="utf-8"))
                    if os.path.basename(folder) == "papers":  # bench plans: their settings are the run's
                        data = data.get("settings") or {}
                    keys |= set(data) if isinstance(data, dict) else set()
    return keys


def test_every_setting_our_docs_and_examples_use_passes_the_unknown_key_check():
    from recbole_llmfuse.config import known_keys

    readme, examples, yamls = _keys_in_readme_commands(), _keys_in_python_examples(), _keys_in_yaml_files()
    assert len(readme) > 10 and len(examples) > 10 and len(yamls) > 30  # the collectors found the settings
    unknown = {k for k in readme | examples | yamls if k not in known_keys()}
    assert not unknown, unknown
    assert "learnin_rate" not in known_keys() and "learning_rate" in known_keys()


# -- a paper recipe end to end: Prime Pantry 2018 in the real format -> prep amazon --recipe pad -> PAD ---------


def _pantry_2018(folder) -> tuple:
    """``Prime_Pantry.json.gz`` and ``meta_Prime_Pantry.json.gz`` as the 2018 dump writes them: JSON lines with
    HTML in texts, unicode, a quoted title, a duplicate review, low ratings PAD drops, a broken line."""
    import random

    rng = random.Random(0)
    reviews = []
    for u in range(60):
        for k in range(rng.randint(4, 40)):
            reviews.append({"reviewerID": f"A{u:04d}XYZ", "asin": f"B00{(u * 3 + k * 7) % 45:05d}",
                            "overall": float(rng.choice([5, 5, 4, 4, 3, 2])), "unixReviewTime": 1_400_000_000 + u * 997 + k * 86400,
                            "reviewText": "Tasty &amp; cheap — très bon ☺", "verified": True, "vote": "2"})
    lines = [json.dumps(r, ensure_ascii=False) for r in reviews]
    lines.insert(10, lines[3])  # the same review twice
    lines.insert(20, '{"reviewerID": "A9999", "asin": "B00')  # a line cut short
    meta = [json.dumps({"asin": f"B00{i:05d}", "title": (f'"Organic" Peanut Butter &amp; Jelly <b>#{i}</b>' if i % 9 == 0
                                                          else f"Café Crème Snack {i}"),
                        "brand": ["Planters", "Kind", ""][i % 3], "category": ["Prime Pantry", "Snacks"],
                        "description": ["<p>Crunchy &amp; sweet</p>", "Ships in 1–2 days"], "price": f"${i % 7 + 1}.99"},
                       ensure_ascii=False) for i in range(45)]
    paths = []
    for name, rows in (("Prime_Pantry.json.gz", lines), ("meta_Prime_Pantry.json.gz", meta)):
        path = os.path.join(folder, name)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
        paths.append(path)
    return paths[0], paths[1], reviews


def test_prep_amazon_recipe_pad_then_the_printed_command_trains_pad(tmp_path, capsys):
    import shlex
    from collections import Counter

    from recbole_llmfuse.cli import main

    reviews_path, meta_path, reviews = _pantry_2018(str(tmp_path))
    out = str(tmp_path / "dataset")
    assert main(["prep", "amazon", "--name", "pantry", "--recipe", "pad", "--reviews", reviews_path, "--meta",
                 meta_path, "--out", out, "--skip_bad_lines"]) == 0
    printed = capsys.readouterr().out
    assert "recipe pad: PAD App. A" in printed and "min_rating=4.0, user_k=5, item_k=0" in printed and "last_n=23" in printed
    assert "| PAD paper, Table 1 | 12,871 | 8,347 | 115,004 |" in printed  # the paper's row beside ours
    # PAD's filters by hand: ratings > 3, duplicates dropped, users >= 5, each user's latest 23
    kept = {}
    for r in reviews:
        if r["overall"] > 3:
            kept.setdefault(r["reviewerID"], {}).setdefault(r["asin"], r["unixReviewTime"])
    expected = sum(min(len(v), 23) for v in kept.values() if len(v) >= 5)
    inter = open(os.path.join(out, "pantry", "pantry.inter"), encoding="utf-8").read().splitlines()
    assert len(inter) - 1 == expected and max(Counter(l.split("\t")[0] for l in inter[1:]).values()) == 23
    item = open(os.path.join(out, "pantry", "pantry.item"), encoding="utf-8").read()
    assert '"Organic" Peanut Butter & Jelly #' in item and "Café Crème" in item and "<b>" not in item
    command = next(l for l in printed.splitlines() if "run_recbole --model=PAD" in l).split("train with: ")[1]
    argv = shlex.split(command)[1:] + ["--epochs=1", "--state=WARNING", "--show_progress=False", "--hidden_size=32",
                                       "--inner_size=64", "--n_heads=2"]
    assert main(["run", *argv]) == 0
    result = json.loads(next(l for l in capsys.readouterr().out.splitlines() if l.startswith("result: "))[8:])
    assert result["model"] == "PAD" and np.isfinite(result["test_result"]["ndcg@10"])


def test_recipe_filters_by_hand_single_pass_k_core_and_cap_before_core():
    from recbole_llmfuse.dataset_prep.amazon import RECIPES, _k_core, _last_n

    # u1's three items; i9 seen once (by u2): one 3/3 pass drops (u2, i9) and nothing else, though u2 is then
    # left with 2 rows; the iterated core also drops u2's other rows (and then i1 falls below 3 ...)
    rows = [("u1", "i1", 5, 1), ("u1", "i2", 5, 2), ("u1", "i3", 5, 3), ("u2", "i1", 5, 1), ("u2", "i2", 5, 2),
            ("u2", "i9", 5, 3), ("u3", "i1", 5, 1), ("u3", "i2", 5, 2), ("u3", "i3", 5, 3), ("u4", "i3", 5, 4)]
    one = _k_core(rows, 3, 3, passes=1)
    assert ("u2", "i9", 5, 3) not in one and ("u2", "i1", 5, 1) in one and ("u4", "i3", 5, 4) not in one
    assert all(r[0] != "u2" for r in _k_core(rows, 3, 3))  # iterated: u2 has 2 rows after the first pass
    assert RECIPES["faerec"]["options"]["k_core_passes"] == 1 and RECIPES["pte"]["options"]["k_core_passes"] == 1
    # HDRec: the cap comes first, by time (not file order): u's last 2 of 4, then the core
    hist = [("u", "a", 5, 4), ("u", "b", 5, 1), ("u", "c", 5, 3), ("u", "d", 5, 2)]
    assert [r[1] for r in _last_n(hist, 2)] == ["c", "a"]
    assert RECIPES["hdrec"]["options"]["cap_first"] and RECIPES["hdrec"]["options"]["last_n"] == 30
