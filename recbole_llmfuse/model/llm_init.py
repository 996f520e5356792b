"""LLMInit (spec PtE §5.3; PAD's and FAERec's baseline): SASRec whose ID item table starts from the item text
vectors. One model per file (RecBole's rule): it shares only :func:`~recbole_llmfuse.model.layers.whitening` with
PtE."""
from __future__ import annotations

import torch

from recbole_llmfuse.model.base import IDSequentialRecommender, LLMFusedSequentialRecommender
from recbole_llmfuse.model.layers import whitening


class LLMInit(IDSequentialRecommender):
    """LLMInit (spec PtE §5.3): SASRec whose trainable item table starts as ``Whiten_d`` (standardised PCA, as
    AlphaFuse's "semantic space decomposition") of the frozen item text-embedding table, scaled to the ID
    table's initial spread (``initializer_range``); everything else is SASRec."""

    feature_tables = LLMFusedSequentialRecommender.feature_tables

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        init = whitening(self.item_text_emb, self.hidden_size)
        if init.shape[1] < self.hidden_size:
            raise ValueError(f"LLMInit: the text vectors have {init.shape[1]} dims, fewer than hidden_size "
                             f"{self.hidden_size}; lower hidden_size")
        with torch.no_grad():
            self.item_embedding.weight.copy_(init * config["llminit_scale"] * self.initializer_range)
