"""FastSASRec: RecBole's SASRec on the fused shared encoder (same model, same hyper-parameters)."""
from __future__ import annotations

import torch
from torch import nn

from recbole_llmfuse.model.base import SequentialBase
from recbole_llmfuse.model.sequential import SASRecBackbone


class FastSASRec(SequentialBase):
    """SASRec (Kang & McAuley, ICDM 2018) as RecBole implements it, on :class:`SASRecBackbone`.

    Same architecture, initialisation, losses and config keys as ``recbole.model.sequential_recommender.SASRec``
    (plus ``loss_type: BCE``); :meth:`load_recbole_sasrec` copies a trained RecBole SASRec in.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.hidden_size = config["hidden_size"]
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.backbone = SASRecBackbone(config, self.max_seq_length)
        self.init_parameters()

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """-> ``[B, D]``"""
        return self.backbone(self.item_embedding(item_seq), item_seq, item_seq_len)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_embedding(items)

    def all_item_vectors(self) -> torch.Tensor:
        return self.item_embedding.weight

    def load_recbole_sasrec(self, state: dict) -> None:
        """Copy the ``state_dict`` of a RecBole ``SASRec`` with the same config into this model."""
        b = self.backbone
        b.encoder.load_recbole_state_dict({k[len("trm_encoder."):]: v for k, v in state.items() if k.startswith("trm_encoder.")})
        self.item_embedding.load_state_dict({"weight": state["item_embedding.weight"]})
        b.position_embedding.load_state_dict({"weight": state["position_embedding.weight"]})
        b.LayerNorm.load_state_dict({"weight": state["LayerNorm.weight"], "bias": state["LayerNorm.bias"]})
