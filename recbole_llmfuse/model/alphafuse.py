"""AlphaFuse (Hu et al., SIGIR 2025): ID embeddings learned in the null space of the language embeddings.

Spec PtE §5.3 (AlphaFuse as PtE's strongest baseline) and the authors' code (``Hugo-Chinn/AlphaFuse``,
``models/embedding.py``, pipeline ``AF``): the frozen item text table is centred, rotated onto the eigenbasis of its
covariance and (``alphafuse_standardize``) divided by the square root of each eigenvalue; the top
``hidden_size`` coordinates are kept and frozen. The last ``d_n`` of them — the directions the text barely
uses, its null space — carry a trainable ID embedding ``E_ID [n_items, d_n]``: added to the text's values there
(the authors' code) or replacing them (``alphafuse_cover: true``, the paper's "drop the original values in the
null space and replace them with E_ID", §4.1.5). The semantic directions never change during training.
"""
from __future__ import annotations

import torch
from torch import nn

from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.model.fusion import SingleExpertRecommender
from recbole_llmfuse.model.layers import principal_axes, project_on_axes

ID_INITS = ("normal", "zeros")


class NullSpaceTokens(nn.Module):
    """``items [*] -> [*, dim]``: frozen text coordinates ``S [n_items, dim]`` whose last ``null_dim`` columns
    take a trainable ID embedding (added, or replacing them with ``cover``). ``S`` row 0 (padding) is zero."""

    def __init__(self, semantic: torch.Tensor, null_dim: int, cover: bool):
        super().__init__()
        self.dim, self.null_dim, self.cover = semantic.shape[1], null_dim, cover
        self.register_buffer("semantic", semantic, persistent=False)  # rebuilt from the text table on load
        self.id = nn.Embedding(semantic.shape[0], null_dim, padding_idx=0)

    def fuse(self, semantic: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        kept = semantic[..., : self.dim - self.null_dim]
        null = ids if self.cover else semantic[..., self.dim - self.null_dim:] + ids
        return torch.cat([kept, null], dim=-1)

    def forward(self, items: torch.Tensor, table=None) -> torch.Tensor:
        return self.fuse(self.semantic[items], self.id(items))

    def all(self, table=None) -> torch.Tensor:
        """``[n_items, dim]``"""
        return self.fuse(self.semantic, self.id.weight)


class AlphaFuse(SingleExpertRecommender):
    """SASRec (or any ``backbone``) over :class:`NullSpaceTokens` of the item text table."""

    def __init__(self, config, dataset):
        if config["alphafuse_id_init"] not in ID_INITS:
            raise ConfigError(f"alphafuse_id_init '{config['alphafuse_id_init']}': choose one of {ID_INITS}")
        self.id_init = config["alphafuse_id_init"]  # read by init_parameters, which the base __init__ calls
        super().__init__(config, dataset)

    def make_tokens(self, config) -> nn.Module:
        dim = int(config["hidden_size"])
        if dim > self.text_dim:
            raise ConfigError(f"AlphaFuse: hidden_size {dim} exceeds the text vectors' {self.text_dim} dims; "
                              f"lower hidden_size")
        null_dim = self.null_dim(config, dim)
        semantic = project_on_axes(self.item_text_emb, dim, standardize=bool(config["alphafuse_standardize"]))
        return NullSpaceTokens(semantic * float(config["alphafuse_text_scale"]), null_dim,
                               bool(config["alphafuse_cover"]))

    def null_dim(self, config, dim: int) -> int:
        """``alphafuse_null_dim``, or with ``alphafuse_null_threshold`` the number of covariance eigenvalues at or
        below it (the authors' nullity); it must leave at least one semantic coordinate."""
        threshold = config["alphafuse_null_threshold"]
        if threshold is not None:
            axes = principal_axes(self.item_text_emb)
            n = int((axes[1] <= float(threshold)).sum()) if axes is not None else 0
        else:
            n = int(config["alphafuse_null_dim"])
        if not 0 < n < dim:
            raise ConfigError(f"AlphaFuse: the null space has {n} dims of hidden_size {dim}; it needs 1 to {dim - 1} "
                              f"(set alphafuse_null_dim, or another alphafuse_null_threshold)")
        return n

    def init_parameters(self) -> None:
        super().init_parameters()  # RecBole's init everywhere, then E_ID as the paper draws it
        weight = self.expert.tokens.id.weight
        with torch.no_grad():
            weight.normal_(0.0, 1.0) if self.id_init == "normal" else weight.zero_()
            weight[0].zero_()
