"""LLM-ESR (Liu et al., NeurIPS 2024): dual-view modelling and retrieval-augmented self-distillation.

Spec PtE §5.3 and FAERec's comparison; the authors' code (``liuqidong07/LLM-ESR``, ``models/DualLLMSRS.py``,
``models/LLMESR.py``, ``experiments/*.bash``):

* **semantic view**: the frozen item text table through an adapter ``Linear(d_t, d_t/2) -> Linear(d_t/2, d)``;
* **collaborative view**: a trainable ID table initialised from the PCA of the text table (``d`` components);
* each view gets the backbone's positions, LayerNorm and dropout; then 2-head cross-attention between the views
  (queries from one, keys and values from the other, padding masked; ``llmesr_cross_attention``); one shared
  sequence encoder (``backbone``) reads each view; the user is ``[u_id ; u_text]`` (``2d``) and an item
  ``[E[i] ; adapter(T[i])]``;
* **self-distillation**: the mean representation of the user's ``llmesr_sim_users`` most similar users (their
  training sequences, encoded by the same model without gradient) is the target of an MSE on the user's own
  representation, weight ``llmesr_alpha`` (the authors' ``kd``, α = 0.1).

Similar users are found with text user embeddings, as the paper does; here a user's embedding is the mean of the
frozen item text vectors of their training interactions (the authors embed a prompt of the history with the LLM,
a step of its own), cosine top-k over all users, computed once from the training split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recbole_llmfuse.model.base import LLMFusedSequentialRecommender
from recbole_llmfuse.model.encoders import SequenceBackbone
from recbole_llmfuse.model.layers import project_on_axes
from recbole_llmfuse.stats import training_histories


class CrossAttention(nn.Module):
    """``queries [B, L, d]`` attend over ``keys [B, L, d]`` (2 heads; padding keys masked) -> ``[B, L, d]``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        out, _ = self.attention(queries, keys, keys, key_padding_mask=item_seq == 0, need_weights=False)
        return out


def similar_users(histories: torch.Tensor, lengths: torch.Tensor, text: torch.Tensor, k: int,
                  chunk: int = 4096) -> torch.Tensor:
    """``[n_users, k]``: each user's ``k`` most similar other users by the cosine of their mean item text vector
    (``histories [n_users, L]`` zero-padded); users without history get no neighbour (row of 0, the padding user)."""
    mean = text[histories].sum(1) / lengths.clamp(min=1).unsqueeze(-1).float()
    mean = F.normalize(mean, dim=-1)
    has = lengths > 0
    out = torch.zeros(len(histories), k, dtype=torch.long)
    for start in range(0, len(histories), chunk):  # [chunk, n_users] at a time: memory stays bounded
        sim = mean[start:start + chunk] @ mean.T
        sim[:, ~has] = -2
        sim[torch.arange(sim.shape[0]), torch.arange(start, start + sim.shape[0])] = -2  # never oneself
        out[start:start + chunk] = sim.topk(min(k, len(histories) - 1), dim=-1).indices[:, :k]
    out[~has] = 0
    return out


class LLMESR(LLMFusedSequentialRecommender):
    """Dual-view sequential recommender with retrieval-augmented self-distillation (see module docstring)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = int(config["hidden_size"])
        text = self.item_text_emb
        self.adapter = nn.Sequential(nn.Linear(self.text_dim, self.text_dim // 2), nn.Linear(self.text_dim // 2, d))
        self.id_embedding = nn.Embedding(self.n_items, d, padding_idx=0)
        self.cross = bool(config["llmesr_cross_attention"])
        if self.cross:
            self.text_to_id = CrossAttention(d, int(config["llmesr_heads"]))  # queries: text view; keys: ID view
            self.id_to_text = CrossAttention(d, int(config["llmesr_heads"]))
        self.backbone = SequenceBackbone(config, self.max_seq_length, hidden_size=d)
        self.alpha, self.k = float(config["llmesr_alpha"]), int(config["llmesr_sim_users"])
        histories, lengths = training_histories(dataset, self.max_seq_length)
        self.register_buffer("histories", histories, persistent=False)  # rebuilt from the data on load
        self.register_buffer("history_lengths", lengths, persistent=False)
        self.register_buffer("sim_users", similar_users(histories, lengths, text, self.k), persistent=False)
        self.init_parameters()
        with torch.no_grad():  # the collaborative view starts from the text's principal components (authors' pca64)
            self.id_embedding.weight.copy_(project_on_axes(text, d, standardize=False))

    def views(self, item_seq: torch.Tensor):
        """``item_seq [B, L]`` -> the two prepared views ``(id [B, L, d], text [B, L, d])``."""
        id_states = self.backbone.embed(self.id_embedding(item_seq), item_seq)
        text_states = self.backbone.embed(self.adapter(self.item_text_emb[item_seq]), item_seq)
        if self.cross:
            id_states, text_states = (self.text_to_id(text_states, id_states, item_seq),
                                      self.id_to_text(id_states, text_states, item_seq))
        return id_states, text_states

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """``[B, L]``, ``[B]`` -> ``[B, 2d]`` = [ID view ; text view], one shared encoder."""
        id_states, text_states = self.views(item_seq)
        return torch.cat([self.backbone.encode(id_states, item_seq, item_seq_len),
                          self.backbone.encode(text_states, item_seq, item_seq_len)], dim=-1)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.id_embedding(items), self.adapter(self.item_text_emb[items])], dim=-1)

    def all_item_vectors(self) -> torch.Tensor:
        return self.eval_cached("items", lambda: torch.cat([self.id_embedding.weight, self.adapter(self.item_text_emb)], -1))

    def distillation_loss(self, users: torch.Tensor, user_vec: torch.Tensor) -> torch.Tensor:
        """MSE between ``user_vec [B, 2d]`` and the mean representation of each user's similar users (no grad)."""
        sim = self.sim_users[users]  # [B, k]
        flat = sim.flatten()
        with torch.no_grad():
            target = self.forward(self.histories[flat], self.history_lengths[flat].clamp(min=1))
        valid = (self.history_lengths[flat] > 0).float().view(*sim.shape, 1)
        target = (target.view(*sim.shape, -1) * valid).sum(1) / valid.sum(1).clamp(min=1)
        return F.mse_loss(user_vec, target)

    def calculate_loss(self, interaction) -> torch.Tensor:
        user_vec = self.encode(interaction)
        loss = self.recommendation_loss(user_vec, interaction)
        if self.alpha == 0 or self.k == 0:
            return loss
        return loss + self.alpha * self.distillation_loss(interaction[self.USER_ID], user_vec)
