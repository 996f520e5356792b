"""Every command shown in the README and docs/ runs, and the worked examples of docs/extending.md run.

Each logical line of a fenced ``bash`` block (``\\`` continuations joined) is one case, named by file and line:

* no marker: run here, in the default tier;
* ``# [integration]``: run in the integration tier;
* ``# [not run: why]``: skipped, with that reason in the report (installs, GPUs, files a user brings).

Commands run in a fresh folder whose ``dataset/ml-100k`` is a 300-user slice of MovieLens-100K (so
``--dataset=ml-100k`` is small) and that links the repository's ``examples/`` and ``scripts/``; training
commands get tiny settings (1 epoch, history 5, width 16), replacing the values they give.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from typing import List, Tuple

import pytest

from recbole_llmfuse.data import write_ml100k_slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(p for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
                              if os.sep + "specs" + os.sep not in p)
TRAINING = ("run_recbole", "recbole-llmfuse run", "recbole-llmfuse bench")
TINY = {"epochs": "1", "MAX_ITEM_LIST_LENGTH": "5", "hidden_size": "16", "inner_size": "32", "n_heads": "1",
        "show_progress": "False"}
NOT_RUN = re.compile(r"#.*\[not run: ([^\]]+)\]")


def _commands() -> List[Tuple[str, int, str]]:
    """``(file, line, command)`` of every command in a fenced bash block."""
    out = []
    for path in DOCS:
        full = os.path.join(ROOT, path)
        text = open(full, encoding="utf-8").read()
        for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
            first = text[: block.start()].count("\n") + 2
            lines = block.group(1).split("\n")
            i = 0
            while i < len(lines):
                j = i
                while lines[j].rstrip().endswith("\\") and j + 1 < len(lines):
                    j += 1
                command = "\n".join(lines[i: j + 1]).strip()
                if command and not command.startswith("#"):
                    out.append((os.path.relpath(full, ROOT), first + i, command))
                i = j + 1
    return out


def _param(path: str, line: int, command: str):
    marks = [pytest.mark.integration] if "[integration]" in command else []
    return pytest.param(command, marks=marks, id=f"{path}:{line}")


COMMANDS = _commands()


@pytest.fixture(scope="module")
def docs_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    write_ml100k_slice(str(folder / "dataset"), "ml-100k", users=300)
    for name in ("examples", "scripts"):
        os.symlink(os.path.join(ROOT, name), folder / name)
    return folder


def test_every_command_is_run_or_says_why_not():
    assert len(COMMANDS) >= 20  # the extraction found the docs' commands
    for path, line, command in COMMANDS:
        reason = NOT_RUN.search(command)
        assert reason is None or len(reason.group(1).strip()) > 5, f"{path}:{line}: say why it is not run"


@pytest.mark.parametrize("command", [_param(*c) for c in COMMANDS])
def test_docs_command(command, docs_folder):
    reason = NOT_RUN.search(command)
    if reason:
        pytest.skip(reason.group(1))
    shell = command.replace("\\\n", " ")
    shell = re.sub(r"\s+#.*$", "", shell)  # the trailing comment
    if shell.startswith(TRAINING):  # tiny settings: a value the command gives is replaced, the others appended
        for key, value in TINY.items():
            shell, given = re.subn(rf"--{key}=\S+", f"--{key}={value}", shell)
            shell += "" if given else f" --{key}={value}"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(shell, shell=True, cwd=docs_folder, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"$ {shell}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_extending_examples_run(tmp_path):
    """docs/extending.md's Python blocks (a model, a hook, a backbone), in order, in one fresh interpreter."""
    text = open(os.path.join(ROOT, "docs", "extending.md"), encoding="utf-8").read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if not b.startswith("# [not run")]
    assert len(blocks) == 3
    write_ml100k_slice(str(tmp_path / "dataset"), "ml-100k", users=300)
    (tmp_path / "examples.py").write_text("\n".join(blocks))
    proc = subprocess.run([sys.executable, "examples.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [line for line in proc.stdout.splitlines() if "ndcg@10" in line]
    assert len(results) == 3, proc.stdout[-2000:]
    assert (tmp_path / "dataset" / "ml-100k" / "ml-100k.hashvec.npz").is_file()  # the hook made its file
