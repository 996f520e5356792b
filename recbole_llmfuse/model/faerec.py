"""FAERec: Fusion and Alignment Enhancement for tail-item sequential recommendation (spec FAERec.md).

* **Adaptive gating fusion** (Eq. 3-4): per position, ``id = E[i] + P[pos]`` and ``llm = f(X[i]) + P[pos]``
  (dropout on both; ``f`` the MLP adapter over the frozen LLM table ``X``); a per-dimension gate
  ``g = sigmoid(W2 GELU(W1 [id ; llm]))`` gives ``LN(g * id + (1 - g) * llm)``, the backbone's input.
  The ID table starts from a PCA of ``X``.
* **Item-level alignment** (ILA): InfoNCE ``E[i] -> f(X[i])`` over the batch's items, tau 0.05, copies of
  an item never each other's negatives.
* **Feature-level alignment** (FLA): Barlow-Twins cross-correlation of ``E`` and ``f(X)``, separately for
  the items above / below the batch's median training popularity, summed over dimensions.
* **Curriculum**: ``w_I = w_min + (w_max - w_min)(1 + cos(2 pi t / T)) / 2``; loss
  ``rec + alpha (w_I ILA + (1 - w_I) FLA)``.
* **Scoring**: trained against the ID table, tested against ``LN(E[v] + f(X[v]))`` with the input-side
  LayerNorm (spec §3.4); ``score_fusion: symmetric`` uses the latter in training too.

Backbones (``backbone``): SASRec, FMLPRec (positions added to both branches before the gate) and GRU4Rec
(no positions), all through the one fused-embedding module below.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.losses import grouped_barlow_twins, info_nce
from recbole_llmfuse.model.base import LLMFusedSequentialRecommender
from recbole_llmfuse.model.encoders import SequenceBackbone
from recbole_llmfuse.model.fusion import TextTokens
from recbole_llmfuse.model.layers import Dropout
from recbole_llmfuse.stats import training_counts

FUSIONS = ("gate", "mean", "id_only")


def pca_scores(table: torch.Tensor, dim: int) -> torch.Tensor:
    """Scores of ``table [N, D]`` on its first ``min(dim, D, N)`` principal components (no whitening)."""
    centred = table.double() - table.double().mean(0)
    q = min(dim, centred.shape[0], centred.shape[1])
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ v[:q].T).float()  # [N, q]


class GatedFusion(nn.Module):
    """FAERec's fused item states and candidates over an ID table and an adapter of the frozen LLM table.

    ``states(items [B, L], table, positions [L, d] | None) -> [B, L, d]`` (the backbone input);
    ``candidates(table) -> [n_items, d]`` = ``LN(E + f(X))``; ``parts(items, table) -> (E[items], f(X[items]))``.
    """

    def __init__(self, n_items: int, dim: int, text_dim: int, config, norm: nn.LayerNorm):
        super().__init__()
        self.fusion = config["fusion"]
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion '{self.fusion}': FAERec supports {FUSIONS}")
        self.id = nn.Embedding(n_items, dim, padding_idx=0)
        hidden = config["adapter_hidden"] or max(text_dim // 2, dim)
        self.adapter = TextTokens(text_dim, dim, [hidden], config["adapter_dropout"])
        self.gate = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.GELU(), Dropout(config["gate_dropout"]),
                                  nn.Linear(2 * dim, dim))
        self.dropout = Dropout(config["hidden_dropout_prob"])
        self.norm = norm

    def reset_gate_and_adapter(self) -> None:
        """PyTorch's default Linear init for the adapter and gate (the authors build them after the N(0, 0.02)
        pass), and a zero last gate bias: the gate starts near 0.5."""
        for module in list(self.adapter.modules()) + list(self.gate.modules()):
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        nn.init.zeros_(self.gate[-1].bias)

    def parts(self, items: torch.Tensor, table: torch.Tensor):
        return self.id(items), self.adapter(items, table)

    def gate_weights(self, id_vec: torch.Tensor, llm_vec: torch.Tensor) -> torch.Tensor:
        """Per-dimension gate ``g`` in (0, 1), ``[*, d]``."""
        return torch.sigmoid(self.gate(torch.cat([id_vec, llm_vec], -1)))

    def states(self, items: torch.Tensor, table: torch.Tensor, positions) -> torch.Tensor:
        id_vec, llm_vec = self.parts(items, table)
        if positions is not None:
            id_vec, llm_vec = id_vec + positions, llm_vec + positions
        id_vec, llm_vec = self.dropout(id_vec), self.dropout(llm_vec)
        if self.fusion == "id_only":
            fused = id_vec
        elif self.fusion == "mean":
            fused = 0.5 * (id_vec + llm_vec)
        else:
            g = self.gate_weights(id_vec, llm_vec)
            fused = g * id_vec + (1 - g) * llm_vec
        return self.norm(fused)

    def candidates(self, table: torch.Tensor) -> torch.Tensor:
        return self.norm(self.id.weight + self.adapter.all(table))


class FAERec(LLMFusedSequentialRecommender):
    """FAERec on a SASRec / FMLPRec / GRU4Rec backbone (see module docstring); ``forward -> [B, d]``."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = config["hidden_size"]
        self.backbone = SequenceBackbone(config, self.max_seq_length)
        norm = self.backbone.LayerNorm or nn.LayerNorm(d, eps=config["layer_norm_eps"])
        self.fusion = GatedFusion(self.n_items, d, self.text_dim, config, norm)
        self.init_parameters()
        self.fusion.reset_gate_and_adapter()
        if config["pca_init"]:
            with torch.no_grad():
                scores = pca_scores(self.item_text_emb[1:], d)
                self.fusion.id.weight[1:, : scores.shape[1]] = scores
        item_counts, _ = training_counts(dataset)
        self.register_buffer("popularity", torch.from_numpy(item_counts).clamp_min(1).float(), persistent=False)
        self.alpha = float(config["align_alpha"])
        self.tau = float(config["ila_tau"])
        self.fla_lambda = float(config["fla_lambda"])
        self.w_min, self.w_max = float(config["cls_w_min"]), float(config["cls_w_max"])
        self.period = float(config["cls_period"])
        self.cls_unit = config["cls_unit"]
        if self.cls_unit not in ("epoch", "step"):
            raise ConfigError(f"cls_unit '{self.cls_unit}': use epoch or step")
        self.use_ila, self.use_fla = bool(config["use_ila"]), bool(config["use_fla"])
        self.use_cls, self.use_pop_group = bool(config["use_cls"]), bool(config["use_pop_group"])
        self.align_items = config["align_item_source"]
        self.align_max_items = int(config["align_max_items"])
        self.score_fusion = config["score_fusion"]
        if self.score_fusion not in ("asymmetric", "symmetric"):
            raise ConfigError(f"score_fusion '{self.score_fusion}': use asymmetric (the authors') or symmetric")
        self.epoch, self.steps = 0, 0

    # -- curriculum -----------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def ila_weight(self) -> float:
        """``w_I(t)`` (Eq. 11); ``use_cls: false`` -> 0.5 ("w/o CLS")."""
        if not self.use_cls:
            return 0.5
        t = self.epoch if self.cls_unit == "epoch" else self.steps
        return self.w_min + (self.w_max - self.w_min) * (1 + math.cos(2 * math.pi * t / self.period)) / 2

    # -- scoring --------------------------------------------------------------------------------------
    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """``[B, L]``, ``[B]`` -> ``[B, d]``"""
        states = self.fusion.states(item_seq, self.item_text_emb, self.backbone.positions(item_seq))
        return self.backbone.encode(states, item_seq, item_seq_len)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        if self.training and self.score_fusion == "asymmetric":
            return self.fusion.id(items)  # trained against the raw ID table
        id_vec, llm_vec = self.fusion.parts(items, self.item_text_emb)
        return self.fusion.norm(id_vec + llm_vec)

    def all_item_vectors(self) -> torch.Tensor:
        if self.training and self.score_fusion == "asymmetric":
            return self.fusion.id.weight
        return self.eval_cached("items", lambda: self.fusion.candidates(self.item_text_emb))

    # -- loss -----------------------------------------------------------------------------------------
    def alignment_items(self, interaction) -> torch.Tensor:
        seq = interaction[self.ITEM_SEQ]
        items = [seq[seq > 0], interaction[self.POS_ITEM_ID].reshape(-1)]
        if self.NEG_ITEM_ID in interaction:
            items.append(interaction[self.NEG_ITEM_ID].reshape(-1))
        items = torch.cat(items)
        if self.align_items == "unique":
            items = torch.unique(items)
        if 0 < self.align_max_items < items.numel():
            items = items[torch.randperm(items.numel(), device=items.device)[: self.align_max_items]]
        return items

    def alignment_losses(self, interaction):
        """``(ILA, FLA)`` on the batch's items (ID rows vs adapter outputs; no positions, gate or LN)."""
        items = self.alignment_items(interaction)
        id_vec, llm_vec = self.fusion.parts(items, self.item_text_emb)
        ila = info_nce(id_vec, llm_vec, self.tau, ids=items) if self.use_ila else id_vec.new_zeros(())
        fla = (grouped_barlow_twins(id_vec, llm_vec, self.popularity[items], self.fla_lambda, self.use_pop_group)
               if self.use_fla else id_vec.new_zeros(()))
        return ila, fla

    def loss_terms(self, interaction) -> Dict[str, torch.Tensor]:
        """Unweighted terms of the training loss: ``rec``, plus ``ila`` and ``fla`` when alignment is on."""
        terms = {"rec": super().calculate_loss(interaction)}
        if self.alpha != 0 and (self.use_ila or self.use_fla):
            terms["ila"], terms["fla"] = self.alignment_losses(interaction)
        return terms

    def loss_weights(self) -> Dict[str, float]:
        """Eq. 14's weights at the current step: rec + α·(w_I·ILA + (1 − w_I)·FLA)."""
        w = self.ila_weight()
        return {"rec": 1.0, "ila": self.alpha * w, "fla": self.alpha * (1 - w)}

    def calculate_loss(self, interaction) -> torch.Tensor:
        if self.training:
            self.steps += 1
        with self.shared_projections(interaction):  # the adapter projects the step's items once
            terms = self.loss_terms(interaction)
        weights = self.loss_weights()
        loss = terms.pop("rec")
        for name, term in terms.items():
            loss = loss + weights[name] * term
        return loss
