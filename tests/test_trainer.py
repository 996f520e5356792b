"""The trunk's trainer: RecBole's loop unchanged for one-loss models; step-level training (several optimizers,
alternating steps, named loss terms, schedules, accumulation); callbacks; lean checkpoints."""
from __future__ import annotations

import logging
import os
import types

import pytest
import torch
from recbole.trainer import Trainer as RecBoleTrainer
from torch import nn

from recbole_llmfuse import Config, checkpoint, get_trainer, load_data_and_model, registry
from recbole_llmfuse.model.base import IDSequentialRecommender
from recbole_llmfuse.model.fast_sasrec import FastSASRec
from recbole_llmfuse.quick_start import build, execute
from recbole_llmfuse.trainer import Trainer

from conftest import SMALL


class TwoStep(IDSequentialRecommender):
    """A toy model with a large frozen module and two optimizers: per batch, an 'emb' step (item table) then an
    'enc' step (the transformer), each with its own loss term, as HDRec alternates its two adapters."""

    backbone_kind = "SASRec"
    config_file = registry.model_config_file(FastSASRec)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.frozen = nn.Linear(config["frozen_width"], config["frozen_width"])  # stands in for an LLM decoder
        checkpoint.freeze(self, self.frozen)
        self.order = []

    def optimizer_groups(self):
        return {"emb": list(self.item_embedding.parameters()), "enc": list(self.backbone.parameters())}

    def train_steps(self, interaction):
        self.order.append("emb")
        yield "emb", {"ce": self.calculate_loss(interaction)}
        self.order.append("enc")
        yield "enc", {"ce": self.calculate_loss(interaction), "l2": 1e-4 * self.backbone.position_embedding.weight.square().sum()}


@pytest.fixture
def toy_registry(monkeypatch):
    real = registry.get_model
    monkeypatch.setattr(registry, "get_model", lambda name: TwoStep if name == "TwoStep" else real(name))


def _cfg(small_cfg, **extra):
    # frozen_width: a setting of this file's own model, declared in no YAML
    return small_cfg(**{"checkpoint_dir": os.path.abspath("saved"), "frozen_width": 64, "allow_unknown_keys": True,
                        **extra})


def test_default_loop_is_recboles(small_cfg):
    """A one-loss model trains bit-identically under our Trainer and RecBole's."""
    states = []
    for trainer_class in (Trainer, RecBoleTrainer):
        config = Config("FastSASRec", SMALL, config_dict=small_cfg(), argv=[])
        _, model, train_data, _, _ = build(config)
        trainer = trainer_class(config, model)
        trainer._train_epoch(train_data, 0)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_two_optimizers_alternate_and_checkpoint_is_lean(small_cfg, toy_registry):
    config = Config("TwoStep", SMALL, config_dict=_cfg(small_cfg, frozen_width=1024), argv=[])
    _, model, train_data, valid_data, test_data = build(config)
    trainer = get_trainer(config["MODEL_TYPE"], "TwoStep")(config, model)
    assert set(trainer.optimizers) == {"emb", "enc"}
    steps = []
    for name, opt in trainer.optimizers.items():
        original = opt.step
        opt.step = (lambda orig, n: lambda *a, **k: (steps.append(n), orig(*a, **k))[1])(original, name)
    frozen_before = model.frozen.weight.clone()
    emb_before, enc_before = model.item_embedding.weight.clone(), model.backbone.position_embedding.weight.clone()

    # one batch by hand: after the 'emb' step only the item table moved
    batch = next(iter(train_data)).to(model.device)
    gen = trainer._steps(batch, None)
    group, losses = next(gen)
    losses["ce"].backward()
    assert model.backbone.position_embedding.weight.grad is not None  # the emb loss reaches the encoder too ...
    model.zero_grad()
    model.order = []

    trainer.fit(train_data, valid_data, saved=True)
    n_batches = len(train_data)
    assert steps == ["emb", "enc"] * n_batches and model.order == ["emb", "enc"] * n_batches
    assert not torch.equal(model.item_embedding.weight, emb_before)
    assert not torch.equal(model.backbone.position_embedding.weight, enc_before)
    assert torch.equal(model.frozen.weight, frozen_before)
    assert set(trainer.epoch_loss_terms[0]) == {"emb/ce", "enc/ce", "enc/l2"}

    saved = checkpoint.read(trainer.saved_model_file)
    assert not any(k.startswith("frozen.") for k in saved["state_dict"])
    assert set(saved["state_dict"]) == set(model.state_dict()) - {"frozen.weight", "frozen.bias"}
    assert set(saved["optimizer"]) == {"emb", "enc"}
    full = os.path.abspath("full.pth")  # what RecBole's trainer writes for the same model: every tensor
    RecBoleTrainer._save_checkpoint(trainer, 0, verbose=False, saved_model_file=full)
    frozen_bytes = 4 * sum(p.numel() for p in model.frozen.parameters())
    assert os.path.getsize(full) - os.path.getsize(trainer.saved_model_file) > 0.95 * frozen_bytes

    # reload: same scores (the frozen module comes from construction, not from the file)
    model.eval()
    inter = next(iter(test_data))[0].to(model.device)
    with torch.no_grad():
        before = model.full_sort_predict(inter)
    _, reloaded, _, _, _, reloaded_test = load_data_and_model(trainer.saved_model_file)
    reloaded.frozen.load_state_dict(model.frozen.state_dict())
    reloaded.eval()
    with torch.no_grad():
        after = reloaded.full_sort_predict(next(iter(reloaded_test))[0].to(reloaded.device))
    assert torch.equal(before, after)


def test_step_isolation_gradients_of_other_groups_are_kept_apart(small_cfg, toy_registry):
    """With two groups, the 'emb' step's loss (which also reaches the encoder) never leaks into the 'enc'
    optimizer's gradients: 'enc' steps on exactly the gradient of its own loss."""
    config = Config("TwoStep", SMALL, config_dict=_cfg(small_cfg), argv=[])
    _, model, train_data, _, _ = build(config)
    trainer = get_trainer(config["MODEL_TYPE"], "TwoStep")(config, model)
    batch = next(iter(train_data)).to(model.device)
    seen = {}
    opt = trainer.optimizers["enc"]
    original = opt.step

    def spy(*args, **kwargs):
        seen["grad"] = model.backbone.position_embedding.weight.grad.clone()
        return original(*args, **kwargs)

    opt.step = spy
    model.train()
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    class One:
        def __iter__(self):
            return iter([batch])

        def __len__(self):
            return 1

        shuffle = False

    trainer._epoch_body(One(), 0)
    # expected: the enc loss alone, at the weights after the emb step
    after_emb = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    model.item_embedding.weight.data.copy_(after_emb["item_embedding.weight"])
    model.zero_grad()
    torch.manual_seed(0)
    gen = model.train_steps(batch)
    next(gen)  # consumes the same dropout draws as the training step did
    _, losses = next(gen)
    sum(losses.values()).backward()
    assert torch.allclose(seen["grad"], model.backbone.position_embedding.weight.grad, atol=1e-6)


def test_schedule_warmup_and_accumulation(small_cfg):
    config = Config("FastSASRec", SMALL, config_dict=small_cfg(lr_scheduler="linear", warmup_steps=2,
                                                               grad_accum_steps=2, learning_rate=0.01), argv=[])
    _, model, train_data, _, _ = build(config)
    trainer = Trainer(config, model)
    steps = []
    original = trainer.optimizer.step
    trainer.optimizer.step = types.MethodType(  # a bound method: the LR scheduler wraps optimizer.step
        lambda opt, *a, **k: (steps.append(opt.param_groups[0]["lr"]), original(*a, **k))[1], trainer.optimizer)
    trainer._train_epoch(train_data, 0)
    n_updates = -(-len(train_data) // 2)
    assert len(steps) == n_updates
    assert steps[0] == pytest.approx(0.005) and steps[1] == pytest.approx(0.01)  # warm-up 1/2, 2/2
    total = config["epochs"] * n_updates
    assert steps[-1] == pytest.approx(0.01 * (1 - (n_updates - 1 - 2) / (total - 2)))  # linear decay


def test_callbacks_and_model_summary(small_cfg, caplog):
    caplog.set_level(logging.INFO)
    events = []

    class Recorder:
        def on_epoch_end(self, trainer, epoch, loss, seconds):
            events.append(("epoch", epoch))

        def on_valid(self, trainer, epoch, score, result):
            events.append(("valid", epoch))

        def on_fit_end(self, trainer):
            events.append(("end",))

    config = Config("FastSASRec", SMALL, config_dict=small_cfg(epochs=2, model_log_max_params=10, state="INFO"), argv=[])
    run = execute(config, callbacks=[Recorder()])
    assert events == [("epoch", 0), ("valid", 0), ("epoch", 1), ("valid", 1), ("end",)]
    assert len(run.trainer.epoch_times) == 2 and len(run.trainer.eval_times) == 3  # 2 validations + test
    assert "trainable (100.00%)" in caplog.text and "FLOPs" not in caplog.text  # a summary, not the printed model


def test_a_models_trainer_is_found_by_name():
    """Models name their trainer (``trainer_class = "StagedTrainer"``) instead of importing the trainer layer."""
    from recbole.trainer import KGTrainer

    from recbole_llmfuse import ConfigError
    from recbole_llmfuse.trainer import StagedTrainer, trainer_class

    def model(named):
        return type("M", (), {"trainer_class": named})

    assert trainer_class(model("StagedTrainer")) is StagedTrainer  # ours first
    assert trainer_class(model("KGTrainer")) is KGTrainer  # then RecBole's
    assert trainer_class(model("recbole_llmfuse.trainer:Trainer")) is Trainer  # another package's
    assert trainer_class(model(Trainer)) is Trainer and trainer_class(type("M", (), {})) is None
    with pytest.raises(ConfigError, match="no such trainer"):
        trainer_class(model("NoSuchTrainer"))
    assert get_trainer(None, "PAD") is StagedTrainer
