"""LLM-ESR: the ID view starts from the text PCA, similar users by hand, the distillation target (it learns: tests/test_models.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import SMALL
from recbole_llmfuse import Config
from recbole_llmfuse.model.layers import project_on_axes
from recbole_llmfuse.model.llmesr import similar_users
from recbole_llmfuse.quick_start import build

CFG = {"hidden_size": 16, "inner_size": 32, "n_heads": 2, "hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0,
       "llmesr_sim_users": 3}


def test_similar_users_by_hand():
    text = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # items 1..3
    histories = torch.tensor([[0, 0], [1, 0], [1, 3], [2, 0], [0, 0]])  # user 0 padding, user 4 no history
    lengths = torch.tensor([0, 1, 2, 1, 0])
    sim = similar_users(histories, lengths, text, k=1)
    # user 1 = (1, 0); user 2 = mean((1,0), (1,1)) = (1, .5); user 3 = (0, 1)
    assert sim[1].tolist() == [2] and sim[2].tolist() == [1] and sim[3].tolist() == [2]
    assert sim[4].tolist() == [0] and sim[0].tolist() == [0]  # no history: no neighbour


def test_views_distillation_and_init(small_cfg, with_embeddings):
    config = Config("LLMESR", SMALL, config_dict=small_cfg(data_path=with_embeddings, **CFG), argv=[])
    _, model, train_data, _, _ = build(config)
    assert torch.allclose(model.id_embedding.weight, project_on_axes(model.item_text_emb, 16, standardize=False))
    batch = next(iter(train_data))
    model.eval()
    user = model.encode(batch)
    assert user.shape == (len(batch), 32) and model.all_item_vectors().shape[1] == 32  # [ID view ; text view]
    sim = model.sim_users[batch["user_id"]]  # [B, 3], none of them the user
    assert not (sim == batch["user_id"].unsqueeze(1)).any()
    with torch.no_grad():
        reps = model.forward(model.histories[sim.flatten()], model.history_lengths[sim.flatten()]).view(len(batch), 3, -1)
    by_hand = F.mse_loss(user, reps.mean(1))
    assert torch.allclose(model.distillation_loss(batch["user_id"], user), by_hand, atol=1e-6)
    total = model.calculate_loss(batch)
    assert torch.allclose(total, model.recommendation_loss(user, batch) + 0.1 * by_hand, atol=1e-5)
    total.backward()  # the target has no gradient; the views and cross-attention do
    assert model.text_to_id.attention.in_proj_weight.grad.abs().sum() > 0
    assert model.item_text_emb.grad is None  # the text table stays frozen


def test_bert4rec_backbone_attends_both_ways_with_the_same_weights():
    """One layer read at the last item sees the whole history either way; from two layers on, the earlier positions'
    states of the BERT4Rec backbone also see later items, so its read-out differs from SASRec's with equal weights."""
    from recbole_llmfuse.model.encoders import SequenceBackbone

    base = {"layer_norm_eps": 1e-12, "hidden_size": 8, "inner_size": 16, "n_heads": 2, "hidden_dropout_prob": 0.0,
            "attn_dropout_prob": 0.0, "hidden_act": "gelu"}
    torch.manual_seed(0)
    states, seq, length = torch.randn(3, 5, 8), torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 0], [1, 1, 2, 3, 4]]), \
        torch.tensor([3, 4, 5])
    for layers, same in ((1, True), (2, False)):
        cfg = {**base, "n_layers": layers}
        causal = SequenceBackbone({**cfg, "backbone": "SASRec"}, 5)
        both = SequenceBackbone({**cfg, "backbone": "BERT4Rec"}, 5)
        both.load_state_dict(causal.state_dict())
        a, b = causal.encode(states, seq, length), both.encode(states, seq, length)
        assert torch.allclose(a, b, atol=1e-5) == same, layers


def test_llmesr_learns_on_its_other_backbones(tiny_world):
    from conftest import LEARNS_MARGIN, TINY, TINY_LEARN, fit_and_test

    for backbone in ("GRU4Rec", "BERT4Rec"):
        cfg = {**TINY_LEARN, "data_path": tiny_world, "loss_type": "CE", "llmesr_sim_users": 3, "backbone": backbone}
        _, _, losses, result, pop = fit_and_test(Config("LLMESR", TINY, config_dict=cfg, argv=[]), epochs=8)
        assert result["hit@10"] > pop + LEARNS_MARGIN, (backbone, result["hit@10"], pop)
