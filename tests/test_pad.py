"""PAD: frequency buckets, gated scoring, phase hand-off, alignment variants, a full 3-phase run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from recbole.data.interaction import Interaction

from recbole_llmfuse import Config, ConfigError, get_trainer, load_data_and_model
from recbole_llmfuse.compat import trusted_torch_load
from recbole_llmfuse.stats import training_counts
from recbole_llmfuse.quick_start import build, make_trainer

from conftest import LEARNS_MARGIN, SMALL, TINY, TINY_LEARN, popularity_hit


def _pad_cfg(small_cfg, data_path, **overrides):
    cfg = small_cfg(data_path=data_path, mlp_hidden_sizes=[32], learning_rate=0.003, group_metrics=True)
    cfg.update(overrides)
    return cfg


def _build(cfg, model="PAD"):
    config = Config(model, SMALL, config_dict=cfg, argv=[])
    return (config,) + build(config)


def _test_batch(model, test_data):
    interaction = next(iter(test_data))[0]
    return interaction.to(model.device)


def test_buckets_come_from_the_training_split(small_cfg, with_embeddings):
    _, dataset, model, train_data, _, _ = _build(_pad_cfg(small_cfg, with_embeddings, pad_buckets=5))
    counts, _ = training_counts(train_data.dataset)
    full = np.bincount(dataset.inter_feat[dataset.iid_field].numpy(), minlength=dataset.item_num)
    bucket = model.item_bucket.numpy()
    assert bucket[0] == 0 and set(bucket[1:]) == {1, 2, 3, 4, 5}
    unseen_in_training = np.flatnonzero((counts == 0) & (full > 0))
    assert len(unseen_in_training) > 0  # items that appear only in valid/test
    assert (bucket[unseen_in_training] == 5).all()  # ... are in the coldest bucket
    assert bucket[int(np.argmax(counts))] == 1
    # warmer buckets never hold an item rarer (in training) than a colder bucket's item
    for b in range(1, 5):
        assert counts[bucket == b].min() >= counts[bucket == b + 1].max()


@pytest.mark.parametrize("gate,loss_type", [("bucket", "CE"), ("mlp", "CE"), ("global", "CE"), ("bucket", "InfoNCE")])
def test_full_sort_equals_per_item_gated_scores(small_cfg, with_embeddings, gate, loss_type):
    """Full ranking folds a user-independent gate into the candidates (or gathers a per-(user, bucket) mlp
    gate); per-item scoring runs the gate on each candidate. InfoNCE: per-expert cosines in both."""
    _, _, model, _, _, test_data = _build(_pad_cfg(small_cfg, with_embeddings, gate=gate, loss_type=loss_type))
    assert model.cosine == (loss_type == "InfoNCE")
    with torch.no_grad():  # move the gate away from its symmetric start
        for p in model.gate.parameters():
            p.add_(torch.randn_like(p))
    model.enter_stage("finetune")
    model.eval()
    batch = _test_batch(model, test_data)
    with torch.no_grad():
        full = model.full_sort_predict(batch)
        users = model(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
        items = torch.arange(model.n_items).expand(full.shape[0], -1)
        per_item = model.score_items(users, items)
        weights = model.gate(model.item_bucket[items], users)
    assert torch.allclose(full, per_item, atol=1e-4)
    assert torch.allclose(weights.sum(-1), torch.ones_like(weights[..., 0]), atol=1e-5)
    # predict() on single candidates agrees too
    batch.update(Interaction({model.ITEM_ID: items[:, 7].contiguous()}))
    with torch.no_grad():
        single = model.predict(batch)
    assert torch.allclose(single, full[:, 7], atol=1e-4)


def test_align_stage_hand_off_and_gradients(small_cfg, with_embeddings):
    _, _, model, train_data, _, _ = _build(_pad_cfg(small_cfg, with_embeddings))
    ident, align = model.experts["id"], model.experts["align"]
    with torch.no_grad():
        ident.tokens.embedding.weight.add_(1.0)  # stands for a trained phase-1 model
    model.enter_stage("align")
    assert torch.equal(align.tokens.id.embedding.weight, ident.tokens.embedding.weight)
    for (name, a), (_, b) in zip(align.backbone.state_dict().items(), ident.backbone.state_dict().items()):
        assert torch.equal(a, b), name  # concat_linear keeps the width: the phase-1 transformer is copied
    model.train()
    model.calculate_loss(next(iter(train_data))).backward()
    assert align.tokens.id.embedding.weight.grad.abs().sum() > 0  # E_al
    assert align.tokens.text.projector.net[0].weight.grad.abs().sum() > 0  # MLP_w
    assert all(p.grad is None for p in ident.parameters())  # the ID expert waits in phase 2
    assert not model.item_text_emb.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("experts.align.")] == []


def test_rq2_variants_train_what_they_should(small_cfg, with_embeddings):
    batch = None
    for overrides, id_trains, rec_loss in (({"align_freeze_id": True}, False, True),
                                           ({"align_anchor": False}, True, False)):
        _, _, model, train_data, _, _ = _build(_pad_cfg(small_cfg, with_embeddings, **overrides))
        batch = batch or next(iter(train_data))
        model.enter_stage("align")
        model.train()
        model.calculate_loss(batch).backward()
        grad = model.experts["align"].tokens.id.embedding.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == id_trains
        transformer = model.experts["align"].backbone.encoder.layer[0].qkv.weight.grad
        assert (transformer is not None and transformer.abs().sum() > 0) == rec_loss


@pytest.mark.parametrize("overrides", [
    {"fusion": "concat"}, {"fusion": "sum"}, {"experts": ["id", "text"], "gate": "mlp"},
    {"loss_type": "CE", "align_loss": "infonce"}, {"align_loss": "mkmmd_laplace", "mmd_items": "history"},
])
def test_config_variants_train_one_step(small_cfg, with_embeddings, overrides):
    _, _, model, train_data, _, test_data = _build(_pad_cfg(small_cfg, with_embeddings, **overrides))
    batch = next(iter(train_data))
    for stage in model.train_stages:
        model.enter_stage(stage)
        model.train()
        loss = model.calculate_loss(batch)
        assert torch.isfinite(loss)
        loss.backward()
    model.eval()
    with torch.no_grad():
        assert model.full_sort_predict(_test_batch(model, test_data)).shape[1] == model.n_items


def test_bad_phase_lists_are_refused(small_cfg, with_embeddings):
    with pytest.raises(ConfigError, match="order"):
        _build(_pad_cfg(small_cfg, with_embeddings, train_stages=["finetune", "pretrain"]))
    with pytest.raises(ConfigError, match="experts"):
        _build(_pad_cfg(small_cfg, with_embeddings, experts=["id", "audio"]))


def test_three_phases_two_epochs_each_hand_off_and_learn(tiny_world):
    """On the tiny world (real MiniLM vectors): the phases hand off their checkpoints, and PAD beats popularity."""
    cfg = {**TINY_LEARN, "data_path": tiny_world, "mlp_hidden_sizes": [32], "group_metrics": True, "epochs": 2}
    config = Config("PAD", TINY, config_dict=cfg, argv=[])
    _, model, train_data, valid_data, test_data = build(config)
    trainer = make_trainer(config, model)  # group metrics on
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    result = trainer.evaluate(test_data, load_best_model=True)
    stages = trainer.stage_results
    assert list(stages) == ["pretrain", "align", "finetune"] and all(s["epochs"] == 2 for s in stages.values())
    ckpt = {s: trusted_torch_load(stages[s]["checkpoint"])["state_dict"] for s in stages}
    key = "experts.id.tokens.embedding.weight"
    # phase 2 starts from phase 1's best checkpoint and leaves the ID expert alone ...
    assert torch.equal(ckpt["pretrain"][key], ckpt["align"][key])
    assert all(torch.equal(ckpt["pretrain"][k], ckpt["align"][k]) for k in ckpt["pretrain"] if k.startswith("experts.id."))
    # ... and phase 3 starts from phase 2's: the alignment expert moved on from there, the text expert is new
    assert not torch.equal(ckpt["align"][key], ckpt["finetune"][key])
    assert trusted_torch_load(stages["finetune"]["checkpoint"])["other_parameter"] == {"stage": "finetune"}
    assert result["recall@10"] > popularity_hit(train_data.dataset, test_data.dataset) + LEARNS_MARGIN
    assert "ndcg@10/tail" in result and "ndcg@10/b10" in result
    # the checkpoint reloads into the last phase with the same scores
    model.eval()
    batch = _test_batch(model, test_data)
    with torch.no_grad():
        before = model.full_sort_predict(batch)
    _, reloaded, _, _, _, _ = load_data_and_model(stages["finetune"]["checkpoint"])
    reloaded.eval()
    assert reloaded.stage == "finetune"
    with torch.no_grad():
        assert torch.allclose(reloaded.full_sort_predict(batch), before, atol=1e-5)


def test_single_phase_resumes_from_a_fastsasrec_checkpoint(small_cfg, with_embeddings):
    """train_stages: [align] + pretrained_checkpoint: a FastSASRec run becomes PAD's phase-1 ID expert."""
    cfg = _pad_cfg(small_cfg, with_embeddings, loss_type="BCE", hidden_dropout_prob=0.1)
    cfg["train_neg_sample_args"] = {"distribution": "uniform", "sample_num": 1}
    config, _, sasrec, train_data, valid_data, _ = _build(cfg, "FastSASRec")
    trainer = get_trainer(config["MODEL_TYPE"], "FastSASRec")(config, sasrec)
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    sasrec_state = trusted_torch_load(trainer.saved_model_file)["state_dict"]

    config, _, model, train_data, valid_data, _ = _build(
        dict(cfg, train_stages=["align"], pretrained_checkpoint=trainer.saved_model_file,
             stage_learning_rate={"align": 0.0123}))
    pad_trainer = get_trainer(config["MODEL_TYPE"], "PAD")(config, model)
    pad_trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    assert list(pad_trainer.stage_results) == ["align"]
    assert pad_trainer.optimizer.param_groups[0]["lr"] == 0.0123  # the phase's own learning rate
    assert torch.equal(model.experts["id"].tokens.embedding.weight, sasrec_state["item_embedding.weight"])
    layer = "backbone.encoder.layer.0.qkv.weight"
    assert torch.equal(model.experts["id"].state_dict()[layer], sasrec_state[layer])
