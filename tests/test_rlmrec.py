"""RLMRec: the alignment term by hand for both variants, the total = the ID model's loss + β · term (it learns: tests/test_models.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL
from recbole_llmfuse import Config
from recbole_llmfuse.quick_start import build

CFG = {"hidden_size": 16, "inner_size": 32, "n_heads": 2, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0}


@pytest.mark.parametrize("variant", ["con", "gen"])
def test_alignment_term_is_one_minus_mean_cosine_through_the_variants_mlp(small_cfg, with_embeddings, variant):
    config = Config("RLMRec", SMALL, config_dict=small_cfg(data_path=with_embeddings, rlmrec_variant=variant,
                                                           **CFG), argv=[])
    _, model, train_data, _, _ = build(config)
    batch = next(iter(train_data))
    items = torch.unique(torch.cat([batch["item_id_list"].flatten(), batch["item_id"]]))
    items = items[items > 0]
    e, t = model.item_embedding.weight[items], model.item_text_emb[items]
    by_hand = 1 - (F.cosine_similarity(model.mapper(e), t) if variant == "con" else
                   F.cosine_similarity(model.mapper(t), e)).mean()
    assert model.mapper[0].in_features == (16 if variant == "con" else 32)  # con: ID -> text; gen: text -> ID
    assert torch.allclose(model.alignment_loss(items), by_hand)
    model.eval()  # no dropout: the total is the ID model's loss plus 0.1 x the term
    rec = super(type(model), model).calculate_loss(batch)
    assert torch.allclose(model.calculate_loss(batch), rec + 0.1 * by_hand, atol=1e-6)
    model.calculate_loss(batch).backward()
    assert model.mapper[0].weight.grad.abs().sum() > 0 and model.item_embedding.weight.grad.abs().sum() > 0
