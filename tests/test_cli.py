"""The installed commands, run as a user runs them (subprocesses in a temporary folder; message checks call the
entry points in process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)


def _run(*args, timeout=900):
    return subprocess.run([os.path.join(BIN, args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)


def _result(stdout: str) -> dict:
    line = [l for l in stdout.splitlines() if l.startswith("result: ")][-1]
    return json.loads(line[len("result: "):])


@pytest.mark.integration
def test_sasrec_on_embedded_ml100k_beats_random(tmp_path):
    proc = _run(
        "run_recbole", "--model=SASRec", "--dataset=ml-100k", "--epochs=1",
        "--MAX_ITEM_LIST_LENGTH=10", "--show_progress=False",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test result (SASRec on ml-100k): recall@10=" in proc.stdout
    result = _result(proc.stdout)
    random_recall = 10 / 1682  # a random ranker over ml-100k's items
    assert result["test_result"]["recall@10"] > 3 * random_recall
    assert result["test_result"]["ndcg@10"] > 0
    assert os.path.isfile(result["model_file"])
    # ml-100k was copied to a writable folder under ./dataset, not used in site-packages
    assert os.path.isfile(tmp_path / "dataset" / "ml-100k" / "ml-100k.inter")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model=NoSuchModel"], r"unknown model 'NoSuchModel'. Available models: .*FastSASRec.*SASRec"),
        (["--model=SASRec", "--dataset=no-such-data"], r"dataset 'no-such-data' not found: looked for .*no-such-data\.inter"),
        (["--model=SASRec", "--epochs"], r"malformed override '--epochs': overrides are written --key=value"),
        (["--model=SASRec", "epochs=2"], r"malformed override 'epochs=2'"),
        (["--model=SASRec", "--epochs=two"], r"override --epochs=two: expected a number \(the default is 300\)"),
    ],
)
def test_bad_input_fails_clearly(args, message, capsys):
    """The command's own entry point in this process (the console script itself: test_models_subcommand...)."""
    import re

    from recbole_llmfuse.cli import run_recbole_main

    assert run_recbole_main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_models_subcommand_lists_every_source():
    proc = _run("recbole-llmfuse", "models", timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = dict(line.split("\t") for line in proc.stdout.splitlines())
    assert rows["FastSASRec"] == "recbole-llmfuse" and rows["SASRec"] == "recbole"


def test_dict_and_list_overrides_are_read_as_users_write_them():
    """`--item_tokens={item_text_fields: [title, brand]}` (YAML flow, as in a config file) and Python literals both
    arrive as dicts/lists; plain strings stay strings."""
    from recbole_llmfuse import Config

    config = Config("FastSASRec", "ml-100k", argv=["--item_tokens={item_text_fields: [title, brand], max_attr_tokens: 8}",
                                                   "--sasrec_item_table={'epochs': 3}", "--topk=[5, 10]",
                                                   "--valid_metric=NDCG@10"])
    assert config["item_tokens"] == {"item_text_fields": ["title", "brand"], "max_attr_tokens": 8}
    assert config["sasrec_item_table"] == {"epochs": 3} and config["topk"] == [5, 10]
    assert config["valid_metric"] == "NDCG@10"
