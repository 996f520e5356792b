"""Every registered model and hook, tested by being registered (entry points of ``recbole_llmfuse.models`` and
the hooks :func:`recbole_llmfuse.dataset_prep.hooks.available_hooks` finds): a new model or hook is covered the
moment it is declared, with no test written for it.

Model: one tiny epoch on the tiny world through the one run path (its preparation hooks run by themselves),
group metrics present, ``full_sort_predict`` of shape ``[B, n_items]`` and finite, the checkpoint reloads to
equal scores. Hook: produced on the tiny world, its outputs exist and it reports itself fresh.
"""
from __future__ import annotations

import os

import pytest
import torch

from recbole_llmfuse import Config, load_data_and_model, registry
from recbole_llmfuse.dataset_prep.hooks import available_hooks, resolve
from recbole_llmfuse.quick_start import execute

from conftest import TINY, tiny_causal_llama, write_tiny_dataset, write_tiny_llama

#: settings for the tiny world; LLM-backed parts get tiny random models or no-LLM backends. Keys a model does
#: not read are ignored by it, as RecBole's Config ignores them.
TINY_SETTINGS = {
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "MAX_ITEM_LIST_LENGTH": 5,
    "hidden_size": 16, "inner_size": 32, "n_heads": 2, "train_batch_size": 64, "eval_batch_size": 64,
    "epochs": 1, "seed": 0, "show_progress": False, "state": "WARNING", "group_metrics": ["item_popularity"],
    # HDRec: a 2-layer random Llama with a word-level tokenizer
    "max_tokens": 128, "llm_batch_size": 8, "item_tokens": {"max_attr_tokens": 8},
    "sasrec_item_table": {"hidden_size": 16, "epochs": 1, "MAX_ITEM_LIST_LENGTH": 5},
    # PtE: template profiles (no LLM) encoded by MiniLM
    "pte_profiles": {"backend": "template", "max_rounds": 0},
    # AlphaFuse: a null space that fits hidden_size 16
    "alphafuse_null_dim": 8,
}
#: hook -> parameters for the tiny world (hooks not named here run with their YAML defaults)
TINY_HOOK_PARAMS = {
    "pte_profiles": {"backend": "template", "max_rounds": 0},
    "item_encoder_lora": {"epochs": 1, "train_batch_size": 16, "pairs_per_epoch": 64},
    "sasrec_item_table": {"hidden_size": 16, "epochs": 1, "MAX_ITEM_LIST_LENGTH": 5},
    # PtE's profiler tuning: a tiny random causal Llama taught by the template profiles, a few steps
    "profiler_sft": {"model": "{causal}", "teacher": {"backend": "template"}, "epochs": 1, "batch_size": 4,
                     "max_length": 256, "progress": False},
    "profiler_grpo": {"teacher": {"backend": "template"}, "num_generations": 2, "prompts_per_step": 2,
                      "max_new_tokens": 8, "max_prompts": 4, "progress": False},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("registered")
    return {"data": write_tiny_dataset(str(root / "data")), "llm": write_tiny_llama(root / "tiny-llama"),
            "causal": tiny_causal_llama(str(root / "causal")), "root": str(root)}


def _hook_params(world) -> dict:
    """Every hook's tiny parameters (a hook reads those of the hooks it requires too), paths filled in."""
    return {name: {k: v.format(**world) if isinstance(v, str) else v for k, v in params.items()}
            for name, params in TINY_HOOK_PARAMS.items()}


def _first_batch_scores(model, test_data):
    model.eval()
    interaction = next(iter(test_data))[0]
    with torch.no_grad():
        return model.full_sort_predict(interaction.to(model.device)), len(interaction)


@pytest.mark.parametrize("name", sorted(registry.plugin_entry_points()))
def test_registered_model_trains_ranks_and_reloads(world, tmp_path, name):
    settings = {**TINY_SETTINGS, "data_path": world["data"], "llm_path": world["llm"],
                "checkpoint_dir": str(tmp_path / "saved")}
    result = execute(Config(name, TINY, config_dict=settings, argv=[]), verbose=False)
    test = result.test_result
    assert {"ndcg@10", "ndcg@10/head", "ndcg@10/tail", "full_mrr"} <= set(test), sorted(test)
    scores, batch = _first_batch_scores(result.model, result.test_data)
    n_items = result.test_data.dataset.item_num
    assert scores.numel() == batch * n_items, scores.shape  # [B, n_items] (RecBole also allows it flattened)
    scores = scores.view(batch, n_items)
    assert torch.isfinite(scores[:, 1:]).all()  # column 0 is padding (may be -inf)
    _, reloaded, _, _, _, reloaded_test = load_data_and_model(result.model_file)
    again, _ = _first_batch_scores(reloaded, reloaded_test)
    torch.testing.assert_close(again.view(batch, n_items), scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(available_hooks()))
def test_registered_hook_produces_its_outputs(world, tmp_path, name):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(os.path.join(world["data"], TINY), data / TINY)
    config = Config("FastSASRec", TINY, config_dict={
        **TINY_SETTINGS, "data_path": str(data), "llm_path": world["llm"], **_hook_params(world)},
        argv=[])
    *required, hook = resolve(config, [name])  # what it reads first, as `prep` does
    for each in (*required, hook):
        each.produce(replace=True)
    assert all(os.path.exists(path) for path in hook.required_outputs()), hook.required_outputs()
    assert hook.status() == "fresh"
