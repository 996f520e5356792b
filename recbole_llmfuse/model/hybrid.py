"""Hybrid: one SASRec over ID ⊕ projected-text item tokens (PAD's "hybrid encoding" baseline)."""
from __future__ import annotations

from recbole_llmfuse.model.fusion import FusedTokens, SingleExpertRecommender


class Hybrid(SingleExpertRecommender):
    """ID and frozen-LLM text fused per item (CoLLM / LLaRA "hybrid encoding"; spec PAD §9.1).

    Token and candidate of item ``i``: ``fuse(E[i], MLP(T[i]))`` (``fusion``: ``concat_linear``,
    ``concat`` or ``sum``). Equals PAD's alignment expert trained from scratch with no alignment loss.
    """

    def make_tokens(self, config):
        return FusedTokens(self.n_items, config["hidden_size"], self.text_dim, config["mlp_hidden_sizes"],
                           config["mlp_dropout_prob"], config["fusion"])
