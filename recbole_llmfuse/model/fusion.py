"""Shared parts of the LLM-fusion models: item-token sources, sequence experts, frequency buckets, gates.

An *expert* is a sequence backbone (:class:`~recbole_llmfuse.model.encoders.SequenceBackbone`) fed by an
*item-token source* that maps item ids to vectors; the same source gives the candidate vectors, so an
expert scores ``<u, x(i)>``. Sources:

* :class:`IDTokens` — a trainable ID table ``[n_items, d]``;
* :class:`TextTokens` — a trainable projector over the frozen LLM table (``T`` is passed in at call time,
  so one buffer serves every projector; it never receives gradient);
* :class:`FusedTokens` — ID ⊕ projected text (``concat_linear``: concatenation then ``Linear(2d, d)``,
  as PAD's authors' ``CAT``; ``concat``: ``2d`` tokens; ``sum``).

PAD's three experts, Hybrid and MoRec are these parts with different sources; FAERec's gated fusion
plugs in as another source.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from recbole_llmfuse.model.base import LLMFusedSequentialRecommender
from recbole_llmfuse.model.encoders import SequenceBackbone
from recbole_llmfuse.model.layers import MLP

FUSIONS = ("concat_linear", "concat", "sum")
GATES = ("bucket", "mlp", "global")


class IDTokens(nn.Module):
    """``items [*] -> [*, d]`` from a trainable table (row 0 = padding)."""

    def __init__(self, n_items: int, dim: int):
        super().__init__()
        self.dim = dim
        self.embedding = nn.Embedding(n_items, dim, padding_idx=0)

    def forward(self, items: torch.Tensor, table: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.embedding(items)

    def all(self, table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[n_items, d]``"""
        return self.embedding.weight


class TextTokens(nn.Module):
    """``items [*] -> MLP(T[items]) [*, d]``, ``T`` the frozen ``[n_items, text_dim]`` table passed in.

    Each distinct item of a call is projected once (``torch.unique``): a batch of ``B x L`` tokens has
    far fewer distinct items, and the projector (``text_dim`` is 384-4096) would otherwise cost more
    than the transformer. Within a training step (:meth:`begin_step` .. :meth:`end_step`, opened by
    ``LLMFusedSequentialRecommender.shared_projections``) the step's items are projected once, on first
    use, and every call of the step (history, targets, negatives, all items) reads from that projection.
    Equal to per-token projection when dropout is off; with dropout, the copies of one item in a step
    share a mask.
    """

    def __init__(self, text_dim: int, dim: int, hidden_sizes: Sequence[int] = (), dropout_prob: float = 0.0):
        super().__init__()
        self.dim = dim
        self.projector = MLP(text_dim, list(hidden_sizes or []), dim, dropout_prob)
        self._step = None  # (items, table, (distinct items, their projection) once computed)

    def begin_step(self, items: torch.Tensor, table: torch.Tensor) -> None:
        self._step = [items, table, None]

    def end_step(self) -> None:
        self._step = None

    def _step_rows(self, table: torch.Tensor):
        """``(distinct items [U], projection [U, d])`` of the open step, or ``None``."""
        if self._step is None or self._step[1] is not table:
            return None
        if self._step[2] is None:
            uniq = torch.unique(self._step[0])
            self._step[2] = (uniq, self.projector(table[uniq]))
        return self._step[2]

    def forward(self, items: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        rows = self._step_rows(table)
        if rows is not None:
            uniq, projected = rows
            index = torch.searchsorted(uniq, items).clamp_max(uniq.numel() - 1)
            if bool((uniq[index] == items).all()):
                return projected[index]
        uniq, inverse = torch.unique(items, return_inverse=True)
        return self.projector(table[uniq])[inverse]

    def all(self, table: torch.Tensor) -> torch.Tensor:
        rows = self._step_rows(table)
        if rows is not None and rows[0].numel() == table.shape[0]:
            return rows[1]
        return self.projector(table)


class FusedTokens(nn.Module):
    """ID ⊕ projected text: ``fuse(E[i], MLP(T[i]))``; :meth:`parts` exposes both halves (for alignment losses)."""

    def __init__(self, n_items: int, dim: int, text_dim: int, hidden_sizes=(), dropout_prob: float = 0.0,
                 fusion: str = "concat_linear"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion '{fusion}' is not supported; choose one of {FUSIONS}")
        self.fusion = fusion
        self.id = IDTokens(n_items, dim)
        self.text = TextTokens(text_dim, dim, hidden_sizes, dropout_prob)
        self.out = nn.Linear(2 * dim, dim) if fusion == "concat_linear" else None
        self.dim = 2 * dim if fusion == "concat" else dim

    def parts(self, items: torch.Tensor, table: torch.Tensor):
        """``(id [*, d], text [*, d])``"""
        return self.id(items), self.text(items, table)

    def fuse(self, id_vec: torch.Tensor, text_vec: torch.Tensor) -> torch.Tensor:
        if self.fusion == "sum":
            return id_vec + text_vec
        both = torch.cat([id_vec, text_vec], dim=-1)
        return self.out(both) if self.out is not None else both

    def forward(self, items: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return self.fuse(*self.parts(items, table))

    def all(self, table: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.id.all(), self.text.all(table))


class Expert(nn.Module):
    """A token source plus its own sequence backbone (config ``backbone``: SASRec, FMLPRec, GRU4Rec); logits
    are dot products in the expert's space.

    ``forward(item_seq [B, L], item_seq_len [B], table) -> u [B, D]``; ``vectors(items [B] or [B, K])``
    and ``all_vectors() [n_items, D]`` give candidates in the same space.
    """

    def __init__(self, tokens: nn.Module, config, max_seq_length: int):
        super().__init__()
        self.tokens = tokens
        self.backbone = SequenceBackbone(config, max_seq_length, hidden_size=tokens.dim)

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, table: Optional[torch.Tensor] = None):
        return self.backbone(self.tokens(item_seq, table), item_seq, item_seq_len)

    def vectors(self, items: torch.Tensor, table: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.tokens(items, table)

    def all_vectors(self, table: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.tokens.all(table)

    @staticmethod
    def score(u: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """``u [B, D]`` with ``cand [B, D]`` -> ``[B]``, or ``cand [B, K, D]`` -> ``[B, K]``."""
        return (cand * (u if cand.dim() == 2 else u.unsqueeze(1))).sum(-1)


class FrequencyGate(nn.Module):
    """Mixes ``E`` experts' logits by the candidate item's frequency bucket.

    Kinds:
      * ``bucket`` (PAD's authors' code): one learned logit per (bucket, expert); weights
        ``sigmoid(a[b, e]) / sum_e' sigmoid(a[b, e'])``; ``init`` gives the starting ``a`` ``[n_buckets+1, E]``;
      * ``mlp`` (PAD spec §3.4): ``a_e = v_e^T ReLU(W_e [q_b ; u_e])``, ``q_b`` a learned bucket embedding,
        ``u_e`` expert ``e``'s sequence vector; softmax over experts;
      * ``global`` (ablation "w/o frequency-aware gating"): one softmax weight vector for everything.
    """

    def __init__(self, kind: str, n_buckets: int, expert_dims: List[int], init: Optional[torch.Tensor] = None,
                 bucket_dim: int = 16, hidden: int = 64):
        super().__init__()
        if kind not in GATES:
            raise ValueError(f"gate '{kind}' is not supported; choose one of {GATES}")
        self.kind = kind
        n_experts = len(expert_dims)
        if kind == "bucket":
            self.logits = nn.Parameter(init.clone().float() if init is not None else torch.zeros(n_buckets + 1, n_experts))
        elif kind == "global":
            self.logits = nn.Parameter(torch.zeros(n_experts))
        else:
            self.bucket_embedding = nn.Embedding(n_buckets + 1, bucket_dim)
            self.scorers = nn.ModuleList(
                nn.Sequential(nn.Linear(bucket_dim + d, hidden), nn.ReLU(), nn.Linear(hidden, 1)) for d in expert_dims
            )

    def forward(self, buckets: torch.Tensor, users: List[torch.Tensor]) -> torch.Tensor:
        """Weights for candidates of buckets ``[B]`` or ``[B, K]``: ``[*buckets.shape, E]`` (rows sum to 1)."""
        if self.kind == "bucket":
            w = torch.sigmoid(self.logits[buckets])
            return w / w.sum(-1, keepdim=True)
        if self.kind == "global":
            return torch.softmax(self.logits, -1).expand(*buckets.shape, -1)
        q = self.bucket_embedding(buckets)  # [B, (K,) 16]
        scores = []
        for scorer, u in zip(self.scorers, users):
            u = u if buckets.dim() == 1 else u.unsqueeze(1).expand(-1, buckets.shape[1], -1)
            scores.append(scorer(torch.cat([q, u], -1)).squeeze(-1))
        return torch.softmax(torch.stack(scores, -1), -1)

    def per_bucket(self, users: List[torch.Tensor], n_buckets: int) -> torch.Tensor:
        """Weights of every (user, bucket): ``[B, n_buckets+1, E]``; full ranking gathers from it by ``b(i)``."""
        b = users[0].shape[0]
        if self.kind == "mlp":  # one gate pass per (user, bucket), never per (user, item)
            q = self.bucket_embedding.weight  # [nb+1, 16]
            scores = []
            for scorer, u in zip(self.scorers, users):
                pair = torch.cat([q.unsqueeze(0).expand(b, -1, -1), u.unsqueeze(1).expand(-1, q.shape[0], -1)], -1)
                scores.append(scorer(pair).squeeze(-1))
            return torch.softmax(torch.stack(scores, -1), -1)
        buckets = torch.arange(n_buckets + 1, device=users[0].device)
        return self.forward(buckets, users).unsqueeze(0).expand(b, -1, -1)


class SingleExpertRecommender(LLMFusedSequentialRecommender):
    """A one-expert LLM-fused model: subclasses only say which token source feeds the SASRec backbone.

    ``make_tokens(config)`` returns the source (``IDTokens``/``TextTokens``/``FusedTokens``/...); scoring is
    the dot product with the same source's candidate vectors.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.expert = Expert(self.make_tokens(config), config, self.max_seq_length)
        self.init_parameters()

    def make_tokens(self, config) -> nn.Module:
        raise NotImplementedError

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """``[B, L]``, ``[B]`` -> ``[B, D]``"""
        return self.expert(item_seq, item_seq_len, self.item_text_emb)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.expert.vectors(items, self.item_text_emb)

    def all_item_vectors(self) -> torch.Tensor:
        return self.eval_cached("items", lambda: self.expert.all_vectors(self.item_text_emb))
