"""LRURec: linear recurrent units for sequential recommendation (Yue et al., WSDM 2024), ID only."""
from __future__ import annotations

from recbole_llmfuse.model.base import IDSequentialRecommender


class LRURec(IDSequentialRecommender):
    """Item embedding + LayerNorm + dropout, then ``n_layers`` LRU blocks (complex diagonal recurrence,
    computed in parallel) with feed-forward sub-layers; read out at the last item. No position embedding:
    the recurrence orders the sequence. One of FAERec's main backbones (``backbone: LRURec``).
    """

    backbone_kind = "LRURec"
