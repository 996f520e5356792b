"""Training-split statistics and user groups that models, hooks and the evaluation share.

Kept out of :mod:`recbole_llmfuse.data` so that the hook layer below it can use them (the evaluation
protocols split users; PAD's gate and FAERec's curriculum count item frequencies).
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from recbole_llmfuse.errors import ConfigError

PROTOCOLS = ("recbole", "cold_start_user")


def check_protocol(config) -> str:
    protocol = config["eval_protocol"]
    if protocol not in PROTOCOLS:
        raise ConfigError(f"eval_protocol '{protocol}': choose one of {', '.join(PROTOCOLS)}")
    if protocol == "cold_start_user":
        ratios = config["cold_start_ratios"]
        if not (isinstance(ratios, (list, tuple)) and len(ratios) == 3 and all(r >= 0 for r in ratios)
                and sum(ratios) > 0):
            raise ConfigError(f"cold_start_ratios must be three non-negative numbers (train, valid, test "
                                     f"users), e.g. [0.8, 0.1, 0.1]; got {ratios!r}")
    return protocol


def cold_start_user_groups(users: np.ndarray, times: np.ndarray, ratios: Sequence[float]) -> np.ndarray:
    """Cold-start-user split (PtE spec §7.1, after DreamRec/AlphaFuse): users ordered by the time of their
    *last* interaction (ties by user id), the oldest ``ratios[0]`` share trains, the next ``ratios[1]``
    validates, the newest the rest tests. ``users``/``times``: one entry per interaction. Returns
    ``group [max(users) + 1]`` (0 train, 1 valid, 2 test; -1 for ids without interactions)."""
    users = np.asarray(users)
    n = int(users.max()) + 1 if len(users) else 1
    last = np.full(n, -np.inf)
    np.maximum.at(last, users, np.asarray(times, dtype=np.float64))
    present = np.flatnonzero(np.isfinite(last))
    order = present[np.lexsort((present, last[present]))]
    r = np.asarray(ratios, dtype=np.float64) / float(sum(ratios))
    n_train = int(round(r[0] * len(order)))
    n_valid = int(round(r[1] * len(order)))
    group = np.full(n, -1, dtype=np.int64)
    group[order[:n_train]] = 0
    group[order[n_train:n_train + n_valid]] = 1
    group[order[n_train + n_valid:]] = 2
    return group


def training_counts(train_dataset) -> tuple:
    """``(item_counts [n_items], user_counts [n_users])``: training interactions per item and per user.

    Works on RecBole's augmented sequential training data (one row per prefix: the targets, plus each
    user's first item, seen only in the rows of length 1) and on plain interaction data.
    """
    feat = train_dataset.inter_feat
    iid, uid = train_dataset.iid_field, train_dataset.uid_field
    n_items, n_users = train_dataset.item_num, train_dataset.user_num
    items = feat[iid].numpy()
    users = feat[uid].numpy()
    item_counts = np.bincount(items, minlength=n_items)
    user_counts = np.bincount(users, minlength=n_users)
    list_field = iid + train_dataset.config["LIST_SUFFIX"]
    if list_field in feat.columns:
        first = feat[train_dataset.config["ITEM_LIST_LENGTH_FIELD"]].numpy() == 1
        item_counts += np.bincount(feat[list_field][:, 0].numpy()[first], minlength=n_items)
        user_counts += np.bincount(users[first], minlength=n_users)
    item_counts[0] = user_counts[0] = 0
    return item_counts, user_counts


def item_groups(item_counts: np.ndarray, head_ratio: float, n_buckets: int) -> Dict[str, np.ndarray]:
    """``is_head [n_items]`` and ``bucket [n_items]`` (1 = warmest .. ``n_buckets``; padding 0).

    Items are ranked by (training count desc, item id asc); the first ``ceil(head_ratio * n)`` are head;
    buckets split the ranking into equal item counts. Items never seen in training rank last.
    """
    n = len(item_counts) - 1
    order = np.lexsort((np.arange(1, n + 1), -item_counts[1:])) + 1  # item ids, most popular first
    rank = np.empty(n + 1, dtype=np.int64)
    rank[order] = np.arange(n)
    rank[0] = -1
    is_head = np.zeros(n + 1, dtype=bool)
    is_head[order[: int(np.ceil(head_ratio * n))]] = True
    bucket = np.zeros(n + 1, dtype=np.int64)
    bucket[1:] = rank[1:] * n_buckets // n + 1
    return {"is_head": is_head, "bucket": bucket}


def tail_users(user_counts: np.ndarray, tail_ratio: float) -> np.ndarray:
    """``is_tail [n_users]``: users in the shortest ``tail_ratio`` of training histories (ties by user id)."""
    n = len(user_counts) - 1
    order = np.lexsort((np.arange(1, n + 1), user_counts[1:])) + 1  # shortest first
    out = np.zeros(n + 1, dtype=bool)
    out[order[: int(round(tail_ratio * n))]] = True
    return out


def frequency_buckets(item_counts: np.ndarray, n_buckets: int) -> np.ndarray:
    """``bucket [n_items]``: 1 (most frequent) .. ``n_buckets`` (coldest); padding 0.

    Rank-based equal-size buckets over (count desc, item id asc), the same rule as the evaluation's
    popularity buckets; items never seen in training rank last.
    """
    return item_groups(item_counts, 0.0, n_buckets)["bucket"]


def training_histories(train_dataset, max_length: int) -> tuple:
    """``(items [n_users, max_length], lengths [n_users])``: each user's training interactions in order, the last
    ``max_length`` of them, left-aligned and zero-padded as RecBole's ``item_id_list`` (users without training
    interactions: length 0).

    Read from RecBole's augmented sequential training data: a user's longest prefix row plus its target is the
    user's whole training sequence (plain interaction data is not sequential and is refused).
    """
    import torch

    feat = train_dataset.inter_feat
    config = train_dataset.config
    iid, uid = train_dataset.iid_field, train_dataset.uid_field
    list_field, len_field = iid + config["LIST_SUFFIX"], config["ITEM_LIST_LENGTH_FIELD"]
    if list_field not in feat.columns:
        raise ConfigError("training histories need sequential training data (an item_id_list field)")
    users, lengths = feat[uid].numpy(), feat[len_field].numpy()
    order = np.lexsort((lengths, users))  # by user, then prefix length: each user's last row is its longest
    last = order[np.r_[users[order][1:] != users[order][:-1], True]]
    full = torch.cat([feat[list_field][last], torch.zeros(len(last), 1, dtype=torch.long)], dim=1)
    full[torch.arange(len(last)), torch.from_numpy(lengths[last]).long()] = feat[iid][last]  # the target follows
    n = torch.from_numpy(lengths[last]).long() + 1
    items = torch.zeros(train_dataset.user_num, max_length, dtype=torch.long)
    out_len = torch.zeros(train_dataset.user_num, dtype=torch.long)
    for row, (u, k) in enumerate(zip(users[last].tolist(), n.tolist())):  # one row per user
        keep = min(k, max_length)
        items[u, :keep] = full[row, k - keep:k]
        out_len[u] = keep
    return items, out_len
