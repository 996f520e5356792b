"""Sequence encoders behind one switch (``backbone``): ``[B, L, D]`` item states -> ``[B, D]`` read-out.

Every model of the package embeds items its own way (ID table, projected LLM text, fusions) and hands
the ``[B, L, D]`` token states to one of these, read out at each sequence's last item:

* ``SASRec`` — causal self-attention (:class:`~recbole_llmfuse.model.layers.FastTransformerEncoder`);
* ``BERT4Rec`` — the same Transformer with bidirectional attention over the history (BERT4Rec's encoder, Sun et
  al., CIKM 2019), read out at the last item and trained on the next item like every backbone here, not with
  BERT4Rec's cloze objective (the target is never in the input, so seeing the whole history leaks nothing);
* ``FMLPRec`` — FMLP-Rec's learnable frequency filters (Zhou et al., WWW 2022): rFFT over the sequence
  axis, element-wise complex weights ``[L//2+1, D]``, irFFT, dropout, residual, LayerNorm; then the
  transformer block's feed-forward sub-layer. Not in RecBole, written here;
* ``LRURec`` — linear recurrent units (Yue et al., WSDM 2024): per block a complex diagonal recurrence
  ``h_t = lambda * h_{t-1} + gamma * B x_t``, ``y_t = Re(C h_t) + D x_t`` (state size ``2D``, ring init
  ``|lambda|`` in [0.8, 0.99]), dropout, residual, LayerNorm, then the feed-forward sub-layer. The
  recurrence is computed in parallel as a causal convolution with the kernel ``lambda^k`` (exact; no
  left-padding needed with RecBole's right-padded sequences). Not in RecBole, written here;
* ``GRU4Rec`` — RecBole's GRU4Rec encoder (GRU over the sequence, then ``Linear(hidden, D)``);
* ``NARM`` — RecBole's NARM encoder (GRU, attention over its states against the last one, ``[local ;
  global]`` -> ``Linear(2D, D)``).

:class:`SequenceBackbone` adds what goes between the token lookup and the encoder in RecBole's models
(learned positions, LayerNorm, dropout for SASRec/FMLPRec; LayerNorm and dropout for LRURec; dropout for
the RNNs).
"""
from __future__ import annotations

import torch
from torch import nn

from recbole_llmfuse.model.layers import Dropout, FastTransformerEncoder, activation

BACKBONES = ("SASRec", "BERT4Rec", "FMLPRec", "LRURec", "GRU4Rec", "NARM")
#: backbones that add learned positions to the item states before encoding
POSITIONAL = ("SASRec", "BERT4Rec", "FMLPRec")
#: backbones built on the Transformer encoder
TRANSFORMERS = ("SASRec", "BERT4Rec")
TRANSFORMER_KEYS = (
    "n_layers",
    "n_heads",
    "hidden_size",
    "inner_size",
    "hidden_dropout_prob",
    "attn_dropout_prob",
    "hidden_act",
    "layer_norm_eps",
)


def gather_last(states: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
    """``states [B, L, D]`` at position ``item_seq_len - 1`` -> ``[B, D]``."""
    return states[torch.arange(states.shape[0], device=states.device), item_seq_len - 1]


class FeedForward(nn.Module):
    """Position-wise ``Linear -> act -> Linear -> dropout -> +residual -> LayerNorm`` (BERT/SASRec sub-layer)."""

    def __init__(self, hidden: int, inner: int, dropout: float, act: str, eps: float):
        super().__init__()
        self.dense_1, self.dense_2 = nn.Linear(hidden, inner), nn.Linear(inner, hidden)
        self.act, self.dropout, self.norm = activation(act), Dropout(dropout), nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dropout(self.dense_2(self.act(self.dense_1(x)))) + x)


class FilterLayer(nn.Module):
    """FMLP-Rec's frequency filter: ``LN(x + dropout(irfft(rfft(x) * W)))`` over ``[B, L, D]``."""

    def __init__(self, max_len: int, hidden: int, dropout: float, eps: float):
        super().__init__()
        self.complex_weight = nn.Parameter(torch.randn(1, max_len // 2 + 1, hidden, 2) * 0.02)
        self.dropout, self.norm = Dropout(dropout), nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        spectrum = torch.fft.rfft(x.float(), dim=1, norm="ortho")
        filtered = torch.fft.irfft(spectrum * torch.view_as_complex(self.complex_weight), n=length, dim=1, norm="ortho")
        return self.norm(self.dropout(filtered.to(x.dtype)) + x)


class FMLPEncoder(nn.Module):
    """``n_layers`` x (:class:`FilterLayer` -> :class:`FeedForward`); ``[B, L, D] -> [B, L, D]``.

    As in FMLP-Rec, no attention mask: padding positions are zero-embedded inputs, and the filter sees the
    whole (right-padded, in RecBole) sequence.
    """

    def __init__(self, config, max_len: int, hidden: int):
        super().__init__()
        eps, drop = config["layer_norm_eps"], config["hidden_dropout_prob"]
        self.layers = nn.ModuleList(
            nn.Sequential(FilterLayer(max_len, hidden, drop, eps),
                          FeedForward(hidden, config["inner_size"], drop, config["hidden_act"], eps))
            for _ in range(config["n_layers"])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class LRULayer(nn.Module):
    """Linear recurrent unit over ``[B, L, D]`` (complex diagonal state of size ``state``), causal."""

    def __init__(self, hidden: int, state: int, r_min: float = 0.8, r_max: float = 0.99, max_phase: float = 6.283):
        super().__init__()
        u1, u2 = torch.rand(state), torch.rand(state)
        nu = torch.log(-0.5 * torch.log(u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2))
        theta = torch.log(max_phase * u2)
        self.nu_log, self.theta_log = nn.Parameter(nu), nn.Parameter(theta)
        magnitude = torch.exp(-torch.exp(nu))
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - magnitude ** 2)))
        self.B = nn.Parameter(torch.randn(state, hidden, 2) / (2 * hidden) ** 0.5)
        self.C = nn.Parameter(torch.randn(hidden, state, 2) / state ** 0.5)
        self.D = nn.Parameter(torch.randn(hidden) / hidden ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        lam = torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))  # [N]
        u = torch.einsum("bld,nd->bln", x.float().to(torch.complex64), torch.view_as_complex(self.B))
        u = u * torch.exp(self.gamma_log)
        steps = torch.arange(length, device=x.device)
        lag = steps[:, None] - steps[None, :]  # [L(t), L(s)]
        kernel = lam[None, None, :] ** lag.clamp_min(0)[..., None]  # lambda^(t-s)
        kernel = kernel * (lag >= 0)[..., None]
        h = torch.einsum("tsn,bsn->btn", kernel, u)
        y = torch.einsum("btn,dn->btd", h, torch.view_as_complex(self.C)).real
        return (y + x.float() * self.D).to(x.dtype)


class LRUEncoder(nn.Module):
    """``n_layers`` x (LRU -> dropout -> +residual -> LayerNorm -> :class:`FeedForward`); ``[B, L, D] -> [B, L, D]``."""

    def __init__(self, config, hidden: int):
        super().__init__()
        eps, drop = config["layer_norm_eps"], config["hidden_dropout_prob"]
        self.lru = nn.ModuleList(LRULayer(hidden, 2 * hidden) for _ in range(config["n_layers"]))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden, eps=eps) for _ in range(config["n_layers"]))
        self.ffn = nn.ModuleList(FeedForward(hidden, config["inner_size"], drop, config["hidden_act"], eps)
                                 for _ in range(config["n_layers"]))
        self.dropout = Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lru, norm, ffn in zip(self.lru, self.norms, self.ffn):
            x = ffn(norm(x + self.dropout(lru(x))))
        return x


class NARMEncoder(nn.Module):
    """RecBole's NARM after its embedding dropout: ``[B, L, D] -> [B, D]``."""

    def __init__(self, config, hidden: int):
        super().__init__()
        self.gru = nn.GRU(hidden, hidden, num_layers=config["n_layers"], bias=False, batch_first=True)
        self.a_1, self.a_2 = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
        self.v_t = nn.Linear(hidden, 1, bias=False)
        self.ct_dropout = Dropout(config["dropout_probs"][1] if config["dropout_probs"] else config["hidden_dropout_prob"])
        self.b = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(x)
        last = gather_last(states, item_seq_len)  # global encoder
        mask = (item_seq > 0).unsqueeze(2).expand_as(states)
        alpha = self.v_t(mask * torch.sigmoid(self.a_1(states) + self.a_2(last).unsqueeze(1).expand_as(states)))
        local = torch.sum(alpha.expand_as(states) * states, 1)
        return self.b(self.ct_dropout(torch.cat([local, last], 1)))


class SequenceBackbone(nn.Module):
    """``embed`` (positions + LayerNorm + dropout) then ``encode``; ``forward(item_emb [B, L, D], item_seq [B, L],
    item_seq_len [B]) -> [B, D]``. ``kind`` is one of :data:`BACKBONES`; ``D`` = ``hidden_size``.

    ``SASRec`` is exactly RecBole SASRec's ``forward`` after its item-embedding lookup. Models that build
    their own input states (FAERec's gated fusion) call :meth:`encode` directly and may reuse
    ``position_embedding``.
    """

    def __init__(self, config, max_seq_length: int, hidden_size: int = None, causal: bool = True, kind: str = None):
        super().__init__()
        kind = kind or config["backbone"]
        if kind not in BACKBONES:
            raise ValueError(f"backbone '{kind}' is not supported; choose one of {BACKBONES}")
        self.kind = kind
        self.hidden_size = hidden_size or config["hidden_size"]
        self.causal = causal and kind != "BERT4Rec"
        d = self.hidden_size
        self.position_embedding = nn.Embedding(max_seq_length, d) if kind in POSITIONAL else None
        self.LayerNorm = nn.LayerNorm(d, eps=config["layer_norm_eps"]) if kind in POSITIONAL + ("LRURec",) else None
        if kind == "GRU4Rec":
            self.dropout = Dropout(config["dropout_prob"] if config["dropout_prob"] is not None else config["hidden_dropout_prob"])
            self.gru = nn.GRU(d, d, num_layers=config["num_layers"], bias=False, batch_first=True)
            self.dense = nn.Linear(d, d)
            return
        if kind == "NARM":
            self.dropout = Dropout(config["dropout_probs"][0] if config["dropout_probs"] else config["hidden_dropout_prob"])
            self.encoder = NARMEncoder(config, d)
            return
        self.dropout = Dropout(config["hidden_dropout_prob"])
        if kind == "LRURec":
            self.encoder = LRUEncoder(config, d)
        elif kind in TRANSFORMERS:
            kwargs = {k: config[k] for k in TRANSFORMER_KEYS}
            kwargs["hidden_size"] = d
            self.encoder = FastTransformerEncoder(**kwargs)
        else:
            self.encoder = FMLPEncoder(config, max_seq_length, d)

    def positions(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Learned position vectors ``[L, D]`` (``None`` for GRU4Rec)."""
        if self.position_embedding is None:
            return None
        return self.position_embedding(torch.arange(item_seq.size(1), device=item_seq.device))

    def embed(self, item_emb: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        if self.position_embedding is not None:
            item_emb = item_emb + self.positions(item_seq)
        if self.LayerNorm is not None:
            item_emb = self.LayerNorm(item_emb)
        return self.dropout(item_emb)

    def encode(self, hidden: torch.Tensor, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """Prepared states ``[B, L, D]`` -> read-out ``[B, D]`` at each sequence's last item."""
        if self.kind in TRANSFORMERS:
            return self.encoder.forward_at(hidden, item_seq != 0, item_seq_len - 1, causal=self.causal)
        if self.kind in ("FMLPRec", "LRURec"):
            return gather_last(self.encoder(hidden), item_seq_len)
        if self.kind == "NARM":
            return self.encoder(hidden, item_seq, item_seq_len)
        out, _ = self.gru(hidden)
        return gather_last(self.dense(out), item_seq_len)

    def forward(self, item_emb: torch.Tensor, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        return self.encode(self.embed(item_emb, item_seq), item_seq, item_seq_len)
