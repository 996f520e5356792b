"""PAD: Pre-train, Align, and Disentangle (Wang et al., SIGIR 2025, arXiv 2412.04107).

Three phases in one ``run_recbole --model=PAD`` (:class:`~recbole_llmfuse.trainer.StagedTrainer`):

1. ``pretrain`` — the ID expert (SASRec over ``E_id``) alone, with the rec loss (``loss_type``);
2. ``align`` — the alignment expert: tokens ``fuse(E_al[i], MLP_w(T[i]))`` with ``E_al`` (and, with
   ``concat_linear`` fusion, the transformer) copied from phase 1; loss = rec + ``mmd_weight`` *
   MK-MMD(``MLP_w(T)``, ``E_al``) over items of the batch;
3. ``finetune`` — ID, alignment and text-only (``MLP_w'(T)``) experts, their logits mixed by a gate over
   the candidate item's training-frequency bucket; rec loss only; everything but ``T`` trains.

Full ranking computes the gate once per (user, bucket) and gathers it by each item's bucket, so it never
runs a per-(user, item) gate. Defaults and every deviation from paper/spec/authors' code are commented in
``properties/model/PAD.yaml``.
"""
from __future__ import annotations

from logging import getLogger
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from recbole_llmfuse import checkpoint
from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.losses import ALIGNMENT_LOSSES, alignment_loss
from recbole_llmfuse.model.base import LLMFusedSequentialRecommender
from recbole_llmfuse.model.fusion import Expert, FrequencyGate, FusedTokens, IDTokens, TextTokens
from recbole_llmfuse.stats import frequency_buckets, training_counts

STAGES = ("pretrain", "align", "finetune")
EXPERTS = ("id", "align", "text")


def _check_list(config, key: str, allowed, ordered: bool = False) -> List[str]:
    value = config[key]
    value = [value] if isinstance(value, str) else list(value)
    bad = [v for v in value if v not in allowed]
    if bad or len(set(value)) != len(value):
        raise ConfigError(f"{key}: {value} is not a list of distinct values from {list(allowed)}")
    if ordered and value != sorted(value, key=list(allowed).index):
        raise ConfigError(f"{key}: {value} must follow the order {list(allowed)}")
    return value


class PAD(LLMFusedSequentialRecommender):
    """PAD with SASRec experts (see module docstring). ``forward`` returns one ``[B, d]`` vector per scoring expert."""

    trainer_class = "StagedTrainer"  # found by name (recbole_llmfuse.trainer)
    other_parameter_name = ["stage"]

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d, L = config["hidden_size"], self.max_seq_length
        hidden, drop = config["mlp_hidden_sizes"], config["mlp_dropout_prob"]
        self.train_stages = _check_list(config, "train_stages", STAGES, ordered=True)
        self.active_experts = _check_list(config, "experts", EXPERTS)
        self.align_loss_name = config["align_loss"]
        if self.align_loss_name not in ALIGNMENT_LOSSES:
            raise ConfigError(f"align_loss '{self.align_loss_name}': choose one of {ALIGNMENT_LOSSES}")
        self.mmd_weight = float(config["mmd_weight"])
        self.mmd_bandwidth = config["mmd_bandwidth"]
        self.mmd_items = config["mmd_items"]
        self.mmd_sample_size = int(config["mmd_sample_size"])
        self.align_anchor = bool(config["align_anchor"])
        self.align_freeze_id = bool(config["align_freeze_id"])
        self.align_init_from_id = bool(config["align_init_from_id"])

        self.experts = nn.ModuleDict({
            "id": Expert(IDTokens(self.n_items, d), config, L),
            "align": Expert(FusedTokens(self.n_items, d, self.text_dim, hidden, drop, config["fusion"]),
                            config, L),
            "text": Expert(TextTokens(self.text_dim, d, hidden, drop), config, L),
        })
        self.n_buckets = int(config["pad_buckets"])
        item_counts, _ = training_counts(dataset)
        self.register_buffer("item_bucket", torch.from_numpy(frequency_buckets(item_counts, self.n_buckets)))
        self.gate = FrequencyGate(
            config["gate"], self.n_buckets, [self.experts[e].tokens.dim for e in self.active_experts],
            init=self._authors_gate_init(float(config["gate_align_offset"])),
        )
        self.init_parameters()
        self.stage = self.train_stages[-1]  # a reloaded model scores as its last phase

    def _authors_gate_init(self, align_offset: float) -> torch.Tensor:
        """The authors' starting gate logits ``[n_buckets+1, E]``: ID ``1 -> 0`` and text ``0 -> 1`` from warm to
        cold buckets, alignment ``offset -> offset-1`` (their ``gamma2`` = -4 gives it little weight at first)."""
        steps = torch.linspace(0, 1, self.n_buckets + 1)
        columns = {"id": 1 - steps, "align": align_offset - steps, "text": steps}
        return torch.stack([columns[e] for e in self.active_experts], -1)

    # -- phases ---------------------------------------------------------------------------------------
    def enter_stage(self, stage: str) -> None:
        """Switch to ``stage``: hand-off copies, then ``requires_grad`` of what the phase trains."""
        if stage not in STAGES:
            raise ConfigError(f"unknown PAD stage '{stage}'; stages are {list(STAGES)}")
        align = self.experts["align"]
        if stage == "align" and self.align_init_from_id:
            with torch.no_grad():  # E_al <- phase-1 E_id; the transformer too when the widths agree
                align.tokens.id.embedding.weight.copy_(self.experts["id"].tokens.embedding.weight)
                if align.tokens.dim == self.experts["id"].tokens.dim:
                    align.backbone.load_state_dict(self.experts["id"].backbone.state_dict())
        self.requires_grad_(False)
        if stage == "pretrain":
            self.experts["id"].requires_grad_(True)
        elif stage == "align":
            align.requires_grad_(True)
            if self.align_freeze_id:
                align.tokens.id.requires_grad_(False)
        else:
            for name in self.active_experts:
                self.experts[name].requires_grad_(True)
            self.gate.requires_grad_(True)
        self.stage = stage

    def load_pretrained(self, path: str) -> None:
        """Load a checkpoint of an earlier PAD phase, or a FastSASRec checkpoint as the phase-1 ID expert."""
        state = checkpoint.read(path)["state_dict"]
        if "item_embedding.weight" in state:  # FastSASRec: item_embedding + backbone
            state = {("experts.id.tokens.embedding.weight" if k == "item_embedding.weight" else "experts.id." + k): v
                     for k, v in state.items()}
        own = self.state_dict()
        for key, value in state.items():
            if key in own and own[key].shape != value.shape:
                raise ConfigError(
                    f"pretrained_checkpoint {path}: '{key}' has shape {tuple(value.shape)}, this model "
                    f"{tuple(own[key].shape)}; train it with the same dataset, hidden_size and fusion."
                )
        missing, unexpected = self.load_state_dict(state, strict=False)
        getLogger().info(f"PAD: loaded {len(state) - len(unexpected)} tensors from {path}; "
                         f"{len(missing)} keep their initial values")

    def _scoring(self) -> List[str]:
        return {"pretrain": ["id"], "align": ["align"]}.get(self.stage, self.active_experts)

    # -- scoring --------------------------------------------------------------------------------------
    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> List[torch.Tensor]:
        """``[B, L]``, ``[B]`` -> one ``[B, d_e]`` sequence vector per scoring expert of the current phase."""
        return [self.experts[e](item_seq, item_seq_len, self.item_text_emb) for e in self._scoring()]

    def score_items(self, users: List[torch.Tensor], items: torch.Tensor) -> torch.Tensor:
        """Gated logits of given candidates: ``items [B]`` -> ``[B]``, ``[B, K]`` -> ``[B, K]``."""
        names = self._scoring()
        logits = [Expert.score(*self._unit(u, self.experts[e].vectors(items, self.item_text_emb)))
                  for e, u in zip(names, users)]
        if len(names) == 1:
            return logits[0]
        weights = self.gate(self.item_bucket[items], users)  # the candidate's own bucket
        return (weights * torch.stack(logits, -1)).sum(-1)

    def score_all(self, users: List[torch.Tensor]) -> torch.Tensor:
        """``[B, n_items]``: ``sum_e G[u, b(i), e] * <u_e, x_e(i)>``.

        A gate that does not read the user (``bucket``, ``global``) is folded into the candidates:
        ``[u_1 ; .. ; u_E] @ [G[b(i), 1] x_1(i) ; .. ; G[b(i), E] x_E(i)]^T``, one matmul instead of E score
        matrices and E weight matrices ``[B, n_items]`` (the full-softmax loss pays this every step). The
        ``mlp`` gate is computed once per (user, bucket) and gathered by each item's bucket."""
        names = self._scoring()
        pairs = [self._unit(u, self._candidates(name)) for name, u in zip(names, users)]
        if len(names) == 1:
            return pairs[0][0] @ pairs[0][1].T
        if self.gate.kind != "mlp":
            weight = self.gate(self.item_bucket, users)  # [n_items, E], the same for every user
            candidates = torch.cat([weight[:, j:j + 1] * cand for j, (_, cand) in enumerate(pairs)], -1)
            return torch.cat([u for u, _ in pairs], -1) @ candidates.T
        per_bucket = self.gate.per_bucket(users, self.n_buckets)  # [B, n_buckets+1, E]
        scores = 0
        for j, (u, cand) in enumerate(pairs):
            scores = scores + per_bucket[:, :, j][:, self.item_bucket] * (u @ cand.T)
        return scores

    def _unit(self, u: torch.Tensor, cand: torch.Tensor):
        """Each expert's logits are cosines with ``loss_type: InfoNCE`` and ``infonce_cosine`` (as the base)."""
        if not self.cosine:
            return u, cand
        return F.normalize(u, dim=-1), F.normalize(cand, dim=-1)

    def _candidates(self, name: str) -> torch.Tensor:
        """Expert ``name``'s vectors of every item ``[n_items, d_e]`` (once per evaluation)."""
        return self.eval_cached(name, lambda: self.experts[name].all_vectors(self.item_text_emb))

    def gate_weights(self, users: List[torch.Tensor]) -> torch.Tensor:
        """Gate weights per (user, bucket) ``[B, n_buckets+1, E]`` (inspection: mean per bucket)."""
        return self.gate.per_bucket(users, self.n_buckets)

    # -- loss -----------------------------------------------------------------------------------------
    def calculate_loss(self, interaction) -> torch.Tensor:
        with self.shared_projections(interaction):  # one projection per projector per step, shared below
            if self.stage != "align" or self.align_loss_name == "none" or self.mmd_weight == 0:
                return super().calculate_loss(interaction)
            loss = super().calculate_loss(interaction) if self.align_anchor else 0.0
            return loss + self.mmd_weight * self.alignment_term(interaction)

    def alignment_term(self, interaction) -> torch.Tensor:
        """Alignment loss between ``MLP_w(T[j])`` and ``E_al[j]`` over the batch's item occurrences.

        Items: every non-padding history item plus the targets and sampled negatives (``mmd_items: all``,
        as the authors' code) or history only (``history``, the spec's reading); ``mmd_sample_size``
        occurrences drawn uniformly (RecBole batches hold 10^4-10^5 tokens; the kernel matrix is quadratic).
        """
        seq = interaction[self.ITEM_SEQ]
        items = [seq[seq > 0]]
        if self.mmd_items == "all":
            items.append(interaction[self.POS_ITEM_ID].reshape(-1))
            if self.NEG_ITEM_ID in interaction:
                items.append(interaction[self.NEG_ITEM_ID].reshape(-1))
        items = torch.cat(items)
        if 0 < self.mmd_sample_size < items.numel():
            items = items[torch.randint(items.numel(), (self.mmd_sample_size,), device=items.device)]
        id_vec, text_vec = self.experts["align"].tokens.parts(items, self.item_text_emb)
        return alignment_loss(self.align_loss_name, text_vec, id_vec, ids=items, bandwidth=self.mmd_bandwidth)

    # -- analysis -------------------------------------------------------------------------------------
    def item_tables(self) -> Dict[str, torch.Tensor]:
        """Every item representation ``[n_items, *]`` by name, for the Kendall-tau diagnostic."""
        T = self.item_text_emb
        align = self.experts["align"].tokens
        with torch.no_grad():
            return {
                "id": self.experts["id"].tokens.all(),
                "align_id": align.id.all(),
                "align_text": align.text.all(T),
                "align": align.all(T),
                "text": self.experts["text"].tokens.all(T),
                "llm": T,
            }
