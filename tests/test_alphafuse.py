"""AlphaFuse: the semantic coordinates are the (standardised) PCA of the text table and never train; E_ID lives in
the last, null-space coordinates; the threshold variant counts eigenvalues; it learns (tests/test_models.py)."""
from __future__ import annotations

import pytest
import torch

from conftest import SMALL
from recbole_llmfuse import Config, ConfigError
from recbole_llmfuse.model.layers import principal_axes
from recbole_llmfuse.quick_start import build

AF = {"hidden_size": 16, "inner_size": 32, "n_heads": 2, "alphafuse_null_dim": 6}


def _model(cfg, **extra):
    config = Config("AlphaFuse", SMALL, config_dict=cfg(**{**AF, **extra}), argv=[])
    _, model, train_data, _, _ = build(config)
    return model, train_data


def test_semantic_part_is_the_standardised_pca_and_only_the_null_space_trains(small_cfg, with_embeddings):
    model, train_data = _model(small_cfg, data_path=with_embeddings, epochs=1)
    tokens = model.expert.tokens
    text = model.item_text_emb
    mean, values, vectors, rows = principal_axes(text)
    # by hand: centre, rotate, divide by sqrt(eigenvalue), keep the top 16 (the authors' semantic_space_decomposion)
    expected = ((text.double() - mean) @ vectors[:, :16] / values[:16].sqrt()).float() * rows.unsqueeze(-1)
    assert torch.allclose(tokens.semantic, expected, atol=1e-4)
    cov = torch.cov(tokens.semantic[1:].T.double())
    assert torch.allclose(cov, torch.eye(16, dtype=torch.float64), atol=1e-3)  # whitened
    before = tokens.all().detach().clone()
    assert torch.count_nonzero(before[0]) == 0  # padding
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for batch in list(train_data)[:3]:
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
    after = tokens.all().detach()
    assert torch.equal(after[:, :10], before[:, :10])  # the 10 semantic coordinates never move
    assert not torch.equal(after[:, 10:], before[:, 10:])  # E_ID in the 6 null-space coordinates trains
    # mapped back to the text space, what E_ID changed is orthogonal to the kept semantic directions
    change = (after[:, 10:] - before[:, 10:]).double() * values[10:16].sqrt()
    back = change @ vectors[:, 10:16].T
    assert (back @ vectors[:, :10]).abs().max() < 1e-8


def test_cover_replaces_the_null_space_values_and_the_threshold_counts_eigenvalues(small_cfg, with_embeddings):
    model, _ = _model(small_cfg, data_path=with_embeddings, alphafuse_cover=True)
    tokens = model.expert.tokens
    assert torch.equal(tokens.all()[:, 10:], tokens.id.weight)  # the paper's "replace"
    values = principal_axes(model.item_text_emb)[1]
    threshold = float(values[20])  # 12 of 32 eigenvalues are <= it
    model, _ = _model(small_cfg, data_path=with_embeddings, alphafuse_null_threshold=threshold)
    assert model.expert.tokens.null_dim == int((values <= threshold).sum()) == 12
    with pytest.raises(ConfigError, match="null space has 16 dims of hidden_size 16"):
        _model(small_cfg, data_path=with_embeddings, alphafuse_null_dim=16)
    with pytest.raises(ConfigError, match="exceeds the text vectors' 32 dims"):
        _model(small_cfg, data_path=with_embeddings, hidden_size=64, alphafuse_null_dim=8)
