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
            "epochs": 1, "data_path": str(tmp_path), "state": "WARNING", "show_progress": False, "seed": 0})
    assert result["test_result"]["ndcg@10"] > 0.03  # a random ranker scores ~0.005 here


#: RecBole's context-aware protocol for its boosters: ratings >= 4 are positives, random split, AUC
BOOSTER_DATA = {"load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                             "user": ["user_id", "age", "gender", "occupation"], "item": ["item_id", "release_year", "class"]},
                "threshold": {"rating": 4}, "metrics": ["AUC", "LogLoss"], "valid_metric": "AUC", "epochs": 1,
                "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": None, "mode": "labeled"}}


@pytest.mark.integration
@pytest.mark.parametrize("model, settings, metric, floor", [
    ("LightGBM", {**BOOSTER_DATA, "lgb_num_boost_round": 20}, "auc", 0.6),  # a random scorer: AUC 0.5
    ("XGBoost", {**BOOSTER_DATA, "xgb_num_boost_round": 20}, "auc", 0.6),
    # faiss k-means (RecBole's 1000 clusters > 943 users); a random ranker scores 0.006 here
    ("NCL", {"num_clusters": 100, "epochs": 1, "train_batch_size": 256}, "ndcg@10", 0.03),
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


@pytest.mark.integration
def test_ddp_runs_two_cpu_processes_with_gloo(small_data_path, tmp_path):
    import os
    import socket

    import recbole_llmfuse
    from conftest import SMALL, small_config

    with socket.socket() as s:  # a free port for the process group
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    cfg = small_config(small_data_path, checkpoint_dir=str(tmp_path / "saved"), epochs=2)
    result = recbole_llmfuse.run("FastSASRec", SMALL, config_dict=cfg, nproc=2, port=port)
    assert result is not None and result["test_result"]["ndcg@10"] > 0.01  # rank 0's result; random ~0.003
    assert os.listdir(tmp_path / "saved") == [os.path.basename(result["model_file"])]  # one checkpoint, by rank 0


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
