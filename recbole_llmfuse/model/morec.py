"""MoRec: text-only sequential recommendation over projected LLM item embeddings."""
from __future__ import annotations

import torch

from recbole_llmfuse.model.base import LLMFusedSequentialRecommender
from recbole_llmfuse.model.layers import MLP
from recbole_llmfuse.model.sequential import SASRecBackbone


class MoRec(LLMFusedSequentialRecommender):
    """MoRec (Yuan et al., SIGIR 2023) with a frozen text encoder, as PAD's paper uses it as a baseline.

    Every item token and every candidate is ``MLP(T[i])``, ``T`` the frozen ``[n_items, text_dim]``
    table; no ID embedding. Equals PAD's stand-alone LLM-specific expert (spec PAD §9.1).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.hidden_size = config["hidden_size"]
        self.projector = MLP(
            self.text_dim, config["mlp_hidden_sizes"] or [], self.hidden_size, config["mlp_dropout_prob"] or 0.0
        )
        self.backbone = SASRecBackbone(config, self.max_seq_length)
        self.init_parameters()

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Projected text ``[*items.shape, D]``."""
        return self.projector(self.item_text_emb[items])

    def all_item_vectors(self) -> torch.Tensor:
        return self.projector(self.item_text_emb)

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        # project each item once per step ([n_items, text_dim]) instead of every token ([B, L, text_dim])
        tokens = self.all_item_vectors()[item_seq] if self.projector.deterministic else self.item_vectors(item_seq)
        return self.backbone(tokens, item_seq, item_seq_len)
