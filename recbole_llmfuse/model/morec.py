"""MoRec: text-only sequential recommendation over projected LLM item embeddings."""
from __future__ import annotations

from recbole_llmfuse.model.fusion import SingleExpertRecommender, TextTokens


class MoRec(SingleExpertRecommender):
    """MoRec (Yuan et al., SIGIR 2023) with a frozen text encoder, as PAD's paper uses it as a baseline.

    Every item token and every candidate is ``MLP(T[i])``, ``T`` the frozen ``[n_items, text_dim]``
    table; no ID embedding. Equals PAD's stand-alone LLM-specific expert (spec PAD §9.1).
    """

    def make_tokens(self, config):
        return TextTokens(self.text_dim, config["hidden_size"], config["mlp_hidden_sizes"],
                          config["mlp_dropout_prob"])
