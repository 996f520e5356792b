"""FastSASRec: RecBole's SASRec on the fused shared encoder (same model, same hyper-parameters)."""
from __future__ import annotations

from recbole_llmfuse.model.base import IDSequentialRecommender


class FastSASRec(IDSequentialRecommender):
    """SASRec (Kang & McAuley, ICDM 2018) as RecBole implements it, on the fast shared encoder.

    Same architecture, initialisation, losses and config keys as ``recbole.model.sequential_recommender.SASRec``
    (plus ``loss_type: BCE``); :meth:`load_recbole_sasrec` copies a trained RecBole SASRec in.
    """

    backbone_kind = "SASRec"

    def load_recbole_sasrec(self, state: dict) -> None:
        """Copy the ``state_dict`` of a RecBole ``SASRec`` with the same config into this model."""
        b = self.backbone
        b.encoder.load_recbole_state_dict({k[len("trm_encoder."):]: v for k, v in state.items() if k.startswith("trm_encoder.")})
        self.item_embedding.load_state_dict({"weight": state["item_embedding.weight"]})
        b.position_embedding.load_state_dict({"weight": state["position_embedding.weight"]})
        b.LayerNorm.load_state_dict({"weight": state["LayerNorm.weight"], "bias": state["LayerNorm.bias"]})
