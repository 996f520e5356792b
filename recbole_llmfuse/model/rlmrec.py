"""RLMRec (Ren et al., WWW 2024) on a sequential backbone, as PtE's and FAERec's papers use it as a baseline.

Spec PtE §5.3: an ID model (SASRec here, any ``backbone``) plus an auxiliary loss that ties the ID item table
``E [n_items, d]`` to the frozen item text table ``T [n_items, d_t]`` through a 2-layer MLP (hidden
``(d + d_t) / 2``, LeakyReLU), weight ``rlmrec_weight`` (β = 0.1), loss ``1 − mean cosine`` over the batch's
items. ``rlmrec_variant`` follows the paper's prose: ``con`` (contrastive alignment) maps the ID embeddings into
the semantic space and aligns them with ``T``; ``gen`` (generative) maps ``T`` into the behavioural space and
aligns it with ``E``. The authors' sequential re-implementation names the two the other way round (its ``con``
reconstructor maps language to ID).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.model.base import IDSequentialRecommender, LLMFusedSequentialRecommender

VARIANTS = ("con", "gen")


class RLMRec(IDSequentialRecommender):
    """ID SASRec + β · (1 − cos) between the ID and text tables, through the variant's MLP."""

    feature_tables = LLMFusedSequentialRecommender.feature_tables

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.variant, self.weight = config["rlmrec_variant"], float(config["rlmrec_weight"])
        if self.variant not in VARIANTS:
            raise ConfigError(f"rlmrec_variant '{self.variant}': choose one of {VARIANTS}")
        d, t = self.hidden_size, self.item_text_emb.shape[1]
        source, target = (d, t) if self.variant == "con" else (t, d)
        hidden = (d + t) // 2
        self.mapper = nn.Sequential(nn.Linear(source, hidden), nn.LeakyReLU(), nn.Linear(hidden, target))
        self.init_parameters()

    def alignment_loss(self, items: torch.Tensor) -> torch.Tensor:
        """``1 − mean cos`` over ``items [N]``: ``con`` cos(MLP(E[i]), T[i]), ``gen`` cos(MLP(T[i]), E[i])."""
        ids, text = self.item_embedding(items), self.item_text_emb[items]
        mapped, target = (self.mapper(ids), text) if self.variant == "con" else (self.mapper(text), ids)
        return 1 - F.cosine_similarity(mapped, target, dim=-1).mean()

    def calculate_loss(self, interaction) -> torch.Tensor:
        loss = super().calculate_loss(interaction)
        if self.weight == 0:
            return loss
        items = torch.unique(torch.cat([interaction[self.ITEM_SEQ].flatten(), interaction[self.POS_ITEM_ID]]))
        return loss + self.weight * self.alignment_loss(items[items > 0])
