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
            import os

            import numpy as np
            from recbole.model.sequential_recommender.sasrec import SASRec

            from recbole_llmfuse import registry
            from recbole_llmfuse.data import FeatureTable
            from recbole_llmfuse.dataset_prep.hooks import PrepHook
            from recbole_llmfuse.dataset_prep.item_text import build_item_texts
            from recbole_llmfuse.dataset_prep.itememb import write_table
            from recbole_llmfuse.model.morec import MoRec

            class ThirdPartySASRec(SASRec):
                '''RecBole's SASRec under another name, shipped by another package.'''

            class HashVectors(PrepHook):
                '''A package's own hook: item vectors from a hash of each title (stands in for an LLM).'''
                name = "tp_hash_vectors"
                cli = "hashvec"
                summary = "hashed title vectors -> <dataset>.hashvec.npz"
                defaults = {"dim": 8}

                def outputs(self):
                    return [os.path.join(self.data_path, f"{self.dataset}.hashvec.npz")]

                def run(self, **_):
                    items = build_item_texts(self.data_path, self.dataset, None, None, None)
                    rows = [np.random.default_rng(sum(map(ord, t))).standard_normal(int(self.params["dim"]))
                            for t in items.texts]
                    write_table(self.outputs()[0], items.tokens, np.asarray(rows, np.float32))
                    self.write_manifest()
                    return {"items": len(rows)}

            class ThirdPartyTextRec(MoRec):
                '''A live-model stand-in: MoRec over the package's own hook's vectors.'''
                config_file = registry.model_config_file(MoRec)  # MoRec's defaults
                feature_tables = (FeatureTable("item_text_emb", hook="tp_hash_vectors"),)
            """
        )
    )
    (pkg / "properties" / "model" / "ThirdPartySASRec.yaml").write_text(THIRD_PARTY_YAML)
    info = site / "tp_recmodels-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-recmodels\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[recbole_llmfuse.models]\nThirdPartySASRec = tp_recmodels:ThirdPartySASRec\n"
        "ThirdPartyTextRec = tp_recmodels:ThirdPartyTextRec\n"
        "[recbole_llmfuse.prep_hooks]\ntp_hash_vectors = tp_recmodels:HashVectors\n"
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


def test_a_packages_own_model_and_hook_run_with_no_edit_of_ours(third_party, tmp_path, capsys):
    """Another package registers a model and the hook that makes its table (entry points only): `prep` finds
    the hook's shortcut, and a run of the model makes the table by itself and trains."""
    from recbole_llmfuse.cli import main
    from recbole_llmfuse.dataset_prep.hooks import get_hook, hook_names
    from recbole_llmfuse.synthetic import write_walks

    data = str(tmp_path / "data")
    write_walks(data, "w", users=12, items=10)
    assert "tp_hash_vectors" in hook_names() and get_hook("tp_hash_vectors").__module__ == "tp_recmodels"
    assert main(["prep", "hashvec", "--dataset", "w", "--data_path", data, "dim=4"]) == 0
    assert "tp_hash_vectors: {'items': 10}" in capsys.readouterr().out
    run = ["run", "--model=ThirdPartyTextRec", "--dataset=w", f"--data_path={data}", "--epochs=1", "--state=WARNING",
           "--show_progress=False"]
    assert main(run) == 2  # the run asks for dim 8 (the default): the dim-4 table is not replaced unasked ...
    assert "`recbole-llmfuse prep hashvec --dataset w" in capsys.readouterr().err
    assert main([*run, "--tp_hash_vectors={dim: 4}"]) == 0  # ... and with the same settings it is read and trains
    assert '"model": "ThirdPartyTextRec"' in capsys.readouterr().out
