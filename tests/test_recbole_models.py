"""RecBole's own models on our stack: graph models on today's scipy/torch, optional packages named."""
from __future__ import annotations

import importlib.util
import warnings

import pytest

from recbole_llmfuse import registry
from recbole_llmfuse.quick_start import run_recbole


@pytest.mark.integration
@pytest.mark.parametrize("model", ["LightGCN", "NGCF"])
def test_graph_models_train_an_epoch_on_ml100k_without_deprecated_calls(model, tmp_path):
    with warnings.catch_warnings():  # the shims replace the calls that warn (and dok_matrix._update, removed)
        warnings.filterwarnings("error", message=".*GradScaler.*")
        warnings.filterwarnings("error", message=".*sparse.SparseTensor.*")
        result = run_recbole(model=model, dataset="ml-100k", config_dict={
            "epochs": 1, "data_path": str(tmp_path), "state": "WARNING", "show_progress": False, "seed": 0}, argv=[])
    assert result["test_result"]["ndcg@10"] > 0.03  # a random ranker scores ~0.005 here


#: RecBole's context-aware protocol for its boosters: ratings >= 4 are positives, random split, AUC
BOOSTER_DATA = {"load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                             "user": ["user_id", "age", "gender", "occupation"], "item": ["item_id", "release_year", "class"]},
                "threshold": {"rating": 4}, "metrics": ["AUC", "LogLoss"], "valid_metric": "AUC", "epochs": 1,
                "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": None, "mode": "labeled"}}


@pytest.mark.parametrize("model, settings, metric, floor", [
    ("LightGBM", {**BOOSTER_DATA, "lgb_num_boost_round": 20}, "auc", 0.6),  # a random scorer: AUC 0.5
    ("XGBoost", {**BOOSTER_DATA, "xgb_num_boost_round": 20}, "auc", 0.6),
    # faiss k-means (RecBole's 1000 clusters > 943 users); a random ranker scores 0.006 here
    pytest.param("NCL", {"num_clusters": 100, "epochs": 1, "train_batch_size": 256}, "ndcg@10", 0.03,
                 marks=pytest.mark.integration),
])
def test_models_of_the_recbole_models_extra_learn_on_ml100k(model, settings, metric, floor, tmp_path):
    """The extra's packages installed (scripts/setup_env.sh installs it): RecBole's model runs through our run
    path. The boosters also need RecBole's lower-case ``lightgbm.yaml`` / ``xgboost.yaml`` (config) and a
    trainer without torch checkpoints (``BoosterRunHooks``)."""
    module, pip_name, _ = registry.OPTIONAL_PACKAGES[model]
    pytest.importorskip(module, reason=f"{pip_name} (the recbole-models extra) is not installed")
    result = run_recbole(model=model, dataset="ml-100k", config_dict={
        "data_path": str(tmp_path), "state": "WARNING", "show_progress": False, "seed": 0, **settings}, argv=[])
    assert result["test_result"][metric] > floor


@pytest.mark.parametrize("model", sorted(registry.OPTIONAL_PACKAGES))
def test_a_model_missing_its_optional_package_says_which_in_one_line(model, monkeypatch):
    """The package made missing by patching the lookup (installed or not here), so the message is always tested."""
    module, pip_name, _ = registry.OPTIONAL_PACKAGES[model]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a))
    with pytest.raises(registry.ModelNotFoundError, match=rf"RecBole's model '{model}' needs the package {pip_name}.*pip install"):
        registry.get_model(model)


def test_ddp_runs_two_cpu_processes_with_gloo(small_data_path, tmp_path):
    import os
    import socket

    import recbole_llmfuse
    from conftest import SMALL, small_config

    with socket.socket() as s:  # a free port for the process group
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    cfg = small_config(small_data_path, checkpoint_dir=str(tmp_path / "saved"), epochs=2)
    result = recbole_llmfuse.run("FastSASRec", SMALL, config_dict=cfg, nproc=2, port=port, argv=[])
    assert result is not None and result["test_result"]["ndcg@10"] > 0.01  # rank 0's result; random ~0.003
    assert os.listdir(tmp_path / "saved") == [os.path.basename(result["model_file"])]  # one checkpoint, by rank 0


def _probe_rank(rank, data_path, port, out_dir):
    """One DDP rank of FastSASRec on ml-small (spawned): records the world size, the training instances the rank
    computed a loss on, and a digest of its parameters after the epoch's steps."""
    import hashlib
    import json

    import torch.distributed as dist

    from recbole_llmfuse import Config
    from recbole_llmfuse.model.fast_sasrec import FastSASRec
    from recbole_llmfuse.quick_start import execute
    from conftest import SMALL, small_config

    seen, digests = [], []
    calculate_loss = FastSASRec.calculate_loss

    def recording(self, interaction):
        seen.extend(zip(interaction["user_id"].tolist(), interaction["item_id"].tolist()))  # (user, target): unique here
        return calculate_loss(self, interaction)

    class Probe:
        def on_epoch_end(self, trainer, *_):
            digest = hashlib.sha256()
            for name, value in sorted(trainer.model.state_dict().items()):
                digest.update(name.encode() + value.detach().cpu().numpy().tobytes())
            digests.append(digest.hexdigest())

    FastSASRec.calculate_loss = recording
    cfg = small_config(data_path, epochs=2, train_batch_size=512, local_rank=rank, world_size=2, nproc=2, offset=0,
                       ip="localhost", port=port, checkpoint_dir=f"{out_dir}/saved")
    execute(Config("FastSASRec", SMALL, config_dict=cfg, argv=[]), callbacks=[Probe()], saved=False, test=False,
            verbose=False)
    world = dist.get_world_size()
    dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"world": world, "seen": seen, "digests": digests}, f)


@pytest.mark.integration
def test_ddp_ranks_train_disjoint_shards_and_stay_in_sync(small_data_path, tmp_path):
    """Two gloo ranks: world size 2, each epoch's training instances split between them (DistributedSampler pads
    with at most one repeat), and after every epoch's steps the ranks hold equal parameters (gradients were
    all-reduced, not trained apart)."""
    import json
    import socket

    import torch.multiprocessing as mp

    from recbole_llmfuse import Config, create_dataset
    from conftest import SMALL, small_config

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    mp.spawn(_probe_rank, args=(small_data_path, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    train, _, _ = create_dataset(Config("FastSASRec", SMALL, config_dict=small_config(small_data_path), argv=[])).build()
    n_train = len(train.inter_feat)
    for epoch in range(2):
        per_epoch = [r["seen"][epoch * len(r["seen"]) // 2:(epoch + 1) * len(r["seen"]) // 2] for r in ranks]
        a, b = (set(map(tuple, s)) for s in per_epoch)
        assert len(a & b) <= 1 and len(a | b) == n_train  # disjoint shards covering the split
        assert abs(len(a) - len(b)) <= 1
    assert ranks[0]["digests"] == ranks[1]["digests"] and len(ranks[0]["digests"]) == 2


def test_recbole_folders_are_made_race_free(tmp_path, monkeypatch):
    """Two DDP ranks both find ``./log`` missing, then both create it: the second must not fail."""
    import os

    import recbole.trainer.trainer
    import recbole.utils.logger

    import recbole_llmfuse  # noqa: F401  (applies the shims)

    target = tmp_path / "log"
    target.mkdir()
    monkeypatch.setattr(os.path, "exists", lambda path: False)  # the other rank made it in between
    for ensure_dir in (recbole.utils.logger.ensure_dir, recbole.trainer.trainer.ensure_dir):
        ensure_dir(str(target))
    assert target.is_dir()
