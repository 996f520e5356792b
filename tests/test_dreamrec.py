"""DreamRec and DreamRec-PtE: the DDPM forward process and DDIM path by the formulas, guidance, the frozen whitened
item table of DreamRec-PtE, scores that repeat, and both models learning the tiny world's walks."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import LEARNS_MARGIN, TINY, TINY_LEARN, fit_and_test
from recbole_llmfuse import Config, ConfigError
from recbole_llmfuse.model.dreamrec import GaussianDiffusion
from recbole_llmfuse.model.layers import whitening
from recbole_llmfuse.quick_start import build

PTE_TEMPLATE = {"pte_profiles": {"backend": "template", "max_rounds": 0}}


def test_forward_process_is_the_linear_beta_ddpm():
    diffusion = GaussianDiffusion(2000, 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, 2000, dtype=torch.float64)
    alpha_bar = torch.tensor([float(torch.prod(1 - betas[: t + 1])) for t in (0, 999, 1999)], dtype=torch.float64)
    assert torch.allclose(diffusion.alpha_bar[[0, 999, 1999]].double(), alpha_bar, rtol=1e-5)
    x0, noise, t = torch.randn(3, 8), torch.randn(3, 8), torch.tensor([0, 999, 1999])
    expected = alpha_bar.sqrt().float().unsqueeze(1) * x0 + (1 - alpha_bar).sqrt().float().unsqueeze(1) * noise
    assert torch.allclose(diffusion.perturb(x0, t, noise), expected, atol=1e-5)
    assert float(diffusion.alpha_bar[-1]) < 1e-4  # x_T is (almost) pure noise


def test_ddim_path_equals_the_reference_coefficients_and_ends_at_the_prediction():
    diffusion = GaussianDiffusion(2000, 1e-4, 0.02)
    torch.manual_seed(0)
    weight = torch.randn(8, 8) / 3
    calls = []

    def predict(x, t):  # any x0 predictor: its last prediction is the sample
        calls.append(int(t[0]))
        return torch.tanh(x @ weight) + t.float().unsqueeze(1) / 2000

    noise = torch.randn(4, 8)
    out = diffusion.sample(predict, noise, stride=100)
    assert calls == list(range(1999, -1, -100))  # 20 steps, T-1 down by the stride
    # by hand, in the form of AlphaFuse's DreamRec code: x_prev = c1 * x0 + c2 * x_t with
    # c1 = sqrt(a_prev) - sqrt(1 - a_prev) * sqrt(a) / sqrt(1 - a), c2 = sqrt(1 - a_prev) / sqrt(1 - a)
    a_bar, x = diffusion.alpha_bar, noise
    steps = list(range(1999, -1, -100))
    for step, prev in zip(steps, steps[1:] + [None]):
        x0 = predict(x, torch.full((4,), step))
        if prev is None:
            x = x0
            break
        a, ap = a_bar[step], a_bar[prev]
        x = (ap.sqrt() - (1 - ap).sqrt() * a.sqrt() / (1 - a).sqrt()) * x0 + (1 - ap).sqrt() / (1 - a).sqrt() * x
    assert torch.allclose(out, x, atol=1e-5)
    # a perfect predictor is returned exactly
    target = torch.randn(4, 8)
    assert torch.equal(diffusion.sample(lambda x, t: target, noise, stride=100), target)


def _build(model, tiny_world, **extra):
    cfg = {**TINY_LEARN, "data_path": tiny_world, **PTE_TEMPLATE, **extra}
    return build(Config(model, TINY, config_dict=cfg, argv=[]))


def _generate_recording(model, interaction):
    """``(c, x̂0, calls)``: the guidance of a test batch, the generated item and the ``(cond, t)`` of every denoiser
    call made to generate it."""
    c = model.encode(interaction)
    calls = []
    original = model.denoiser.forward

    def record(x_t, cond, t):
        calls.append((cond, t))
        return original(x_t, cond, t)

    model.denoiser.forward = record
    try:
        return c, model.generate(c), calls
    finally:
        del model.denoiser.forward


def test_guidance_is_classifier_free_and_scores_repeat(tiny_world):
    _, model, _, _, test_data = _build("DreamRec", tiny_world, dreamrec_guidance=2.0, dreamrec_sample_stride=500)
    model.eval()
    interaction = next(iter(test_data))[0]
    with torch.no_grad():
        c, x0, calls = _generate_recording(model, interaction)
        seen = [cond for cond, _ in calls]
        # each step: one call with c, one with the learned "no condition" vector
        assert len(seen) == 2 * 4 and torch.equal(seen[0], c)
        assert torch.equal(seen[1], model.no_condition.expand_as(c))
        scores = model.full_sort_predict(interaction)
        assert torch.equal(scores, x0 @ model.item_table().T)  # inner product with every item
        assert torch.equal(model.full_sort_predict(interaction), scores)  # seeded noise: the same scores again
        model.guidance = 0.0  # w = 0: the conditional model alone
        assert not torch.allclose(model.generate(c), x0)


def test_mean_scoring_is_the_guided_prediction_averaged_over_the_starting_noise(tiny_world):
    """``dreamrec_scoring: mean``: one guided x0 prediction at step T-1 from x_T = 0. The denoiser is linear in x_t, so
    that equals the average over any noise and its mirror image (antithetic pairs), exactly."""
    _, model, _, _, test_data = _build("DreamRec", tiny_world, dreamrec_guidance=2.0, dreamrec_scoring="mean")
    model.eval()
    interaction = next(iter(test_data))[0]
    with torch.no_grad():
        c, x0, calls = _generate_recording(model, interaction)
        assert len(calls) == 2 and bool((calls[0][1] == 1999).all())  # one step (conditional and "none"), at T-1
        empty = model.no_condition.expand_as(c)
        t = torch.full((c.shape[0],), 1999)

        def guided(x):
            return 3.0 * model.denoiser(x, c, t) - 2.0 * model.denoiser(x, empty, t)

        noise = torch.randn(16, *c.shape, generator=torch.Generator().manual_seed(1))
        average = torch.stack([(guided(n) + guided(-n)) / 2 for n in noise]).mean(0)
        assert torch.allclose(x0, average, atol=1e-4)
        assert not torch.allclose(x0, guided(noise[0]), atol=1e-2)  # one draw is not the mean
        assert torch.equal(model.full_sort_predict(interaction), x0 @ model.item_table().T)


def test_condition_dropout_and_the_loss_is_the_x0_regression(tiny_world):
    _, model, train_data, _, _ = _build("DreamRec", tiny_world, dreamrec_cond_dropout=0.5)
    interaction = next(iter(train_data))
    model.train()
    torch.manual_seed(0)
    loss = model.calculate_loss(interaction)
    # the same draws by hand
    torch.manual_seed(0)
    c = model.encode(interaction)
    drop = torch.rand(c.shape[0], 1) < 0.5
    assert 0.3 < drop.float().mean() < 0.7
    c = torch.where(drop, model.no_condition.expand_as(c), c)
    x0 = model.item_embedding(interaction[model.POS_ITEM_ID])
    t = torch.randint(0, 2000, (c.shape[0],))
    x_t = model.diffusion.perturb(x0, t, torch.randn_like(x0))
    assert torch.allclose(loss, ((model.denoiser(x_t, c, t) - x0) ** 2).mean(), atol=1e-6)
    # the ID table starts at the noise's scale, N(0, 1) (padding row 0)
    weight = model.item_embedding.weight.detach()
    assert torch.count_nonzero(weight[0]) == 0 and 0.8 < float(weight[1:].std()) < 1.2


def test_dreamrec_pte_table_is_the_frozen_full_whitening_of_the_profiles(tiny_world):
    _, model, train_data, _, _ = _build("DreamRecPtE", tiny_world)
    profiles = model.pte_item_emb
    assert model.item_table().shape == profiles.shape  # no truncation: the encoder's dimension
    assert torch.allclose(model.item_table(), whitening(profiles, profiles.shape[1]), atol=1e-5)
    assert all(not name.startswith("frozen_items") for name, _ in model.named_parameters())
    assert "frozen_items" not in model.state_dict()  # rebuilt from the tables, never in a checkpoint
    # user fusion: the guidance moves by W_u z_u for users with a profile
    interaction = next(iter(train_data))
    model.eval()
    with torch.no_grad():
        fused = model.encode(interaction)
        plain = type(model).__mro__[1].encode(model, interaction)
    z = model.user_profile_w[interaction[model.USER_ID], 0]
    assert torch.allclose(fused - plain, (z.abs().sum(-1, keepdim=True) > 0) * model.user_proj(z), atol=1e-5)
    # the linear adapter starts as the identity, so it begins where the frozen table is
    _, adapted, _, _, _ = _build("DreamRecPtE", tiny_world, dreamrec_adapter="linear", item_mode="text_only")
    assert torch.allclose(adapted.item_table(), whitening(adapted.item_text_emb, adapted.item_text_emb.shape[1]), atol=1e-5)


@pytest.mark.parametrize("key, value, words", [
    ("loss_type", "CE", "DreamRec[loss_type=MSE]"),
    ("dreamrec_sample_stride", 0, "dreamrec_sample_stride 0: must be a whole number >= 1"),
    ("dreamrec_cond_dropout", 1.0, "dreamrec_cond_dropout 1.0"),
    ("dreamrec_scoring", "average", "dreamrec_scoring 'average': choose one of ('sample', 'mean')"),
])
def test_bad_settings_are_one_line(tiny_world, key, value, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        _build("DreamRec", tiny_world, **{key: value})


@pytest.mark.parametrize("model, key, value, words", [
    ("DreamRecPtE", "user_fusion", "concat", "DreamRecPtE: user_fusion 'concat': add | none"),
    ("DreamRecPtE", "item_mode", "profile", "DreamRecPtE: item_mode 'profile': choose one of"),
    ("PtE", "item_mode", "profile", "PtE: item_mode 'profile': choose one of"),
    ("PtE", "user_fusion", "sum", "PtE: user_fusion 'sum': concat | add | none"),
])
def test_pte_backbones_bad_modes_are_one_line(tiny_world, model, key, value, words):
    """Both PtE backbones refuse an unknown mode with the same error class (one line at the command line)."""
    with pytest.raises(ConfigError, match=words.replace("|", r"\|")):
        _build(model, tiny_world, **{key: value})


@pytest.mark.parametrize("model, scoring", [("DreamRec", "sample"), ("DreamRec", "mean"), ("DreamRecPtE", "sample")])
def test_dreamrec_learns(tiny_world, model, scoring):
    """The tiny world's walks: the generated (or expected) item ranks the next step above popularity by the common
    margin."""
    cfg = {**TINY_LEARN, "data_path": tiny_world, **PTE_TEMPLATE, "dreamrec_scoring": scoring}
    _, _, losses, result, pop = fit_and_test(Config(model, TINY, config_dict=cfg, argv=[]), epochs=12)
    assert losses[-1] < losses[0]
    assert result["hit@10"] > pop + LEARNS_MARGIN, (result["hit@10"], pop)
