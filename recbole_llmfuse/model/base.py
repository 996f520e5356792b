"""Base classes of every model in this package.

* :class:`SequentialBase` — a RecBole ``SequentialRecommender`` written as three methods
  (``forward`` -> sequence representation, ``item_vectors``, ``all_item_vectors``; or override
  ``score_items``/``score_all`` for non-dot-product scoring); it supplies the losses
  (``loss_type``: ``CE`` | ``BPR`` | ``BCE`` | ``InfoNCE`` = sampled softmax over the target and
  ``infonce_negatives`` negatives, logits / ``infonce_temperature``, cosine when ``infonce_cosine``,
  as PtE's SASRec, spec PtE §5.1; negatives uniform, or by training popularity with the logQ correction
  when ``infonce_sampler: popularity``), ``predict`` and ``full_sort_predict``.
* **feature tables**: a model lists the tables it needs in ``feature_tables`` (each a
  :class:`~recbole_llmfuse.data.FeatureTable`: item text embeddings, ragged item token ids, user
  embeddings, a pre-trained ID table ...); the prep hook of each runs when its file is missing and the
  table arrives as a non-persistent buffer ``self.<name>`` row-aligned with RecBole's ids (ragged tables:
  ``self.<name>`` ``[n, max_len]`` padded with -1 and ``self.<name>_len``). Checkpoints stay small and
  reloading rebuilds the buffers from the same files.
* :class:`LLMFusedSequentialRecommender` — declares the frozen item text-embedding table
  (``self.item_text_emb``, ``[n_items, text_dim]``, row = internal item id).
* training and scoring see the whole interaction: ``encode(interaction)`` (default: ``forward`` of the
  item sequence and its length) is what the losses and ``predict``/``full_sort_predict`` call, so a model
  may read user ids or any other field there.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from recbole_llmfuse.data import FeatureTable
from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.model.encoders import SequenceBackbone
from recbole_llmfuse.model.sequential import init_weights
from recbole_llmfuse.stats import training_counts

LOSS_TYPES = ("CE", "BPR", "BCE", "InfoNCE")


def uniform_negatives(pos: torch.Tensor, k: int, n_items: int) -> torch.Tensor:
    """``k`` negatives per row, uniform over items ``1 .. n_items-1`` except the row's target: ``pos [B]`` ->
    ``[B, k]``. Exact without rejection: draw from ``n_items - 2`` ids and step over the target. History items
    may appear (as in AlphaFuse's SASRec, PtE spec §5.1)."""
    draw = torch.randint(1, n_items - 1, (pos.shape[0], k), device=pos.device)
    return draw + (draw >= pos.unsqueeze(1)).long()


def popularity_negatives(pos: torch.Tensor, k: int, log_q: torch.Tensor):
    """``k`` negatives per row drawn with replacement from ``q = exp(log_q)`` ``[n_items]`` (item 0 has
    ``q = 0``): ``(negatives [B, K], is_target [B, K])``; draws equal to the row's target are masked out of
    the softmax by the caller."""
    draw = torch.multinomial(log_q.exp(), pos.shape[0] * k, replacement=True).view(pos.shape[0], k)
    return draw, draw == pos.unsqueeze(1)


class SequentialBase(SequentialRecommender):
    """Subclasses implement ``forward`` and ``item_vectors``/``all_item_vectors`` (see module docstring)."""

    #: the ``loss_type`` values the model trains with (a model with a loss of its own names it here)
    loss_types = LOSS_TYPES
    #: appended to the unsupported-loss_type message
    loss_hint = ""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.loss_type = config["loss_type"]
        if self.loss_type not in self.loss_types:
            raise ConfigError(f"loss_type '{self.loss_type}' is not supported by {type(self).__name__}; use one of "
                              f"{self.loss_types}{self.loss_hint}")
        self.initializer_range = config["initializer_range"]
        if self.loss_type == "InfoNCE":
            self.infonce_negatives = int(config["infonce_negatives"])
            self.infonce_temperature = float(config["infonce_temperature"])
            self.infonce_sampler = config["infonce_sampler"]
            if self.infonce_sampler not in ("uniform", "popularity"):
                raise ValueError(f"infonce_sampler '{self.infonce_sampler}': use uniform or popularity")
            if self.infonce_sampler == "popularity":  # q_i proportional to training count + 1 (no item has q = 0)
                counts = torch.from_numpy(training_counts(dataset)[0]).double() + 1
                counts[0] = 0
                self.register_buffer("infonce_log_q", (counts / counts.sum()).log().float(), persistent=False)
        #: cosine scoring (training and ranking) for InfoNCE with infonce_cosine
        self.cosine = self.loss_type == "InfoNCE" and bool(config["infonce_cosine"])
        self._register_feature_tables(dataset)

    def _register_feature_tables(self, dataset) -> None:
        tables = getattr(type(self), "feature_tables", ())
        if not tables:
            return
        if not hasattr(dataset, "feature_table"):
            raise TypeError(
                f"{type(self).__name__} needs a dataset built by recbole_llmfuse.create_dataset (it loads the "
                f"model's feature tables), got {type(dataset).__name__}; use recbole_llmfuse's "
                f"run_recbole/create_dataset instead of RecBole's."
            )
        for table in tables:
            value = dataset.feature_table(table.name)
            if table.ragged:
                ids, lengths = value
                self.register_buffer(table.name, torch.from_numpy(ids), persistent=False)
                self.register_buffer(f"{table.name}_len", torch.from_numpy(lengths), persistent=False)
            else:
                self.register_buffer(table.name, torch.from_numpy(value), persistent=False)

    def take_token_count(self) -> int:
        """Model contract, for models that run an LLM: the decoder tokens processed since the last call (the
        trainer adds them up and shows tokens/s in the progress bar). Models without an LLM count none."""
        return 0

    def init_parameters(self) -> None:
        """RecBole's SASRec initialisation over every sub-module (call at the end of ``__init__``)."""
        self.apply(functools.partial(init_weights, std=self.initializer_range))

    # -- to implement -------------------------------------------------------------------------------
    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor):
        """``item_seq [B, L]``, ``item_seq_len [B]`` -> the model's sequence representation."""
        raise NotImplementedError

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Candidate vectors of given items: ``[B]`` -> ``[B, D]`` (``[B, K]`` -> ``[B, K, D]``)."""
        raise NotImplementedError

    def all_item_vectors(self) -> torch.Tensor:
        """Candidate vectors of every item: ``[n_items, D]``."""
        raise NotImplementedError

    # -- dot-product scoring; models that score otherwise (e.g. gated experts) override these ---------
    def score_items(self, seq_output, items: torch.Tensor) -> torch.Tensor:
        """Scores of given items: ``items [B]`` -> ``[B]`` (or ``[B, K]`` -> ``[B, K]``)."""
        emb = self.item_vectors(items)
        if self.cosine:
            emb, seq_output = F.normalize(emb, dim=-1), F.normalize(seq_output, dim=-1)
        return (emb * (seq_output if items.dim() == 1 else seq_output.unsqueeze(1))).sum(-1)

    def score_all(self, seq_output) -> torch.Tensor:
        """Scores of every item: ``[B, n_items]``."""
        if self.cosine:
            return F.normalize(seq_output, dim=-1) @ F.normalize(self.all_item_vectors(), dim=-1).T
        return seq_output @ self.all_item_vectors().T

    # -- RecBole interface --------------------------------------------------------------------------
    def encode(self, interaction):
        """The user representation of a batch (whole interaction available); default ``forward(item_seq, len)``."""
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])

    def calculate_loss(self, interaction) -> torch.Tensor:
        return self.recommendation_loss(self.encode(interaction), interaction)

    def recommendation_loss(self, seq_output: torch.Tensor, interaction) -> torch.Tensor:
        """The ``loss_type`` loss of user representations ``seq_output [B, D]`` on the batch's targets (models with
        an auxiliary term on the same representations add it to this)."""
        pos_items = interaction[self.POS_ITEM_ID]
        if self.loss_type == "CE":
            return F.cross_entropy(self.score_all(seq_output), pos_items)
        if self.loss_type == "InfoNCE":
            return self.sampled_softmax(seq_output, pos_items)
        pos = self.score_items(seq_output, pos_items)
        neg = self.score_items(seq_output, interaction[self.NEG_ITEM_ID])
        if self.loss_type == "BPR":  # RecBole's BPRLoss
            return -torch.log(1e-10 + torch.sigmoid(pos - neg)).mean()
        return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
            neg, torch.zeros_like(neg)
        )

    def draw_negatives(self, pos_items: torch.Tensor):
        """InfoNCE negatives ``[B, K]`` and, for the popularity sampler, which of them equal the target."""
        if self.infonce_sampler == "uniform":
            return uniform_negatives(pos_items, self.infonce_negatives, self.n_items), None
        return popularity_negatives(pos_items, self.infonce_negatives, self.infonce_log_q)

    def sampled_softmax(self, seq_output, pos_items: torch.Tensor) -> torch.Tensor:
        """InfoNCE over ``[target, K negatives]`` (target in column 0). Popularity negatives get the logQ
        correction ``s - log q`` (Yi et al., RecSys 2019, "Sampling-bias-corrected neural modeling", Eq. 3),
        applied to every column, which removes the sampler's popularity bias (the corrected sampled softmax
        approaches the full softmax as K grows); a negative equal to the target is masked out. Negatives drawn earlier in the step (``self._drawn``) are used when present."""
        drawn, self._drawn = getattr(self, "_drawn", None), None
        negatives, is_target = drawn if drawn is not None else self.draw_negatives(pos_items)
        cand = torch.cat([pos_items.unsqueeze(1), negatives], 1)
        logits = self.score_items(seq_output, cand) / self.infonce_temperature
        if is_target is not None:
            logits = logits - self.infonce_log_q[cand]
            logits = logits.masked_fill(F.pad(is_target, (1, 0)), float("-inf"))
        return F.cross_entropy(logits, torch.zeros_like(pos_items))

    def predict(self, interaction) -> torch.Tensor:
        return self.score_items(self.encode(interaction), interaction[self.ITEM_ID])

    def full_sort_predict(self, interaction) -> torch.Tensor:
        return self.score_all(self.encode(interaction))


class IDSequentialRecommender(SequentialBase):
    """ID-only model: ``item_embedding [n_items, D]`` into a :class:`SequenceBackbone` of kind
    ``backbone_kind`` (class attribute; ``None`` = the config's ``backbone``). FastSASRec and FMLPRec."""

    backbone_kind = None

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.hidden_size = config["hidden_size"]
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.backbone = SequenceBackbone(config, self.max_seq_length, kind=self.backbone_kind)
        self.init_parameters()

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """``[B, L]``, ``[B]`` -> ``[B, D]``"""
        return self.backbone(self.item_embedding(item_seq), item_seq, item_seq_len)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_embedding(items)

    def all_item_vectors(self) -> torch.Tensor:
        return self.item_embedding.weight


class LLMFusedSequentialRecommender(SequentialBase):
    """:class:`SequentialBase` with ``self.item_text_emb`` (frozen ``[n_items, text_dim]`` buffer)."""

    feature_tables = (FeatureTable("item_text_emb", hook="item_text_embedding", description="item text embeddings"),)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.text_dim = self.item_text_emb.shape[1]
        self._eval_cache = {}
        self._in_step = False

    def train(self, mode: bool = True):
        self._eval_cache = {}  # model.eval() / model.train() start a new evaluation or training epoch
        return super().train(mode)

    @contextlib.contextmanager
    def shared_projections(self, interaction):
        """One training step's scope in which every text projector (sub-modules with ``begin_step``, e.g.
        :class:`~recbole_llmfuse.model.fusion.TextTokens`) projects the step's items once, on first use, and
        serves history tokens, targets, negatives and alignment terms from that one projection: all items
        with ``loss_type: CE`` (the softmax needs them anyway), else the distinct items of history, targets
        and sampled negatives (InfoNCE's negatives are drawn here, before the forward pass, for that). The
        copies of an item in a step share one dropout mask. Re-entrant; a no-op outside training."""
        sources = [] if self._in_step or not self.training else [m for m in self.modules() if hasattr(m, "begin_step")]
        if not sources:
            yield
            return
        seq = interaction[self.ITEM_SEQ]
        if self.loss_type == "CE":
            items = torch.arange(self.n_items, device=seq.device)
        else:
            parts = [seq.reshape(-1), interaction[self.POS_ITEM_ID].reshape(-1)]
            if self.NEG_ITEM_ID in interaction:
                parts.append(interaction[self.NEG_ITEM_ID].reshape(-1))
            if self.loss_type == "InfoNCE":  # drawn now, so the projection covers them
                self._drawn = self.draw_negatives(interaction[self.POS_ITEM_ID])
                parts.append(self._drawn[0].reshape(-1))
            items = torch.cat(parts)
        self._in_step = True
        for source in sources:
            source.begin_step(items, self.item_text_emb)
        try:
            yield
        finally:
            for source in sources:
                source.end_step()
            self._in_step, self._drawn = False, None

    def calculate_loss(self, interaction) -> torch.Tensor:
        with self.shared_projections(interaction):
            return super().calculate_loss(interaction)

    def eval_cached(self, key: str, compute):
        """``compute()`` once per evaluation: in eval mode without autograd (RecBole's ``evaluate``) the
        projected candidate table ``[n_items, D]`` is the same for every batch of users, and projecting a
        4096-d table per batch would dominate full ranking. Training always recomputes."""
        if self.training or torch.is_grad_enabled():
            return compute()
        if key not in self._eval_cache:
            self._eval_cache[key] = compute()
        return self._eval_cache[key]
