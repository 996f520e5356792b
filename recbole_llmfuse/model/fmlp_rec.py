"""FMLPRec: FMLP-Rec (Zhou et al., WWW 2022), the filter-enhanced MLP sequential recommender (ID only)."""
from __future__ import annotations

from recbole_llmfuse.model.base import IDSequentialRecommender


class FMLPRec(IDSequentialRecommender):
    """Item embedding + learned positions + LayerNorm + dropout, then ``n_layers`` blocks of a learnable
    frequency filter (rFFT -> complex weights -> irFFT) and a feed-forward sub-layer; read out at the last
    item. One of FAERec's main backbones; the same encoder serves every fusion model via ``backbone: FMLPRec``.
    """

    backbone_kind = "FMLPRec"
