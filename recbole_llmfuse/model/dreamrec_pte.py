"""DreamRec-PtE: DreamRec (:mod:`recbole_llmfuse.model.dreamrec`) over PtE's profile embeddings, PtE's generative
backbone (spec PtE §5.2).

The item table is ``Whiten_full(z_v)`` of the item-profile vectors: per-dimension unit variance, the scale the
noise schedule assumes (raw unit-norm text vectors have per-dimension std ≈ 1/sqrt(d) and drown in unit noise; the
DreamRec baselines multiply them by 40, PtE whitens). It keeps the encoder's dimension (the paper: "no truncation";
``pte_whiten_dim`` may lower it), is frozen, and may pass through a trainable linear adapter that starts as the
identity. The history encoder reads the same table. With user fusion the guidance is ``c + W_u z̃_u``, ``z̃_u`` the
whitened profile snapshot of the instance's prefix (as SASRec-PtE reads it; none for users without a profile).
"""
from __future__ import annotations

import torch
from torch import nn

from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.model.dreamrec import DreamRec
from recbole_llmfuse.model.pte import ITEM_MODES, PTE_FEATURE_TABLES, instance_profiles, register_whitened_profiles


class DreamRecPtE(DreamRec):
    """DreamRec whose items are frozen whitened PtE item-profile vectors (``item_mode: profile_only``), raw item-text
    vectors (``text_only``: the "No Profile" ablation) or both side by side (``profile_plus_text``)."""

    feature_tables = PTE_FEATURE_TABLES

    def make_item_table(self, config) -> int:
        mode, self.user_fusion = config["item_mode"], config["user_fusion"]
        if mode not in ITEM_MODES:
            raise ConfigError(f"DreamRecPtE: item_mode '{mode}': choose one of {ITEM_MODES}")
        if self.user_fusion not in ("add", "none"):
            raise ConfigError(f"DreamRecPtE: user_fusion '{self.user_fusion}': add | none (the guidance c + W_u z_u)")
        if config["dreamrec_adapter"] not in ("none", "linear"):
            raise ConfigError(f"DreamRecPtE: dreamrec_adapter '{config['dreamrec_adapter']}': none | linear")
        register_whitened_profiles(self, config["pte_whiten_dim"])
        parts = {"profile_only": [self.item_profile_w], "text_only": [self.item_text_w],
                 "profile_plus_text": [self.item_profile_w, self.item_text_w]}[mode]
        self.register_buffer("frozen_items", torch.cat(parts, -1), persistent=False)  # rebuilt from the tables
        dim = self.frozen_items.shape[1]
        self.adapter = nn.Linear(dim, dim, bias=False) if config["dreamrec_adapter"] == "linear" else None
        self.user_proj = nn.Linear(self.user_profile_w.shape[-1], dim) if self.user_fusion == "add" else None
        return dim

    def reset_item_table(self) -> None:
        if self.adapter is not None:
            with torch.no_grad():
                self.adapter.weight.copy_(torch.eye(self.adapter.in_features))

    def item_table(self) -> torch.Tensor:
        return self.frozen_items if self.adapter is None else self.adapter(self.frozen_items)

    def encode(self, interaction) -> torch.Tensor:
        """Guidance ``c [B, d]``, plus ``W_u z̃_u`` with user fusion."""
        c = super().encode(interaction)
        if self.user_proj is None:
            return c
        z, has = instance_profiles(self, interaction)
        return c + has * self.user_proj(z)
