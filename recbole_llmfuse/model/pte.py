"""PtE (Profile-then-Embedding): SASRec over LLM-written profile embeddings.

Spec PtE §4.7 and §5.1 (SASRec-PtE); LLMInit, the baseline of §5.3, is :mod:`recbole_llmfuse.model.llm_init`. The vectors come from preparation hooks:
``pte_profiles`` (LLM-written user and item profiles, spec §3) -> ``pte_embeddings`` (``f_enc``, spec §4.1), and
``item_text_embedding`` for the raw item text. Nothing here calls an LLM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recbole_llmfuse.data import PREFIX_LENGTH_FIELD, FeatureTable
from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.model.base import LLMFusedSequentialRecommender
from recbole_llmfuse.model.encoders import SequenceBackbone
from recbole_llmfuse.model.layers import whitening


ITEM_MODES = ("profile_only", "text_only", "profile_plus_text")  # which item features a PtE backbone reads (spec §5.1)


def adapter(k: int, d: int, kind: str) -> nn.Module:
    """The trainable "task-aligned projection" (spec §4.7): ``mlp`` = Linear(k, d) -> ReLU -> Linear(d, d) (the
    authors' CF consumer), ``linear`` = one Linear."""
    if kind == "linear":
        return nn.Linear(k, d)
    if kind != "mlp":
        raise ConfigError(f"pte_adapter '{kind}': mlp | linear")
    return nn.Sequential(nn.Linear(k, d), nn.ReLU(), nn.Linear(d, d))


def snapshot_slot(prefix_length, slots: int):
    """Snapshot slot an instance with ``prefix_length`` history items reads: the largest power of two
    ``<= prefix_length`` (slot ``floor(log2 n)``), capped at ``slots - 1`` (a table with one slot: always 0)."""
    n = torch.as_tensor(prefix_length).clamp(min=1).float()
    return torch.floor(torch.log2(n)).long().clamp(max=slots - 1)


#: the tables every PtE consumer reads: raw item text, item profiles, user-profile snapshots (spec §5.4)
PTE_FEATURE_TABLES = LLMFusedSequentialRecommender.feature_tables + (
    FeatureTable("pte_item_emb", hook="pte_embeddings", output="item", options="pte_emb",
                 description="PtE item-profile embeddings"),
    FeatureTable("pte_user_emb", hook="pte_embeddings", output="user", kind="user", options="pte_emb",
                 description="PtE user-profile embeddings"),
)


def register_whitened_profiles(model: nn.Module, k) -> None:
    """Fixed ``Whiten_k`` (spec §4.7) of a PtE consumer's three tables as non-persistent buffers (rebuilt from the
    tables on load, never in a checkpoint): ``item_profile_w [n_items, k]``, ``item_text_w [n_items, k]``,
    ``user_profile_w [n_users, S, k]``; ``k = None`` keeps every dimension (``Whiten_full``, spec §5.2)."""
    def white(table):
        return whitening(table, k or table.shape[-1])

    model.register_buffer("item_profile_w", white(model.pte_item_emb), persistent=False)
    model.register_buffer("item_text_w", white(model.item_text_emb), persistent=False)
    users = model.pte_user_emb  # [n_users, S, d_enc]
    model.register_buffer("user_profile_w", white(users.reshape(-1, users.shape[-1]))
                          .reshape(users.shape[0], users.shape[1], -1), persistent=False)


def instance_profiles(model: nn.Module, interaction):
    """The whitened user-profile snapshot each instance of a batch reads (slot :func:`snapshot_slot` of its prefix
    length): ``(z [B, k], has [B, 1])``, ``has`` 0 where the user has no profile (an all-zero row)."""
    users = interaction[model.USER_ID]
    slot = snapshot_slot(interaction[PREFIX_LENGTH_FIELD], model.user_profile_w.shape[1])
    z = model.user_profile_w[users, slot]
    return z, (z.abs().sum(-1, keepdim=True) > 0).to(z.dtype)


class PtE(LLMFusedSequentialRecommender):
    """SASRec-PtE (spec PtE §5.1).

    Items: ``e_v = ReLU(W_f [MLP_p(z̃_v); MLP_o(t̃_v)])`` (``item_mode: profile_plus_text``), ``MLP_p(z̃_v)``
    (``profile_only``) or ``MLP_o(t̃_v)`` (``text_only``: the "No Profile" ablation), ``z̃ = Whiten_k`` of the item
    profile vectors, ``t̃`` of the raw item-text vectors. No free ID embedding unless ``pte_add_id_embedding``.
    Users: ``h' = ReLU(W_g [h; normalize(MLP_u(z̃_u))])`` (``user_fusion: concat``), ``h + normalize(...)``
    (``add``) or ``h`` (``none``), ``h`` SASRec's last state; ``z_u`` is the snapshot of the instance's prefix
    (slot :func:`snapshot_slot` of ``prefix_length``), a learned vector
    for users without one. Loss: ``loss_type: InfoNCE`` (64 uniform negatives, cosine / 0.07) by default.
    """

    feature_tables = PTE_FEATURE_TABLES

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d, kind = config["hidden_size"], config["pte_adapter"]
        k = config["pte_whiten_dim"] or d
        self.item_mode, self.user_fusion = config["item_mode"], config["user_fusion"]
        if self.item_mode not in ITEM_MODES:
            raise ConfigError(f"PtE: item_mode '{self.item_mode}': choose one of {ITEM_MODES}")
        if self.user_fusion not in ("concat", "add", "none"):
            raise ConfigError(f"PtE: user_fusion '{self.user_fusion}': concat | add | none")
        register_whitened_profiles(self, k)
        self.profile_mlp = adapter(self.item_profile_w.shape[1], d, kind) if self.item_mode != "text_only" else None
        self.text_mlp = adapter(self.item_text_w.shape[1], d, kind) if self.item_mode != "profile_only" else None
        self.item_fuse = nn.Linear(2 * d, d) if self.item_mode == "profile_plus_text" else None
        self.id_embedding = nn.Embedding(self.n_items, d, padding_idx=0) if config["pte_add_id_embedding"] else None
        if self.user_fusion != "none":
            self.user_mlp = adapter(self.user_profile_w.shape[-1], d, kind)
            self.user_fuse = nn.Linear(2 * d, d) if self.user_fusion == "concat" else None
            self.empty_user = nn.Parameter(torch.zeros(d))
        self.backbone = SequenceBackbone(config, self.max_seq_length)
        self.init_parameters()

    def _item_table(self) -> torch.Tensor:
        """``[n_items, D]`` item representations; row 0 (padding) zero."""
        parts = []
        if self.profile_mlp is not None:
            parts.append(self.profile_mlp(self.item_profile_w))
        if self.text_mlp is not None:
            parts.append(self.text_mlp(self.item_text_w))
        e = F.relu(self.item_fuse(torch.cat(parts, -1))) if self.item_fuse is not None else parts[0]
        if self.id_embedding is not None:
            e = e + self.id_embedding.weight
        mask = torch.ones(e.shape[0], 1, device=e.device, dtype=e.dtype)
        mask[0] = 0
        return e * mask

    def all_item_vectors(self) -> torch.Tensor:
        return self.eval_cached("items", self._item_table)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.all_item_vectors()[items]

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """``[B, L]``, ``[B]`` -> ``[B, D]``"""
        return self.backbone(self.all_item_vectors()[item_seq], item_seq, item_seq_len)

    def encode(self, interaction) -> torch.Tensor:
        h = super().encode(interaction)
        if self.user_fusion == "none":
            return h
        z, has = instance_profiles(self, interaction)  # [B, k], [B, 1]
        u = F.normalize(has * self.user_mlp(z) + (1 - has) * self.empty_user, dim=-1)
        if self.user_fuse is None:
            return h + u
        return F.relu(self.user_fuse(torch.cat([h, u], -1)))
