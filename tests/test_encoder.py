"""The fast shared encoder computes exactly RecBole's TransformerEncoder (masking and block order)."""
from __future__ import annotations

import pytest
import torch
from recbole.model.layers import TransformerEncoder

from recbole_llmfuse.model.layers import FastTransformerEncoder, dropout

B, L, D = 32, 12, 64


def _pair(**kwargs):
    torch.manual_seed(0)
    ref = TransformerEncoder(**kwargs).eval()
    fast = FastTransformerEncoder(**kwargs).eval()
    fast.load_recbole_state_dict(ref.state_dict())
    return ref, fast


def _inputs():
    torch.manual_seed(1)
    x = torch.randn(B, L, D)
    lengths = torch.randint(1, L + 1, (B,))
    lengths[0] = L
    padding = torch.arange(L)[None, :] < lengths[:, None]  # right-padded, as RecBole builds sequences
    return x, lengths, padding


def _recbole_mask(padding, causal):
    mask = padding[:, None, None, :]
    if causal:
        mask = torch.tril(mask.expand(-1, -1, L, -1))
    return torch.where(mask, 0.0, -10000.0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hidden_act", ["gelu", "relu", "swish"])
def test_equals_recbole_at_every_real_position(causal, hidden_act):
    ref, fast = _pair(hidden_act=hidden_act)
    x, lengths, padding = _inputs()
    with torch.no_grad():
        expected = ref(x, _recbole_mask(padding, causal))[-1]
        got = fast(x, padding, causal=causal)
        got_explicit = fast(x, padding, causal=causal, right_padded=False)  # explicit-mask path
        got_last = fast.forward_at(x, padding, lengths - 1, causal=causal)
    assert torch.allclose(got[padding], expected[padding], atol=1e-5)
    assert torch.allclose(got_explicit[padding], expected[padding], atol=1e-5)
    assert torch.allclose(got_last, expected[torch.arange(B), lengths - 1], atol=1e-5)


def test_all_layers_output_like_recbole():
    ref, fast = _pair(n_layers=3)
    x, _, padding = _inputs()
    with torch.no_grad():
        expected = ref(x, _recbole_mask(padding, True), output_all_encoded_layers=True)
        got = fast(x, padding, output_all_encoded_layers=True)
    assert len(got) == 3
    for e, g in zip(expected, got):
        assert torch.allclose(g[padding], e[padding], atol=1e-5)


def test_left_padding_needs_the_explicit_mask():
    """With left padding the fast causal path would attend to padding: right_padded=False must match RecBole."""
    ref, fast = _pair()
    x, _, padding = _inputs()
    padding = padding.flip(1)
    with torch.no_grad():
        expected = ref(x, _recbole_mask(padding, True))[-1]
        got = fast(x, padding, causal=True, right_padded=False)
    assert torch.allclose(got[padding], expected[padding], atol=1e-5)


def test_fast_dropout_distribution_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    assert dropout(x, 0.3, training=False) is x


def test_training_mode_runs_backward_through_every_path():
    torch.manual_seed(0)
    fast = FastTransformerEncoder(hidden_dropout_prob=0.2, attn_dropout_prob=0.2).train()
    x, lengths, padding = _inputs()
    x.requires_grad_(True)
    out = fast.forward_at(x, padding, lengths - 1) .sum() + fast(x, padding, causal=False).sum()
    out.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_lru_parallel_kernel_equals_the_recurrence():
    """LRURec's layer computes h_t = lambda h_{t-1} + gamma B x_t as a causal convolution: same values."""
    from recbole_llmfuse.model.encoders import LRULayer

    torch.manual_seed(0)
    layer = LRULayer(hidden=8, state=16)
    x = torch.randn(3, 7, 8)
    lam = torch.exp(torch.complex(-torch.exp(layer.nu_log), torch.exp(layer.theta_log)))
    B, C = torch.view_as_complex(layer.B), torch.view_as_complex(layer.C)
    h = torch.zeros(3, 16, dtype=torch.complex64)
    expected = []
    for t in range(7):
        h = lam * h + torch.exp(layer.gamma_log) * (x[:, t].to(torch.complex64) @ B.T)
        expected.append((h @ C.T).real + x[:, t] * layer.D)
    with torch.no_grad():
        assert torch.allclose(layer(x), torch.stack(expected, 1), atol=1e-5)
    assert (lam.abs() > 0.79).all() and (lam.abs() < 0.991).all()  # ring initialisation


@pytest.mark.parametrize("kind", ["SASRec", "LRURec", "GRU4Rec", "NARM"])
def test_backbones_are_causal_at_the_read_out(kind):
    """The read-out at position len-1 ignores what follows it. (FMLPRec filters the whole padded sequence,
    as the original does; RecBole's training prefixes never hold future items, so nothing leaks.)"""
    from recbole_llmfuse.model.encoders import SequenceBackbone

    cfg = {"n_layers": 2, "n_heads": 2, "hidden_size": 8, "inner_size": 16, "hidden_dropout_prob": 0.0,
           "attn_dropout_prob": 0.0, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "backbone": kind,
           "dropout_prob": 0.0, "num_layers": 1, "dropout_probs": [0.0, 0.0]}
    torch.manual_seed(0)
    backbone = SequenceBackbone(_Cfg(cfg), max_seq_length=6).eval()
    seq = torch.tensor([[3, 4, 5, 0, 0, 0]])
    emb = torch.randn(1, 6, 8)
    other = emb.clone()
    other[:, 3:] = torch.randn(1, 3, 8)  # change everything after the last item
    length = torch.tensor([3])
    assert torch.allclose(backbone(emb, seq, length), backbone(other, seq, length), atol=1e-5)


class _Cfg(dict):
    def __getitem__(self, key):
        return self.get(key)
