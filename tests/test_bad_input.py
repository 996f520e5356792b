"""Bad input: malformed atomic files stop before RecBole parses them, with one line naming file, line and field."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from recbole_llmfuse import Config, create_dataset
from recbole_llmfuse.atomic import AtomicFileError, check_atomic_file, read_header
from recbole_llmfuse.dataset_prep.item_text import build_item_texts

INTER = "user_id:token\titem_id:token\ttimestamp:float\n"
GOOD_ROWS = "".join(f"u{u}\ti{(u * 7 + t) % 30}\t{100 * u + t}\n" for u in range(1, 21) for t in range(6))
ITEM = "item_id:token\ttitle:token_seq\n" + "".join(f"i{i}\twidget {i}\n" for i in range(30))

#: (case, .inter text, .item text, words the one-line message must hold)
CASES = [
    ("extra field", INTER + GOOD_ROWS + "u1\ti1\t5\textra\n", ITEM, ["line 122", "4 tab-separated fields", "header has 3"]),
    ("missing field", INTER + "u1\ti1\n" + GOOD_ROWS, ITEM, ["line 2", "2 tab-separated fields"]),
    ("non-numeric timestamp", INTER + GOOD_ROWS + "u1\ti2\tyesterday\n", ITEM,
     ["line 122", "field timestamp", "'yesterday' is not a number"]),
    ("empty timestamp", INTER + "u1\ti3\t\n" + GOOD_ROWS, ITEM, ["line 2", "field timestamp: empty", "Give every row its time"]),
    ("header without type", "user_id\titem_id:token\ttimestamp:float\n" + GOOD_ROWS, ITEM,
     ["line 1, column 1", "name:type", "fix the header line"]),
    ("unknown type", "user_id:token\titem_id:int\ttimestamp:float\n" + GOOD_ROWS, ITEM, ["column 2 'item_id:int'"]),
    ("header only", INTER, ITEM, ["a header and no rows"]),
    ("empty file", "", ITEM, ["empty file", "header such as"]),
    ("tab inside an item title", INTER + GOOD_ROWS, ITEM + "i31\twidget\twith a tab\n", [".item, line 32", "a tab inside"]),
    ("non-numeric float_seq", INTER + GOOD_ROWS, "item_id:token\tvec:float_seq\n" + "".join(f"i{i}\t1 2 x\n" for i in range(30)),
     ["field vec", "'x' is not a number", "float_seq"]),
]


def _write(root, name, inter, item):
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    for suffix, text in (("inter", inter), ("item", item)):
        with open(os.path.join(folder, f"{name}.{suffix}"), "w") as f:
            f.write(text)
    return folder


def _digests(folder):
    """Every file's SHA-256 (a hook's empty lock file aside: it stays by design, for the next producer)."""
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))
            if not f.endswith(".lock")}


@pytest.mark.parametrize("case,inter,item,words", CASES, ids=[c[0] for c in CASES])
def test_malformed_atomic_file_stops_with_file_line_field_and_fix(tmp_path, capsys, case, inter, item, words):
    from recbole_llmfuse.cli import run_recbole_main

    folder = _write(str(tmp_path), "bad", inter, item)
    before = _digests(folder)
    with pytest.raises(AtomicFileError) as err:  # a bad header already stops the config (it reads the header)
        create_dataset(Config("FastSASRec", "bad", config_dict={"data_path": str(tmp_path), "state": "WARNING"}, argv=[]))
    message = str(err.value)
    assert "\n" not in message and os.path.join(folder, "bad.") in message
    for word in words:
        assert word in message
    capsys.readouterr()
    assert run_recbole_main(["--model=FastSASRec", "--dataset=bad", f"--data_path={tmp_path}"]) == 2  # the command
    assert capsys.readouterr().err.strip() == f"run_recbole: error: {message}"
    assert _digests(folder) == before  # nothing written beside the user's files


def test_the_cli_says_it_in_one_line_with_exit_2(tmp_path):
    _write(str(tmp_path), "bad", INTER + GOOD_ROWS + "u1\ti2\tyesterday\n", ITEM)
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "run_recbole"), "--model=FastSASRec",
                           "--dataset=bad", f"--data_path={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    # one line, and it comes before any configuration dump
    assert proc.stderr.strip().count("\n") == 0 and not proc.stdout.strip(), proc.stderr[:500]
    assert "run_recbole: error:" in proc.stderr and "bad.inter, line 122, field timestamp" in proc.stderr


def test_empty_float_outside_the_time_field_is_counted_not_refused(tmp_path):
    path = os.path.join(_write(str(tmp_path), "ok", INTER + GOOD_ROWS, ITEM), "ok.inter")
    with open(path, "a") as f:
        f.write("u1\ti4\t\n")
    assert check_atomic_file(path)["defaulted"] == 1  # a general model: RecBole's mean fill, with a warning
    with pytest.raises(AtomicFileError, match="field timestamp: empty"):
        check_atomic_file(path, time_field="timestamp")
    assert read_header(path) == [("user_id", "token"), ("item_id", "token"), ("timestamp", "float")]


def test_a_good_dataset_passes_and_a_single_text_field_is_one_column(tmp_path):
    folder = _write(str(tmp_path), "ok", INTER + GOOD_ROWS, "item_id:token\ttitle:token_seq\tbrand:token\n"
                    + "".join(f"i{i}\twidget {i}\tacme\n" for i in range(30)))
    config = Config("FastSASRec", "ok", config_dict={"data_path": str(tmp_path), "state": "WARNING"}, argv=[])
    assert create_dataset(config).inter_num == 120
    # --item_text_fields=title on a command line arrives as one string: one column, not its characters
    assert build_item_texts(folder, "ok", fields="title").texts[3] == "title: widget 3"
    assert build_item_texts(folder, "ok", fields="title, brand").texts[3] == "title: widget 3; brand: acme"


def test_converter_text_keeps_quotes_and_never_holds_a_tab():
    from recbole_llmfuse.dataset_prep.amazon import clean_text

    # atomic fields are literal: the quotes are the title's (RecBole's reader takes them as written)
    assert clean_text('"Quoted"\ttitle\nsecond line', 100) == '"Quoted" title second line'


def _reviews(path, records):
    import gzip
    import json

    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def test_converter_refuses_an_empty_result_and_keeps_the_earlier_output(tmp_path):
    from recbole_llmfuse.config import ConfigError
    from recbole_llmfuse.dataset_prep.amazon import AmazonOptions, convert

    reviews = _reviews(tmp_path / "r.json.gz", [
        {"reviewerID": f"U{u}", "asin": f"B{(u + k) % 6}", "overall": 5.0, "unixReviewTime": 1000 * u + k}
        for u in range(5) for k in range(4)])
    meta = _reviews(tmp_path / "m.json.gz", [{"asin": f"B{j}", "title": f"bar {j}" if j else ""} for j in range(6)]
                    + [{"asin": "B2", "title": "a later title", "brand": "Acme"}, {"asin": "B3\tx", "title": "tab id"}])
    report = convert("p", reviews, meta, str(tmp_path / "out"), AmazonOptions(drop_no_title=True))
    assert report.items_without_title == 1 and report.items_dropped_no_title == 1 and report.merged_metadata == 1
    assert "1 dropped (--drop_no_title)" in report.table()
    folder = tmp_path / "out" / "p"
    rows = {line.split("\t")[0]: line.split("\t") for line in (folder / "p.item").read_text().splitlines()[1:]}
    assert rows["B2"][1:3] == ["bar 2", "Acme"]  # first non-empty value per field: the title stays, the brand is added
    (folder / "p.itememb").write_text("mine")  # a user's file beside the dataset
    before = _digests(str(folder))
    with pytest.raises(ConfigError, match=r"no review kept \(20 records read.*Is --version 2023 right.*Nothing was written"):
        convert("p", reviews, meta, str(tmp_path / "out"), AmazonOptions(version="2023", skip_bad_lines=True),
                force=True)  # even when asked to replace it
    assert _digests(str(folder)) == before


def test_written_files_follow_the_umask(tmp_path):
    from recbole_llmfuse.files import atomic_write, temp_dir

    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "f.npz"), lambda f: f.write(b"x"))
        folder = temp_dir(str(tmp_path), ".t-")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f.npz").st_mode & 0o777 == 0o644 and os.stat(folder).st_mode & 0o777 == 0o755


def test_a_report_whose_drawing_fails_leaves_the_old_plot_and_no_temp_file(tmp_path):
    from recbole_llmfuse.files import png_figure, write_csv

    path = tmp_path / "plot.png"
    with png_figure(str(path), figsize=(2, 2)) as (_, ax):
        ax.plot([1, 2], [3, 4])
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError):
        with png_figure(str(path)) as (_, ax):
            ax.plot([1], [2])
            raise KeyError("a row without the column")
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["plot.png"]
    write_csv(str(tmp_path / "t.csv"), [{"a": 1, "b": 2, "x": 0}], ["a", "b"], extrasaction="ignore")
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b", "1,2"]


def test_items_that_all_fall_back_to_the_default_text_are_refused(tmp_path):
    from recbole_llmfuse.dataset_prep.embed import ItemTextEmbeddingHook
    from recbole_llmfuse.dataset_prep.hooks import PrepError

    folder = _write(str(tmp_path), "blank", INTER + GOOD_ROWS, "item_id:token\ttitle:token_seq\n" + "".join(f"i{i}\t\n" for i in range(30)))
    with pytest.raises(PrepError, match=r"blank.item: no item has text .*allow_all_fallback=true"):
        ItemTextEmbeddingHook(folder, "blank", {"device": "cpu", "formats": ["npz"]}).run(progress=False)
    assert not any(f.endswith(".npz") for f in os.listdir(folder))


def test_debug_keeps_the_traceback(tmp_path):
    from recbole_llmfuse.cli import run_recbole_main

    _write(str(tmp_path), "bad", INTER, ITEM)
    with pytest.raises(AtomicFileError, match="a header and no rows"):  # raised, not turned into one line
        run_recbole_main(["--model=FastSASRec", "--dataset=bad", f"--data_path={tmp_path}", "--debug"])


def test_logs_and_checkpoints_go_to_output_dir_and_a_read_only_folder_falls_back(tmp_path, monkeypatch):
    from recbole_llmfuse.config import output_dir

    _write(str(tmp_path), "ok", INTER + GOOD_ROWS, ITEM)
    from recbole_llmfuse.cli import run_recbole_main

    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run_recbole_main(["--model=FastSASRec", "--dataset=ok", f"--data_path={tmp_path}", "--epochs=1",
                             f"--output_dir={out}", "--hidden_size=16", "--inner_size=32",
                             "--MAX_ITEM_LIST_LENGTH=5", "--show_progress=False"]) == 0
    assert sorted(os.listdir(out)) == ["log", "log_tensorboard", "saved"] and os.listdir(work) == []
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root: chmod cannot make it read-only
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    assert output_dir() == str(home / ".cache" / "recbole_llmfuse") and os.path.isdir(output_dir())


def test_command_line_values_are_read_as_users_write_them():
    from recbole_llmfuse.cli import _hook_value

    assert _hook_value("{movie_title}") == "{movie_title}"  # a template, not a YAML mapping
    assert _hook_value("The movie {movie_title} ({release_year})") == "The movie {movie_title} ({release_year})"
    assert _hook_value("[movie_title, class]") == ["movie_title", "class"] and _hook_value("movie_title") == "movie_title"


NASTY = ['"Quoted" start', 'tab\tinside', 'new\nline', "back\\slash and 'single'", "HTML &amp; <i>tags</i>",
         "ünïcödé № ☺", '  spaces   everywhere  ', 'ends with quote"', "percent % and {braces}"]


def test_converter_output_reads_back_exactly_in_recbole(tmp_path):
    from recbole_llmfuse.dataset_prep.amazon import AmazonOptions, clean_text, convert

    reviews = _reviews(tmp_path / "r.json.gz", [
        {"reviewerID": f"U{u}", "asin": f"B{(u + k) % len(NASTY)}", "overall": 5.0, "unixReviewTime": 1000 * u + k}
        for u in range(12) for k in range(6)])
    meta = _reviews(tmp_path / "m.json.gz", [{"asin": f"B{j}", "title": t, "brand": t} for j, t in enumerate(NASTY)])
    convert("nasty", reviews, meta, str(tmp_path), AmazonOptions())
    config = Config("FastSASRec", "nasty", argv=[], config_dict={
        "data_path": str(tmp_path), "state": "WARNING",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title", "brand"]}})
    dataset = create_dataset(config)
    for j, text in enumerate(NASTY):
        row = dataset.token2id("item_id", f"B{j}")
        title = dataset.item_feat["title"][row]
        words = [dataset.id2token("title", t) for t in title.tolist() if t]
        assert " ".join(words) == clean_text(text, 2000)  # every word back, in order; nothing swallowed
        assert dataset.id2token("brand", dataset.item_feat["brand"][row][0].item()) == clean_text(text, 2000).split()[0]


def _empty_npz(folder):
    import numpy as np

    np.savez(os.path.join(folder, "ok.itememb.npz"), item_id=np.array([], dtype=str), embedding=np.zeros((0, 4), np.float32))


def _text_table(text):
    def write(folder):
        with open(os.path.join(folder, "ok.itememb"), "w") as f:
            f.write(text)
    return write


TABLE_CASES = [  # (case, writes the user's table file, extra overrides, words of the one line)
    ("empty npz", _empty_npz, [], ["ok.itememb.npz", "no row matches an item", "Re-run the embedding step"]),
    ("text table with only a header", _text_table("iid:token\titem_emb:float_seq\n"), ["--item_emb_format=text"],
     ["ok.itememb", "no row matches an item"]),
    ("non-numeric vector value", _text_table("iid:token\titem_emb:float_seq\ni1\t0.1 x 0.3\n"), ["--item_emb_format=text"],
     ["ok.itememb, line 2", "'x'", "not a number"]),
    ("missing text column", None, ["--item_text_embedding={item_text_fields: [no_such_col]}"],
     ["item_text_fields names ['no_such_col']", "ok.item does not have", "its columns"]),
]


@pytest.mark.parametrize("case,write,extra,words", TABLE_CASES, ids=[c[0] for c in TABLE_CASES])
def test_bad_feature_tables_and_text_settings_stop_in_one_line(tmp_path, capsys, case, write, extra, words):
    from recbole_llmfuse.cli import run_recbole_main

    folder = _write(str(tmp_path), "ok", INTER + GOOD_ROWS, ITEM)
    if write:
        write(folder)
    before = _digests(folder)
    code = run_recbole_main(["--model=MoRec", "--dataset=ok", f"--data_path={tmp_path}", "--state=ERROR", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("run_recbole: error: ")
    for word in words:
        assert word in err[-1]
    assert _digests(folder) == before
