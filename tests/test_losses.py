"""Alignment losses: MK-MMD behaves like a distance between distributions; the others on known cases."""
from __future__ import annotations

import pytest
import torch

from recbole_llmfuse.losses import ALIGNMENT_LOSSES, alignment_loss, cosine_alignment, info_nce, linear_mmd, mk_mmd


def _sets(n=300, d=64, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, d, generator=g) + shift
    return x, y


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian"])
def test_mk_mmd_near_zero_for_identical_and_same_distribution(kernel):
    x, y = _sets()
    assert abs(float(mk_mmd(x, x, kernel))) < 5 * 5 / 300  # unbiased estimator: O(kernels / n)
    assert abs(float(mk_mmd(x, y, kernel))) < 0.02  # two samples of one distribution


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian"])
def test_mk_mmd_grows_with_the_shift(kernel):
    values = [float(mk_mmd(*_sets(shift=s), kernel)) for s in (0.0, 0.1, 0.3, 1.0)]
    assert values == sorted(values)
    assert values[-1] > 0.3 and values[2] > 10 * abs(values[0])


def test_fixed_bandwidth_vanishes_on_raw_embeddings_where_adaptive_does_not():
    """The spec's numpy check: 128-d normal sets shifted by 0.3 — fixed sigma=2^u gives ~0, adaptive ~0.1."""
    x, y = _sets(d=128, shift=0.3)
    assert float(mk_mmd(x, y, bandwidth="fixed")) < 1e-6
    assert float(mk_mmd(x, y, bandwidth="adaptive")) > 0.05


def test_mk_mmd_gradient_reaches_both_sets():
    x, y = _sets(n=50, d=8, shift=0.5)
    x.requires_grad_(True), y.requires_grad_(True)
    mk_mmd(x, y).backward()
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0


def test_linear_cosine_infonce_on_known_cases():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(linear_mmd(x, x + 1.0)) == pytest.approx(2.0)
    assert float(cosine_alignment(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_alignment(x, -x)) == pytest.approx(2.0)
    aligned = info_nce(torch.eye(4), torch.eye(4), temperature=0.05)
    shuffled = info_nce(torch.eye(4), torch.eye(4)[[1, 0, 3, 2]], temperature=0.05)
    assert float(aligned) < 1e-3 < 1.0 < float(shuffled)
    # a repeated item is not its own negative: two copies of one item give the same loss as one
    ids = torch.tensor([5, 5, 7])
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert float(info_nce(y, y, 0.05, ids)) < 1e-3 < float(info_nce(y, y, 0.05))


def test_alignment_loss_by_name():
    x, y = _sets(n=40, d=8, shift=1.0)
    for name in ALIGNMENT_LOSSES:
        value = float(alignment_loss(name, x, y, ids=torch.arange(40)))
        assert value == 0.0 if name == "none" else value > 0.0
    with pytest.raises(ValueError, match="unknown alignment loss"):
        alignment_loss("kl", x, y)


def test_barlow_twins_zero_for_identical_views_and_grouped_skips_tiny_groups():
    from recbole_llmfuse.losses import barlow_twins, grouped_barlow_twins

    x, y = _sets(n=2000, d=4)
    same = float(barlow_twins(x, x, 0.0))  # C_kk = (S-1)/S per the code's normaliser
    assert same == pytest.approx(4 * (1 / 2000) ** 2, abs=1e-5)
    assert float(barlow_twins(x, y)) > 3.5  # independent views: C_kk ~ 0 -> ~ d
    decorrelated = float(barlow_twins(x, x, 1.0))
    assert decorrelated < 0.05  # independent columns: off-diagonal ~ 0
    assert float(barlow_twins(x[:1], y[:1])) == 0.0
    pop = torch.tensor([9, 1, 2, 3], dtype=torch.float)  # median 2: high = rows 0, 2, 3; low = row 1 alone, skipped
    value = grouped_barlow_twins(x[:4], y[:4], pop)
    rows = torch.tensor([0, 2, 3])
    assert torch.isfinite(value) and float(value) == pytest.approx(float(barlow_twins(x[rows], y[rows])))
    assert float(grouped_barlow_twins(x, y, torch.ones(2000), split=False)) == pytest.approx(float(barlow_twins(x, y)))


def test_ila_infonce_is_smallest_when_the_two_tables_are_equal():
    x, _ = _sets(n=64, d=16)
    equal = float(info_nce(x, x, temperature=0.05))
    for scale in (0.1, 0.5, 2.0):
        noisy = x + scale * torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
        assert equal < float(info_nce(x, noisy, temperature=0.05))
