"""The popularity ranker on a sequential split: the floor row of a bench.

RecBole's ``Pop`` is a general recommender, so RecBole evaluates it on a general split (several test items per user),
and its figures cannot stand beside a sequential model's leave-one-out ones. ``Popularity`` is the same ranker as a
sequential model: every item scored by its training interactions (:func:`~recbole_llmfuse.stats.training_counts`,
the counts the group metrics use), the same list for every user, on exactly the split the other rows use.
"""
from __future__ import annotations

import torch
from torch import nn

from recbole_llmfuse.model.base import SequentialBase
from recbole_llmfuse.stats import training_counts


class Popularity(SequentialBase):
    """Scores ``[B, n_items]`` = training interaction counts (ties broken towards the lower item id); nothing
    trains. The one parameter exists because RecBole's trainer builds an optimizer and calls ``backward``."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        counts = torch.from_numpy(training_counts(dataset)[0]).double()
        counts[0] = -1  # padding never ranks
        tie_break = torch.arange(len(counts), dtype=torch.float64) / (10 * len(counts))
        self.register_buffer("counts", (counts - tie_break).float(), persistent=False)  # rebuilt from the data
        self.unused = nn.Parameter(torch.zeros(1))

    def calculate_loss(self, interaction) -> torch.Tensor:
        return self.unused.sum() * 0

    def encode(self, interaction) -> torch.Tensor:
        return torch.zeros(len(interaction[self.ITEM_SEQ]), 1, device=self.counts.device)

    def predict(self, interaction) -> torch.Tensor:
        return self.counts[interaction[self.ITEM_ID]]

    def full_sort_predict(self, interaction) -> torch.Tensor:
        return self.counts.repeat(len(interaction[self.ITEM_SEQ]), 1)  # [B, n_items]; RecBole writes into it
