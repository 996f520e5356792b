"""Models learn, checkpoints round-trip, frozen tables stay out of checkpoints."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from recbole_llmfuse import Config, get_trainer, load_data_and_model
from recbole_llmfuse.compat import trusted_torch_load
from recbole_llmfuse.quick_start import build

from conftest import LEARNS_MARGIN, SMALL, TINY, TINY_LEARN, fit_and_test


def _train(model, cfg, epochs=1):
    config = Config(model, SMALL, config_dict=cfg, argv=[])
    dataset, net, train_data, valid_data, test_data = build(config)
    trainer = get_trainer(config["MODEL_TYPE"], model)(config, net)
    losses = [trainer._train_epoch(train_data, epoch, show_progress=False) for epoch in range(epochs)]
    trainer._save_checkpoint(epochs - 1)
    result = trainer.evaluate(test_data, load_best_model=False)
    return config, dataset, net, trainer, test_data, losses, result


def _first_batch_scores(model, test_data):
    model.eval()
    interaction = next(iter(test_data))[0]
    with torch.no_grad():
        return model.full_sort_predict(interaction.to(model.device))


@pytest.mark.parametrize("model, loss_type", [("FastSASRec", "CE"), ("FastSASRec", "BCE"), ("MoRec", "CE"), ("Hybrid", "CE"), ("FMLPRec", "CE"), ("LRURec", "CE"),
                                              ("AlphaFuse", "CE"), ("RLMRec", "CE"), ("LLMESR", "CE")])
def test_model_learns(tiny_world, model, loss_type):
    """The tiny world's walks (+1 or +3 steps): a model that learns the sequence beats popularity by a margin."""
    cfg = {**TINY_LEARN, "data_path": tiny_world, "loss_type": loss_type,
           "alphafuse_null_dim": 8, "llmesr_sim_users": 3}  # sizes for hidden_size 16 and 60 users
    if loss_type != "CE":
        cfg["train_neg_sample_args"] = {"distribution": "uniform", "sample_num": 1}
    _, _, losses, result, pop = fit_and_test(Config(model, TINY, config_dict=cfg, argv=[]), epochs=8)
    assert losses[-1] < losses[0]
    assert result["hit@10"] > pop + LEARNS_MARGIN, (result["hit@10"], pop)


@pytest.mark.parametrize("model", [pytest.param(m, marks=pytest.mark.integration) for m in ("FastSASRec", "MoRec", "Hybrid")]
                         + ["SASRec"])  # ours are also round-tripped by test_registered; RecBole's SASRec only here
def test_checkpoint_round_trip(small_cfg, with_embeddings, model):
    _, _, net, trainer, test_data, _, _ = _train(model, small_cfg(data_path=with_embeddings))
    before = _first_batch_scores(net, test_data)
    checkpoint = trusted_torch_load(trainer.saved_model_file)
    assert not any("item_text_emb" in k for k in checkpoint["state_dict"])  # frozen table not saved
    _, reloaded, _, _, _, reloaded_test = load_data_and_model(trainer.saved_model_file)
    after = _first_batch_scores(reloaded, reloaded_test)
    assert torch.equal(before, after)


def test_fast_sasrec_equals_recbole_sasrec_with_same_weights(small_cfg):
    cfg = small_cfg()
    config = Config("SASRec", SMALL, config_dict=cfg, argv=[])
    _, ref, _, _, test_data = build(config)
    fast_config = Config("FastSASRec", SMALL, config_dict=cfg, argv=[])
    _, fast, _, _, _ = build(fast_config)
    fast.load_recbole_sasrec(ref.state_dict())
    assert torch.allclose(_first_batch_scores(ref, test_data), _first_batch_scores(fast, test_data), atol=1e-5)


@pytest.mark.integration
def test_trains_under_recbole_amp(small_cfg):
    """RecBole's enable_amp wraps training in torch.autocast (bf16 on CPU, fp16 on CUDA): the encoder runs in it."""
    _, dataset, _, _, _, losses, result = _train("FastSASRec", small_cfg(enable_amp=True, learning_rate=0.003), epochs=2)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_fast_sasrec_gradients_equal_recbole_sasrec(small_cfg):
    """Same weights, dropout off, one batch: same loss and same gradients -> same training dynamics."""
    cfg = small_cfg(hidden_dropout_prob=0.0, attn_dropout_prob=0.0)
    _, ref, train_data, _, _ = build(Config("SASRec", SMALL, config_dict=cfg, argv=[]))
    _, fast, _, _, _ = build(Config("FastSASRec", SMALL, config_dict=cfg, argv=[]))
    fast.load_recbole_sasrec(ref.state_dict())
    batch = next(iter(train_data))
    ref.train(), fast.train()
    ref.calculate_loss(batch).backward()
    fast.calculate_loss(batch).backward()
    assert torch.allclose(ref.item_embedding.weight.grad, fast.item_embedding.weight.grad, atol=1e-6)
    ref_q = ref.trm_encoder.layer[0].multi_head_attention.query.weight.grad
    assert torch.allclose(ref_q, fast.backbone.encoder.layer[0].qkv.weight.grad[: ref_q.shape[0]], atol=1e-6)


def test_text_tokens_project_each_distinct_item_once_with_per_token_results(small_cfg, with_embeddings):
    """MoRec/Hybrid/PAD project each distinct item of a batch once: same outputs as per-token projection."""
    for model_name, hidden in (("MoRec", []), ("MoRec", [16]), ("Hybrid", [16])):
        cfg = small_cfg(data_path=with_embeddings, mlp_hidden_sizes=hidden, hidden_dropout_prob=0.0,
                        attn_dropout_prob=0.0, mlp_dropout_prob=0.0)
        _, model, train_data, _, _ = build(Config(model_name, SMALL, config_dict=cfg, argv=[]))
        batch = next(iter(train_data))
        seq, lengths = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
        tokens = model.expert.tokens
        text = tokens.text if hasattr(tokens, "text") else tokens
        with torch.no_grad():
            per_token = text.projector(model.item_text_emb[seq])
            assert torch.allclose(text(seq, model.item_text_emb), per_token, atol=1e-6)
            assert torch.allclose(model.all_item_vectors()[seq], model.item_vectors(seq), atol=1e-5)
            assert model(seq, lengths).shape == (seq.shape[0], cfg["hidden_size"])


def test_candidate_table_is_computed_once_per_evaluation_and_refreshed_after_training(small_cfg, with_embeddings):
    _, model, train_data, _, test_data = build(Config("MoRec", SMALL, config_dict=small_cfg(data_path=with_embeddings), argv=[]))
    batch = next(iter(test_data))[0]
    model.eval()
    with torch.no_grad():
        first = model.full_sort_predict(batch)
        assert model.all_item_vectors() is model.all_item_vectors()  # cached within one evaluation
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.calculate_loss(next(iter(train_data))).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        second = model.full_sort_predict(batch)
    fresh = model.full_sort_predict(batch).detach()  # autograd on: never cached
    assert not torch.allclose(first, second) and torch.allclose(second, fresh, atol=1e-5)


def test_recboles_pop_trains_saves_and_reloads_through_our_run_path(small_cfg):
    """RecBole's own trainers that are not its plain Trainer (here TraditionalTrainer: Pop, ItemKNN, EASE, ...) run
    under our trainer hooks: epoch timing, lean checkpoint, reload to equal scores."""
    from recbole_llmfuse.quick_start import execute

    result = execute(Config("Pop", SMALL, config_dict=small_cfg(), argv=[]), verbose=False)
    assert len(result.trainer.epoch_times) == 1 and result.test_result["hit@10"] > 3 * 10 / result.test_data.dataset.item_num
    before = _first_batch_scores(result.model, result.test_data)
    _, reloaded, _, _, _, reloaded_test = load_data_and_model(result.model_file)
    assert torch.equal(_first_batch_scores(reloaded, reloaded_test), before)


def test_popularity_row_ranks_exactly_as_the_popularity_ranker(tiny_world):
    """``Popularity`` on the sequential split is the ranker ``popularity_hit`` computes by hand (training counts),
    and nothing in it trains."""
    from recbole_llmfuse.stats import training_counts

    cfg = {**TINY_LEARN, "data_path": tiny_world}
    config = Config("Popularity", TINY, config_dict=cfg, argv=[])
    _, _, train_data, _, test_data = build(config)
    counts = torch.from_numpy(training_counts(train_data.dataset)[0])
    counts[0] = -1
    top = np.argsort(-counts.numpy(), kind="stable")[:10]  # by hand: most trained first, ties to the lower id
    expected = torch.isin(test_data.dataset.inter_feat["item_id"], torch.from_numpy(top)).float().mean().item()
    model, _, losses, result, _ = fit_and_test(config, epochs=1)
    assert result["hit@10"] == pytest.approx(expected, abs=1e-4) and losses == [0.0]
    assert [name for name, _ in model.named_parameters()] == ["unused"]
