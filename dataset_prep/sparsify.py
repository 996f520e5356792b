"""A sparse, long-tailed variant of any atomic dataset: ``recbole-llmfuse prep sparsify``.

LLM-fusion methods are made for sparse data where most items have a handful of interactions (Amazon
Beauty: 8.9 interactions per user, 16 per item, median item ~8). A dense dataset such as ml-100k (106 per
user, a "tail" item still has a median of 15 training interactions) cannot show whether item text helps the
tail. The rule, applied to ``<dataset>.inter`` (every column kept):

1. **per-user subsampling**: user ``u`` with ``n_u`` interactions keeps ``k_u = clip(round(r * n_u),
   min_user, n_u)`` of them, drawn uniformly without replacement (time order kept), where the one rate
   ``r`` is found by bisection so that the mean of ``k_u`` is ``mean_length``. Item popularity shrinks by
   the same factor on average, so the long tail gets long: most items drop to a few interactions;
2. **iterative filter**: items with fewer than ``min_item`` interactions and users with fewer than
   ``min_user`` are removed until neither is left (``min_user >= 3``: leave-one-out needs a training
   item, a validation and a test item).

The other atomic files (``.item``, ``.user``) are copied with their rows restricted to the ids that remain;
files of other kinds (``.kg``, ``.link``, embeddings) are not copied: their rows would no longer match. The
output folder is written beside the others under a temporary name and renamed when complete; an existing
output is never replaced unless ``force``. ``<name>.sparsify.json`` records the rule, the seed and both
datasets' statistics.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, List

import numpy as np

from recbole_llmfuse.atomic import header_names
from recbole_llmfuse.errors import SparsifyError
from recbole_llmfuse.files import temp_dir


@dataclass(frozen=True)
class SparsifyOptions:
    mean_length: float = 8.0  # target mean interactions per user after subsampling
    min_user: int = 5
    min_item: int = 1
    seed: int = 0
    user_field: str = "user_id"
    item_field: str = "item_id"
    time_field: str = "timestamp"


def _read_inter(path: str, options: SparsifyOptions):
    with open(path, encoding="utf-8-sig") as f:
        header = f.readline().rstrip("\n")
        lines = [line.rstrip("\n") for line in f if line.strip()]
    names = header_names(path, header.split("\t"))
    for field in (options.user_field, options.item_field, options.time_field):
        if field not in names:
            raise SparsifyError(f"{path}, line 1: no '{field}' column in the header {header!r}; the sparse "
                                f"variant needs user, item and time columns (set user_field/item_field/time_field)")
    cols = [names.index(f) for f in (options.user_field, options.item_field, options.time_field)]
    users, items, times = [], [], []
    for lineno, line in enumerate(lines, start=2):
        parts = line.split("\t")
        if len(parts) != len(names):
            raise SparsifyError(f"{path}, line {lineno}: {len(parts)} fields, the header has {len(names)}; "
                                f"fix or remove the line")
        u, i, t = (parts[c] for c in cols)
        try:
            times.append(float(t))
        except ValueError:
            raise SparsifyError(f"{path}, line {lineno}: {options.time_field} '{t}' is not a number") from None
        users.append(u)
        items.append(i)
    return header, lines, np.array(users, dtype=object), np.array(items, dtype=object), np.array(times)


def stats(users: np.ndarray, items: np.ndarray) -> Dict[str, float]:
    """Size and sparsity figures of an interaction list."""
    _, per_user = np.unique(users, return_counts=True)
    _, per_item = np.unique(items, return_counts=True)
    return {
        "users": int(per_user.size), "items": int(per_item.size), "interactions": int(users.size),
        "density": float(users.size / max(1, per_user.size * per_item.size)),
        "mean_per_user": float(per_user.mean()) if per_user.size else 0.0,
        "mean_per_item": float(per_item.mean()) if per_item.size else 0.0,
        "median_per_item": float(np.median(per_item)) if per_item.size else 0.0,
        "items_le_5": float((per_item <= 5).mean()) if per_item.size else 0.0,
    }


def _keep_counts(lengths: np.ndarray, rate: float, min_user: int) -> np.ndarray:
    return np.minimum(lengths, np.maximum(min_user, np.rint(rate * lengths))).astype(int)


def subsample(users: np.ndarray, times: np.ndarray, options: SparsifyOptions) -> np.ndarray:
    """Row indices kept by step 1 (sorted): per user ``k_u`` rows drawn uniformly, the rate by bisection."""
    order = np.lexsort((times, users))
    uniq, start, lengths = np.unique(users[order], return_index=True, return_counts=True)
    if options.mean_length >= lengths.mean():
        raise SparsifyError(f"mean_length {options.mean_length} is not below the dataset's {lengths.mean():.1f} "
                            f"interactions per user; choose a smaller target")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # mean k_u is monotone in the rate
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _keep_counts(lengths, mid, options.min_user).mean() < options.mean_length else (lo, mid)
    keep = _keep_counts(lengths, hi, options.min_user)
    rng = np.random.default_rng(options.seed)
    kept: List[np.ndarray] = []
    for s, n, k in zip(start, lengths, keep):
        kept.append(order[s + np.sort(rng.choice(n, size=k, replace=False))])
    return np.sort(np.concatenate(kept))


def k_filter(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Boolean mask of rows left by the iterative user/item minimum-count filter (step 2)."""
    mask = np.ones(users.size, dtype=bool)
    while True:
        u, ucount = np.unique(users[mask], return_counts=True)
        i, icount = np.unique(items[mask], return_counts=True)
        bad_u, bad_i = set(u[ucount < min_user]), set(i[icount < min_item])
        if not bad_u and not bad_i:
            return mask
        mask &= ~np.isin(users, list(bad_u)) & ~np.isin(items, list(bad_i))


def sparsify(folder: str, dataset: str, out_root: str, name: str, options: SparsifyOptions,
             force: bool = False) -> dict:
    """Write ``<out_root>/<name>/`` (see module docstring); returns ``{"before": stats, "after": stats, ...}``."""
    if options.min_user < 3:
        raise SparsifyError(f"min_user {options.min_user}: leave-one-out needs at least 3 interactions per user")
    if name == dataset and os.path.abspath(out_root) == os.path.abspath(os.path.dirname(folder)):
        raise SparsifyError(f"--name {name}: give the sparse variant a new name; the source dataset is kept as is")
    target = os.path.join(out_root, name)
    if os.path.exists(target) and not force:
        raise SparsifyError(f"{target} exists; choose another --name or pass --force to replace it")
    path = os.path.join(folder, f"{dataset}.inter")
    if not os.path.isfile(path):
        raise SparsifyError(f"{path} does not exist")
    header, lines, users, items, times = _read_inter(path, options)
    if not lines:
        raise SparsifyError(f"{path} has a header and no interactions")
    rows = subsample(users, times, options)
    mask = k_filter(users[rows], items[rows], options.min_user, options.min_item)
    rows = rows[mask]
    if rows.size == 0:
        raise SparsifyError(f"no interactions left: lower min_item ({options.min_item}) or raise mean_length")
    report = {"source": os.path.abspath(path), "rule": asdict(options),
              "before": stats(users, items), "after": stats(users[rows], items[rows])}
    os.makedirs(out_root, exist_ok=True)
    tmp = temp_dir(out_root, f".{name}-")
    try:
        with open(os.path.join(tmp, f"{name}.inter"), "w", encoding="utf-8") as f:
            f.write(header + "\n")
            f.writelines(lines[r] + "\n" for r in rows)
        keep_ids = {"item": set(items[rows]), "user": set(users[rows])}
        for kind, field in (("item", options.item_field), ("user", options.user_field)):
            src = os.path.join(folder, f"{dataset}.{kind}")
            if not os.path.isfile(src):
                continue
            with open(src, encoding="utf-8") as f_in, open(os.path.join(tmp, f"{name}.{kind}"), "w", encoding="utf-8") as f_out:
                head = f_in.readline()
                col = header_names(src, head.rstrip("\n").split("\t")).index(field)
                f_out.write(head)
                f_out.writelines(line for line in f_in if line.rstrip("\n").split("\t")[col] in keep_ids[kind])
        with open(os.path.join(tmp, f"{name}.sparsify.json"), "w") as f:
            json.dump(report, f, indent=2)
        if os.path.exists(target):  # --force: the old folder goes only once the new one is complete
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["folder"] = target
    return report


def table(report: dict) -> str:
    keys = ["users", "items", "interactions", "density", "mean_per_user", "mean_per_item", "median_per_item", "items_le_5"]
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for side in ("before", "after"):
        s = report[side]
        lines.append(f"| {side} | " + " | ".join(f"{s[k]:.4g}" for k in keys) + " |")
    return "\n".join(lines)
