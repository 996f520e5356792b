"""Group metrics inside RecBole's full-ranking evaluation: where on the long tail does a model win?

Switched on with the config key ``group_metrics`` (a list of any of ``item_popularity``, ``item_buckets``,
``user_history``; ``true`` means all three). For every RecBole top-k metric in ``metrics`` (Recall, Hit,
NDCG, MRR, Precision) and every ``k`` in ``topk``, the result dict gains, next to RecBole's ``ndcg@10``:

* ``ndcg@10/head``, ``ndcg@10/tail`` — test users whose target item is a head item (the top
  ``head_item_ratio`` = 20% of items by training interactions; FAERec's rule) or a tail item;
* ``ndcg@10/b01`` … ``ndcg@10/bNN`` — ``popularity_buckets`` (10) equal-size item buckets, b01 warmest,
  items without training interactions in the coldest (PAD's warm -> cold buckets);
* ``ndcg@10/tail_users``, ``ndcg@10/head_users`` — users in the shortest ``tail_user_ratio`` (80%) of
  training histories, and the rest;

plus ``full_mrr`` (untruncated mean reciprocal rank, ties at their average rank, as RecBole's mean-rank
metrics) overall and per group. Each group value averages the users whose target falls in the group; an
empty group reports NaN. Popularity counts use the **training split only** (every training interaction,
each user's first item included), so valid/test interactions never leak into the grouping. With
leave-one-out each test user has exactly one target; with several, the first positive decides the group.

:func:`enable_group_metrics` installs the collector/evaluator below on any RecBole ``Trainer`` (built-in
or plugin model alike); ``recbole_llmfuse``'s run functions call it when the config asks for groups.
"""
from __future__ import annotations

import inspect
from typing import Dict, Optional

import numpy as np
import torch
from recbole.evaluator import Collector, Evaluator
from recbole.evaluator.base_metric import TopkMetric

from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.stats import item_groups, tail_users, training_counts

GROUPINGS = ("item_popularity", "item_buckets", "user_history")
_KEYS = ("rec.group_user", "rec.group_item", "rec.target_rank")


def groupings(config) -> tuple:
    value = config["group_metrics"]
    if not value:
        return ()
    if value is True:
        return GROUPINGS
    value = [value] if isinstance(value, str) else list(value)
    unknown = sorted(set(value) - set(GROUPINGS))
    if unknown:
        raise ConfigError(f"group_metrics: unknown grouping(s) {unknown}; choose from {list(GROUPINGS)} or true")
    return tuple(value)


class GroupCollector(Collector):
    """RecBole's ``Collector`` that also keeps, per evaluated row, the user, its target item and the target's rank."""

    def __init__(self, config):
        super().__init__(config)
        self.uid_field = config["USER_ID_FIELD"]
        self.groups: Optional[dict] = None

    def data_collect(self, train_data):
        super().data_collect(train_data)
        item_counts, user_counts = training_counts(train_data.dataset)
        self.groups = {
            **item_groups(item_counts, self.config["head_item_ratio"], self.config["popularity_buckets"]),
            "tail_user": tail_users(user_counts, self.config["tail_user_ratio"]),
            "item_counts": item_counts,
        }

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        n = scores_tensor.shape[0]
        target = torch.zeros(n, dtype=torch.long, device=positive_i.device)
        # the first positive of each row (leave-one-out: the only one)
        target[positive_u.flip(0)] = positive_i.flip(0)
        target_score = scores_tensor.gather(1, target.view(-1, 1).to(scores_tensor.device))
        greater = (scores_tensor > target_score).sum(1)
        equal = (scores_tensor == target_score).sum(1)
        rank = greater.double() + (equal.double() + 1) / 2
        self.data_struct.update_tensor("rec.group_user", interaction[self.uid_field].to(self.device))
        self.data_struct.update_tensor("rec.group_item", target.to(self.device))
        self.data_struct.update_tensor("rec.target_rank", rank.to(self.device))

    def get_data_struct(self):
        struct = super().get_data_struct()
        for key in _KEYS:
            if key in self.data_struct:
                del self.data_struct[key]
        struct.set("data.groups", self.groups)
        return struct


class GroupEvaluator(Evaluator):
    """RecBole's ``Evaluator`` plus per-group values (see module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        self.groupings = groupings(config)
        self.decimal_place = config["metric_decimal_place"]

    def evaluate(self, dataobject):
        result = super().evaluate(dataobject)
        groups = dataobject.get("data.groups")
        if groups is None:
            raise RuntimeError(
                "group metrics need the training split: call trainer.eval_collector.data_collect(train_data) "
                "before evaluate() (Trainer.fit does)."
            )
        users = dataobject.get("rec.group_user").numpy()
        items = dataobject.get("rec.group_item").numpy()
        masks: Dict[str, np.ndarray] = {}
        if "item_popularity" in self.groupings:
            masks["head"] = groups["is_head"][items]
            masks["tail"] = ~groups["is_head"][items]
        if "item_buckets" in self.groupings:
            n_buckets = int(groups["bucket"].max())
            for b in range(1, n_buckets + 1):
                masks[f"b{b:02d}"] = groups["bucket"][items] == b
        if "user_history" in self.groupings:
            masks["tail_users"] = groups["tail_user"][users]
            masks["head_users"] = ~groups["tail_user"][users]

        per_row: Dict[str, np.ndarray] = {"full_mrr": 1.0 / dataobject.get("rec.target_rank").numpy()}
        for name, metric in self.metric_class.items():
            if isinstance(metric, TopkMetric):
                pos_index, pos_len = metric.used_info(dataobject)
                takes_len = len(inspect.signature(metric.metric_info).parameters) > 1  # Recall/NDCG/MAP
                values = metric.metric_info(pos_index, pos_len) if takes_len else metric.metric_info(pos_index)
                for k in metric.topk:
                    per_row[f"{name}@{k}"] = values[:, k - 1]
        result["full_mrr"] = round(float(per_row["full_mrr"].mean()), self.decimal_place)
        for key, values in per_row.items():
            for group, mask in masks.items():
                result[f"{key}/{group}"] = round(float(values[mask].mean()), self.decimal_place) if mask.any() else float("nan")
        return result


def enable_group_metrics(trainer) -> bool:
    """Install group-aware collector/evaluator on a RecBole trainer when its config asks for groups."""
    if not groupings(trainer.config):
        return False
    trainer.eval_collector = GroupCollector(trainer.config)
    trainer.evaluator = GroupEvaluator(trainer.config)
    return True
