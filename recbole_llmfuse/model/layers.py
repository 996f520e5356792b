"""Shared layers: the fast transformer sequence encoder every model of this package uses, and the whitening
of frozen text tables (PtE, LLMInit).

The block is RecBole's ``TransformerEncoder`` (post-LayerNorm BERT/SASRec block: attention -> dropout ->
residual -> LayerNorm -> FFN -> dropout -> residual -> LayerNorm) with the same hyper-parameter names,
built on PyTorch's fused primitives: one ``qkv`` projection, ``F.scaled_dot_product_attention`` and
``F.gelu``. With dropout off and the same weights, outputs equal RecBole's at every non-padding
position (``tests/test_encoder.py``); :meth:`FastTransformerEncoder.load_recbole_state_dict` copies the
weights of a RecBole ``TransformerEncoder`` in.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU, the function RecBole's hand-written `gelu` computes
    "relu": F.relu,
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


class _FastDropout(torch.autograd.Function):
    """``x * mask``, the mask drawn with ``rand_like`` and pre-scaled; backward reuses the saved mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, same distribution as ``F.dropout``, faster on CPU.

    On CPU ``F.dropout`` draws its mask with ``bernoulli_``, about 4x slower than ``rand_like(x) >= p``
    (measured on these 2-core machines: 92 ms vs 24 ms for 6.5M elements); dropout masks were the
    largest single cost of SASRec training. CUDA keeps PyTorch's fused kernel.
    """
    if not training or p == 0.0:
        return x
    if x.is_cuda or p >= 1.0 or not torch.is_floating_point(x):
        return F.dropout(x, p, True)
    return _FastDropout.apply(x, p)


class Dropout(nn.Module):
    """``nn.Dropout`` with the fast CPU mask of :func:`dropout`."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    is_causal: bool,
    dropout_p: float,
) -> torch.Tensor:
    """Scaled dot-product attention over ``[B, H, L, Dh]`` tensors; returns ``[B, H, L, Dh]``.

    ``F.scaled_dot_product_attention`` everywhere except CPU training with attention dropout, where
    PyTorch falls back to an unfused path that is slower than this explicit one (dropout on the
    attention probabilities, as in RecBole, with the fast mask above).
    """
    if dropout_p == 0.0 or q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # [B, H, L, L]
    if is_causal:
        length = q.shape[-2]
        attn_mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(dropout(scores.softmax(-1), dropout_p, True), v)


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"hidden_act '{name}' is not supported; choose one of {sorted(_ACTIVATIONS)}") from None


class FastTransformerLayer(nn.Module):
    """One post-LN transformer block. Input and output ``[B, L, D]``."""

    def __init__(
        self,
        n_heads: int,
        hidden_size: int,
        inner_size: int,
        hidden_dropout_prob: float,
        attn_dropout_prob: float,
        hidden_act: str,
        layer_norm_eps: float,
    ):
        super().__init__()
        if hidden_size % n_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of n_heads ({n_heads})")
        self.n_heads = n_heads
        self.attn_dropout_prob = attn_dropout_prob
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.attn_out = nn.Linear(hidden_size, hidden_size)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.ffn_in = nn.Linear(hidden_size, inner_size)
        self.ffn_out = nn.Linear(inner_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = Dropout(hidden_dropout_prob)
        self.act = activation(hidden_act)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        """``x [B, L, D]``; ``attn_mask`` boolean, broadcastable to ``[B, H, L, L]`` (True = may attend)."""
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        ctx = attention(q, k, v, attn_mask, is_causal, self.attn_dropout_prob if self.training else 0.0)
        return self._feed_forward(ctx.transpose(1, 2).reshape(b, l, d), x)

    def forward_at(self, x: torch.Tensor, attn_mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The block's output at one position per sequence only: ``x [B, L, D]``, ``index [B]`` -> ``[B, D]``.

        Keys and values use every position; the query, the output projection and the feed-forward run
        on ``B`` rows instead of ``B * L``. ``attn_mask`` is ``[B, 1, 1, L]`` for the queried position.
        """
        b, l, d = x.shape
        h = self.n_heads
        w_q, w_kv = self.qkv.weight.split([d, 2 * d])
        b_q, b_kv = self.qkv.bias.split([d, 2 * d])
        x_at = x[torch.arange(b, device=x.device), index]  # [B, D]
        q = F.linear(x_at, w_q, b_q).view(b, h, 1, d // h)
        k, v = F.linear(x, w_kv, b_kv).view(b, l, 2, h, d // h).permute(2, 0, 3, 1, 4)
        ctx = attention(q, k, v, attn_mask, False, self.attn_dropout_prob if self.training else 0.0)
        return self._feed_forward(ctx.reshape(b, d), x_at)

    def _feed_forward(self, ctx: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(self.dropout(self.attn_out(ctx)) + residual)
        return self.ffn_norm(self.dropout(self.ffn_out(self.act(self.ffn_in(h)))) + h)


class FastTransformerEncoder(nn.Module):
    """A stack of :class:`FastTransformerLayer` with RecBole's ``TransformerEncoder`` arguments.

    Args:
        n_layers, n_heads, hidden_size, inner_size, hidden_dropout_prob, attn_dropout_prob,
        hidden_act, layer_norm_eps: as in RecBole (``properties/model/SASRec.yaml``).
    """

    def __init__(
        self,
        n_layers: int = 2,
        n_heads: int = 2,
        hidden_size: int = 64,
        inner_size: int = 256,
        hidden_dropout_prob: float = 0.5,
        attn_dropout_prob: float = 0.5,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        self.layer = nn.ModuleList(
            FastTransformerLayer(
                n_heads, hidden_size, inner_size, hidden_dropout_prob, attn_dropout_prob, hidden_act, layer_norm_eps
            )
            for _ in range(n_layers)
        )

    @staticmethod
    def attention_mask(
        padding_mask: torch.Tensor, causal: bool, right_padded: bool = True
    ) -> "tuple[Optional[torch.Tensor], bool]":
        """``(attn_mask, is_causal)`` for :func:`F.scaled_dot_product_attention`.

        ``padding_mask [B, L]`` is True at real items. RecBole's sequences are right-padded (items at
        positions ``0..len-1``), so a causal mask alone already keeps every real position from seeing
        padding: the fused causal kernel is used with no explicit mask. Otherwise an explicit boolean
        mask is built; each query may always attend to itself, so no row is fully masked (RecBole's
        additive -10000 mask gives such padding rows uniform weights; both are ignored downstream).
        """
        if causal and right_padded:
            return None, True
        b, l = padding_mask.shape
        mask = padding_mask[:, None, None, :]  # [B, 1, 1, L]
        if causal:
            mask = mask & torch.ones(l, l, dtype=torch.bool, device=padding_mask.device).tril()
        mask = mask | torch.eye(l, dtype=torch.bool, device=padding_mask.device)
        return mask, False

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor,
        causal: bool = True,
        right_padded: bool = True,
        output_all_encoded_layers: bool = False,
    ):
        """``hidden_states [B, L, D]``, ``padding_mask [B, L]`` (True = real item).

        Returns ``[B, L, D]``, or the list of every layer's output when ``output_all_encoded_layers``.
        """
        attn_mask, is_causal = self.attention_mask(padding_mask, causal, right_padded)
        outputs: List[torch.Tensor] = []
        for layer in self.layer:
            hidden_states = layer(hidden_states, attn_mask, is_causal)
            if output_all_encoded_layers:
                outputs.append(hidden_states)
        return outputs if output_all_encoded_layers else hidden_states

    def forward_at(
        self, hidden_states: torch.Tensor, padding_mask: torch.Tensor, index: torch.Tensor, causal: bool = True,
        right_padded: bool = True,
    ) -> torch.Tensor:
        """The last layer's output at position ``index[b]`` of each sequence: ``[B, D]``.

        Equal to ``forward(...)[arange(B), index]``, but the last layer computes only those rows (the
        read-out SASRec-style models need), which skips most of that layer's work.
        """
        attn_mask, is_causal = self.attention_mask(padding_mask, causal, right_padded)
        for layer in self.layer[:-1]:
            hidden_states = layer(hidden_states, attn_mask, is_causal)
        b, l = padding_mask.shape
        if attn_mask is None:  # causal, right-padded: keys 0..index
            row_mask = torch.arange(l, device=index.device)[None, :] <= index[:, None]
        else:
            full = attn_mask.expand(b, 1, l, l)
            row_mask = full[torch.arange(b, device=index.device), 0, index]  # [B, L]
        return self.layer[-1].forward_at(hidden_states, row_mask[:, None, None, :], index)

    @staticmethod
    def convert_recbole_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Map the ``state_dict`` of a RecBole ``TransformerEncoder`` onto this module's names."""
        out: Dict[str, torch.Tensor] = {}
        n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layer."))
        for i in range(n_layers):
            p = f"layer.{i}."
            mha, ffn = p + "multi_head_attention.", p + "feed_forward."
            for kind in ("weight", "bias"):
                out[p + "qkv." + kind] = torch.cat([state[mha + n + "." + kind] for n in ("query", "key", "value")])
                out[p + "attn_out." + kind] = state[mha + "dense." + kind]
                out[p + "attn_norm." + kind] = state[mha + "LayerNorm." + kind]
                out[p + "ffn_in." + kind] = state[ffn + "dense_1." + kind]
                out[p + "ffn_out." + kind] = state[ffn + "dense_2." + kind]
                out[p + "ffn_norm." + kind] = state[ffn + "LayerNorm." + kind]
        return out

    def load_recbole_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Copy the weights of a RecBole ``TransformerEncoder`` (its ``state_dict()``) into this encoder."""
        self.load_state_dict(self.convert_recbole_state_dict(state))


class MLP(nn.Module):
    """``Linear -> act -> Dropout`` per hidden size, then a final ``Linear``: ``[*, in_dim] -> [*, out_dim]``.

    ``hidden_sizes=[]`` is a single ``Linear(in_dim, out_dim)`` (MoRec's projector).
    """

    def __init__(self, in_dim: int, hidden_sizes: List[int], out_dim: int, dropout_prob: float = 0.0, act: str = "gelu"):
        super().__init__()
        layers: List[nn.Module] = []
        sizes = [in_dim] + list(hidden_sizes or [])
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), _Activation(act), Dropout(dropout_prob)]
        layers.append(nn.Linear(sizes[-1], out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name, self.fn = name, activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def principal_axes(table: torch.Tensor, eps: float = 1e-6):
    """PCA of the non-zero rows of ``table [N, d]`` (padding and items without a vector are all-zero rows and
    stay out of the fit): ``(mean [d], eigenvalues [d] descending, eigenvectors [d, d] as columns, rows [N]
    bool)``, in float64. ``None`` when fewer than two rows have a vector."""
    x = table.double()
    rows = x.abs().sum(-1) > 0
    if int(rows.sum()) < 2:
        return None
    fit = x[rows]
    mean = fit.mean(0)
    cov = (fit - mean).T @ (fit - mean) / max(1, len(fit) - 1)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    return mean, values.flip(0).clamp(min=0), vectors.flip(1), rows


def whitening(table: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """``Whiten_k`` of spec PtE §4.7 (AlphaFuse's standardised PCA): centre the non-zero rows of ``table [N, d]``,
    rotate to the covariance eigenbasis, scale each direction by ``1/sqrt(eigenvalue)``, keep the top ``k``.
    Returns ``[N, k]`` (all-zero rows — padding, items without a vector — stay zero)."""
    return project_on_axes(table, k, standardize=True, eps=eps)


def project_on_axes(table: torch.Tensor, k: int, standardize: bool, eps: float = 1e-6) -> torch.Tensor:
    """``table [N, d]`` centred and projected on its top ``k`` principal axes (:func:`principal_axes`), each
    divided by ``sqrt(eigenvalue)`` when ``standardize``: ``[N, min(k, d)]``; all-zero rows stay zero."""
    k = min(k, table.shape[-1])
    axes = principal_axes(table, eps)
    if axes is None:  # nothing to fit (e.g. no item profiles: item_mode text_only)
        return torch.zeros(table.shape[0], k)
    mean, values, vectors, rows = axes
    out = (table.double() - mean) @ vectors[:, :k]
    if standardize:
        out = out / torch.sqrt(values[:k].clamp(min=eps))
    return (out * rows.unsqueeze(-1)).float()
