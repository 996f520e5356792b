"""Ray Tune sweeps: search-space files, per-epoch reports, ASHA stops, failure isolation, best.yaml reproduces."""
from __future__ import annotations

import csv
import math
import os

import pytest
import yaml
from PIL import Image

from recbole_llmfuse import run_recbole
from recbole_llmfuse.config import ConfigError
from recbole_llmfuse.tune import parse_space, run_tune

from conftest import SMALL, TINY, TINY_LEARN

SMALL_MODEL = ["--MAX_ITEM_LIST_LENGTH=10", "--hidden_size=16", "--inner_size=32", "--n_heads=2",
               "--valid_metric=NDCG@10", "--stopping_step=10", "--train_batch_size=1024", "--eval_batch_size=4096"]


def _small_data(path):
    return [f"--data_path={path}", "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}"]


def test_space_files_yaml_and_recbole_hyperopt_format(tmp_path):
    y = tmp_path / "space.yaml"
    y.write_text("learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\nhidden_size: {choice: [32, 64]}\n"
                 "n_layers: {randint: [1, 4]}\nmmd_weight: {quniform: [0, 1, 0.1]}\n")
    assert parse_space(str(y)) == {"learning_rate": {"loguniform": [1e-4, 1e-2]}, "hidden_size": {"choice": [32, 64]},
                                   "n_layers": {"randint": [1, 4]}, "mmd_weight": {"quniform": [0, 1, 0.1]}}
    h = tmp_path / "model.hyper"
    h.write_text("learning_rate loguniform -8,0\nembedding_size choice [64,96]\n"
                 "mlp_hidden_size choice ['[64,64]','[128]']\ndropout_prob uniform 0.1,0.5\n")
    space = parse_space(str(h))
    assert space["learning_rate"]["loguniform"] == pytest.approx([math.exp(-8), 1.0])
    assert space["embedding_size"] == {"choice": [64, 96]}
    assert space["mlp_hidden_size"] == {"choice": [[64, 64], [128]]}
    assert space["dropout_prob"] == {"uniform": [0.1, 0.5]}
    bad = tmp_path / "bad.hyper"
    bad.write_text("learning_rate loguniform -8,0\nhidden_size between 1,2\n")
    with pytest.raises(ConfigError, match="line 2"):
        parse_space(str(bad))
    bad.write_text("learning_rate: {uniform: [0.1]}\n")
    with pytest.raises(ConfigError, match="uniform takes 2 numbers"):
        parse_space(str(bad))


def test_shipped_example_spaces_parse_and_convert():
    """Every space under examples/tune/ parses and converts to Ray Tune domains."""
    import glob
    import os

    from recbole_llmfuse.tune import to_tune

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "tune")
    files = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert {os.path.basename(f) for f in files} >= {"SASRec.yaml", "PAD.yaml", "FAERec.yaml"}
    for path in files:
        space = parse_space(path)
        assert space and set(to_tune(space)) == set(space), path
    assert 0.0 in parse_space(os.path.join(root, "FAERec.yaml"))["align_alpha"]["choice"]


def test_one_sweep_reports_every_epoch_asha_cuts_a_bad_trial_and_a_failing_trial_fails_alone(tiny_world, tmp_path, local_ray,
                                                                                               monkeypatch):
    """Three trials, one at a time in grid order on the tiny world: a good learning rate (completes, one report per
    epoch, its best.yaml reproduces its score), one that learns nothing (ASHA stops it at a rung, against the good
    trial's score there) and an invalid one (the trial fails; the sweep goes on). The data path is given relative to
    the working folder, as users type it (trials run in folders of their own)."""
    monkeypatch.chdir(os.path.dirname(tiny_world))
    overrides = [f"--{k}={v}" for k, v in TINY_LEARN.items() if k not in ("learning_rate", "epochs", "seed")] + [
        f"--data_path={os.path.basename(tiny_world)}", "--epochs=3", "--seed=7", "--valid_metric=NDCG@10"]
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {grid_search: [0.005, 1.0e-7, -1.0]}\n")
    out = tmp_path / "sweep"
    result = run_tune("FastSASRec", TINY, str(space), str(out), [], overrides, scheduler="asha", metric="ndcg@10",
                      grace_period=1, reduction_factor=2, max_concurrent=1)
    rows = {r["learning_rate"]: r for r in result["rows"]}
    good, bad, broken = rows[0.005], rows[1e-7], rows[-1.0]
    assert good["status"] == "completed" and good["epochs"] == 3
    with open(f"{good['log_dir']}/progress.csv") as f:  # one report per epoch, from inside the training loop
        epochs = [int(float(x["epoch"])) for x in csv.DictReader(f) if x["fit_done"] in ("0", "0.0")]
    assert epochs == [1, 2, 3]
    assert bad["status"] == "stopped" and bad["epochs"] < 3 and result["stopped_early"] == 1
    assert broken["status"] == "failed" and "learning_rate -1.0: must be a number > 0" in broken["error"] and result["failed"] == 1
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"] == "FastSASRec" and best["dataset"] == TINY and best["learning_rate"] == 0.005 and best["seed"] == 7
    assert Image.open(out / "curves.png").size[0] > 100 and (out / "results.md").exists()
    rerun = run_recbole(config_file_list=[str(out / "best.yaml")], argv=[])  # model/dataset from the file
    assert rerun["best_valid_result"]["ndcg@10"] == pytest.approx(good["best_ndcg@10"], abs=2e-3)


@pytest.mark.integration
def test_sweep_and_embedding_pool_join_a_running_cluster(small_data_path, folder, tmp_path):
    """``tune --address`` and ``prep embed ray_address=``: a Ray head started on its own (``ray start``), as on a
    cluster; the sweep's trial and the embedding actors run there (each command in its own process, as users
    run them), and the commands leave the cluster up."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    import numpy as np

    from recbole_llmfuse.dataset_prep.embed import ItemTextEmbeddingHook

    # ray.init() exports settings of this process's local Ray of earlier tests (RAY_AUTH_MODE=token, ...): the head
    # and the commands get a user's shell environment instead. Ray >= 2.5x heads default to token authentication,
    # which a driver joins with RAY_AUTH_MODE=token (README); this private head and its drivers opt out.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONBREAKPOINT"},
           "RAY_AUTH_MODE": "disabled"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = os.path.dirname(sys.executable)
    # --block: this head's processes end with the CLI (`ray stop` would stop every Ray on the machine)
    head = subprocess.Popen([os.path.join(bin_dir, "ray"), "start", "--head", "--block", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    address = f"127.0.0.1:{port}"
    cli = os.path.join(bin_dir, "recbole-llmfuse")
    try:
        deadline = time.time() + 180
        while True:  # the GCS port answers once the head is up
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
                time.sleep(1)
        space = tmp_path / "space.yaml"
        space.write_text("learning_rate: {grid_search: [0.004]}\n")
        out = tmp_path / "cluster"
        sweep = subprocess.run([cli, "tune", "--model", "FastSASRec", "--dataset", SMALL, "--space", str(space),
                                "--scheduler", "fifo", "--address", address, "--out", str(out), "--epochs=1",
                                *SMALL_MODEL, *_small_data(small_data_path)], capture_output=True, text=True, timeout=600, env=env)
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        assert "cluster at address: " in sweep.stderr + sweep.stdout and f":{port}" in sweep.stderr + sweep.stdout
        with open(out / "results.csv") as f:
            rows = list(csv.DictReader(f))
        assert rows[0]["status"] == "completed" and float(rows[0]["best_ndcg@10"]) > 0
        embed = subprocess.run([cli, "prep", "embed", "--dataset", SMALL, "--data_path", os.path.dirname(folder),
                                "device=cpu", "formats=[npz]", "ray_workers=2", f"ray_address={address}"],
                               capture_output=True, text=True, timeout=600, env=env)
        assert embed.returncode == 0, embed.stderr[-3000:]
        table = np.load(os.path.join(folder, f"{SMALL}.itememb.npz"))["embedding"]
        local = tmp_path / "local" / SMALL  # the same hook run here, without Ray: the cluster's table, row for row
        shutil.copytree(folder, local, ignore=shutil.ignore_patterns(f"{SMALL}.itememb*", f".{SMALL}.*"))
        ItemTextEmbeddingHook(str(local), SMALL, {"device": "cpu", "formats": ["npz"]}).run(progress=False)
        np.testing.assert_allclose(table, np.load(local / f"{SMALL}.itememb.npz")["embedding"], atol=1e-5)
        assert head.poll() is None  # still up
    finally:
        head.terminate()
        head.wait(timeout=120)
        record = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")  # what `ray stop` would remove
        if os.path.exists(record) and open(record).read().strip().endswith(f":{port}"):
            os.remove(record)


def test_schedulers_by_name():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from recbole_llmfuse.tune import make_scheduler

    asha = make_scheduler("asha", max_t=2, grace_period=5)  # the grace period is clamped to the epoch cap
    assert isinstance(asha, ASHAScheduler) and isinstance(make_scheduler("fifo", max_t=2), FIFOScheduler)
    with pytest.raises(ConfigError, match="--scheduler hyperband: use asha or fifo"):
        make_scheduler("hyperband", max_t=2)
