"""The GPU check script (examples/gpu/check.py) in its --dry mode: tiny shapes on the CPU, every section measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "gpu", "check.py")


def test_gpu_check_dry_run_measures_every_section(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--dry", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["what"]: r for r in json.load(open(tmp_path / "gpu_check.json"))["rows"]}
    assert rows["FastSASRec epoch (walks)"]["s"] > 0 and rows["RecBole SASRec epoch (walks)"]["ratio"] > 0
    assert rows["HDRec step, tiny"]["tokens_per_s"] > 0 and rows["PtE hf generation, tiny"]["tokens_per_s"] > 0
    assert rows["llm2vec embedding, tiny"]["items_per_s"] > 0
    assert all(r["peak_mib"] > 0 for r in rows.values())
    assert "| HDRec step, tiny |" in (tmp_path / "gpu_check.md").read_text()
