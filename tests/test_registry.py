"""Model lookup by name: our entry points, RecBole's built-ins, third-party packages; YAML layering."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from recbole_llmfuse import Config, ModelNotFoundError, available_models, get_model, registry
from recbole_llmfuse.model.fast_sasrec import FastSASRec
from recbole_llmfuse.model.morec import MoRec

THIRD_PARTY_YAML = """\
n_layers: 1
n_heads: 2
hidden_size: 24
inner_size: 48
hidden_dropout_prob: 0.1
attn_dropout_prob: 0.1
hidden_act: gelu
layer_norm_eps: 1.0e-12
initializer_range: 0.02
loss_type: CE
learning_rate: 0.0123
"""


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A separately 'installed' distribution that registers ``ThirdPartySASRec`` in our entry-point group."""
    site = tmp_path / "site"
    pkg = site / "tp_recmodels"
    (pkg / "properties" / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from recbole.model.sequential_recommender.sasrec import SASRec

            class ThirdPartySASRec(SASRec):
                '''RecBole's SASRec under another name, shipped by another package.'''
            """
        )
    )
    (pkg / "properties" / "model" / "ThirdPartySASRec.yaml").write_text(THIRD_PARTY_YAML)
    info = site / "tp_recmodels-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-recmodels\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[recbole_llmfuse.models]\nThirdPartySASRec = tp_recmodels:ThirdPartySASRec\n"
    )
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    yield str(site)
    registry.refresh()


def test_our_models_resolve_through_entry_points():
    assert get_model("FastSASRec") is FastSASRec
    assert get_model("MoRec") is MoRec
    assert available_models()["FastSASRec"] == "recbole-llmfuse"


@pytest.mark.parametrize("name", ["SASRec", "GRU4Rec", "BERT4Rec", "BPR"])
def test_recbole_builtins_fall_back(name):
    cls = get_model(name)
    assert cls.__name__ == name and cls.__module__.startswith("recbole.model.")
    assert available_models()[name] == "recbole"


def test_unknown_model_lists_available_names():
    with pytest.raises(ModelNotFoundError) as err:
        get_model("NoSuchModel")
    msg = str(err.value)
    assert "NoSuchModel" in msg and "FastSASRec" in msg and "SASRec" in msg and "recbole_llmfuse.models" in msg


def test_third_party_model_found_and_its_yaml_layered(third_party, small_data_path):
    cls = get_model("ThirdPartySASRec")
    assert cls.__module__ == "tp_recmodels"
    assert available_models()["ThirdPartySASRec"] == "tp-recmodels"
    config = Config("ThirdPartySASRec", "ml-small", config_dict={"data_path": small_data_path}, argv=[])
    assert config["hidden_size"] == 24
    assert config["learning_rate"] == 0.0123  # the model YAML overrides overall.yaml ...
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"}  # ... and the sequential YAML still applies


def test_third_party_model_trains_through_cli(third_party, small_data_path):
    env = dict(os.environ, PYTHONPATH=third_party + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "run_recbole"),
            "--model=ThirdPartySASRec", "--dataset=ml-small", f"--data_path={small_data_path}",
            "--epochs=1", "--MAX_ITEM_LIST_LENGTH=10", "--show_progress=False",
            "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}",
        ],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test result (ThirdPartySASRec on ml-small)" in proc.stdout


def test_layering_order_matches_recbole(small_data_path):
    """Plugin YAML < dataset YAMLs < config files < config dict < command line, as in RecBole."""
    config = Config(
        "FastSASRec", "ml-small",
        config_dict={"data_path": small_data_path, "hidden_size": 48, "n_heads": 4},
        argv=["--hidden_size=16"],
    )
    assert config["hidden_size"] == 16  # command line wins
    assert config["n_heads"] == 4  # dict beats the model YAML (2)
    assert config["inner_size"] == 256  # from properties/model/FastSASRec.yaml
    assert config["MAX_ITEM_LIST_LENGTH"] == 50  # RecBole's dataset defaults still apply
    assert config["train_neg_sample_args"]["distribution"] == "none"  # CE without RecBole's boilerplate
    assert os.path.isabs(config["data_path"])
