"""Diagnostics of learned item spaces: PAD's Kendall-tau distance-concordance tool (paper §4.3, Eq. 13).

How much has a learned item space distorted the *ordering of distances* of a reference space? For every
(behaviour ``i_s``, target ``i_t``, ``s < t``) pair of the test users' sequences, the two spaces give the
distances ``dA = ||A[i_s] - A[i_t]||`` and ``dB = ||B[i_s] - B[i_t]||``; Kendall's tau between the ``dA`` and
``dB`` of the pairs whose *target* falls in a training-popularity bucket says how well that bucket's
geometry survived (1: same ordering; < 0.5: more than a quarter of the orderings flipped). Spaces may
differ in size and modality (an ID table against the raw LLM table is fine).

``recbole-llmfuse analyze kendall --ref A.pth:id --cmp B.pth:align_id [--cmp ...] --out DIR`` writes
``kendall.csv`` and ``kendall.png`` (tau per bucket, one curve per comparison).

``recbole-llmfuse analyze popularity --model A.pth [--model B.pth ...] --out DIR`` writes ``popularity.csv`` and
``popularity.png``: how far each model's ranking follows training popularity (see :func:`popularity_profile`).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from recbole_llmfuse.dataset_prep import itememb
from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.files import png_figure, write_csv
from recbole_llmfuse.quick_start import load_data_and_model
from recbole_llmfuse.stats import frequency_buckets, training_counts


def sequence_pairs(item_seqs: np.ndarray, lengths: np.ndarray, targets: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """All ``(behaviour, target)`` pairs ``s < t`` of each sequence (repeats kept, padding skipped).

    ``item_seqs [U, L]`` right-padded histories with ``lengths [U]``; ``targets [U]`` (optional) is appended
    to each history first. Returns ``(src [P], tgt [P])`` item ids.
    """
    if targets is not None:
        full = np.zeros((item_seqs.shape[0], item_seqs.shape[1] + 1), dtype=np.int64)
        full[:, :-1] = item_seqs
        full[np.arange(len(lengths)), lengths] = targets
        item_seqs, lengths = full, lengths + 1
    s_idx, t_idx = np.triu_indices(item_seqs.shape[1], k=1)
    src, tgt = [], []
    for seq, n in zip(item_seqs, lengths):
        keep = t_idx < n
        src.append(seq[s_idx[keep]])
        tgt.append(seq[t_idx[keep]])
    return np.concatenate(src), np.concatenate(tgt)


def kendall_by_bucket(
    table_a: np.ndarray,
    table_b: np.ndarray,
    src: np.ndarray,
    tgt: np.ndarray,
    bucket: np.ndarray,
    max_pairs: int = 200_000,
    seed: int = 0,
) -> Dict[str, Tuple[float, int]]:
    """``{"overall": (tau, pairs), "b01": (tau, pairs), ...}``: Kendall's tau-b of Euclidean distances.

    Each pair goes to the bucket of its target; at most ``max_pairs`` pairs per group are sampled (fixed
    ``seed``). Groups with fewer than 3 pairs give NaN.
    """
    from scipy.stats import kendalltau

    a, b = np.asarray(table_a, dtype=np.float64), np.asarray(table_b, dtype=np.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"the two tables have {a.shape[0]} and {b.shape[0]} rows; they must index the same items")
    rng = np.random.default_rng(seed)
    groups = {"overall": np.ones(len(src), dtype=bool)}
    for k in range(1, int(bucket.max()) + 1):
        groups[f"b{k:02d}"] = bucket[tgt] == k
    out = {}
    for name, mask in groups.items():
        idx = np.flatnonzero(mask)
        if len(idx) > max_pairs:
            idx = rng.choice(idx, max_pairs, replace=False)
        if len(idx) < 3:
            out[name] = (float("nan"), int(len(idx)))
            continue
        d_a = np.linalg.norm(a[src[idx]] - a[tgt[idx]], axis=1)
        d_b = np.linalg.norm(b[src[idx]] - b[tgt[idx]], axis=1)
        out[name] = (float(kendalltau(d_a, d_b).statistic), int(len(idx)))
    return out


def item_table(model, name: str) -> np.ndarray:
    """An item representation ``[n_items, d]`` of a trained model, by name.

    ``item`` (the model's candidate vectors: ``all_item_vectors()``, or RecBole's ``item_embedding``),
    ``llm`` (the frozen text table of LLM-fused models), a name of ``model.item_tables()`` (PAD: ``id``,
    ``align_id``, ``align_text``, ``align``, ``text``), or any ``[n_items, d]`` entry of the state dict.
    """
    model.eval()
    with torch.no_grad():
        tables = model.item_tables() if hasattr(model, "item_tables") else {}
        if name in tables:
            return tables[name].detach().cpu().numpy()
        if name == "llm" and hasattr(model, "item_text_emb"):
            return model.item_text_emb.cpu().numpy()
        if name == "item":
            if hasattr(model, "all_item_vectors"):
                try:
                    return model.all_item_vectors().detach().cpu().numpy()
                except NotImplementedError:  # SequentialBase's default: a model without candidate vectors
                    pass
            if hasattr(model, "item_embedding"):
                return model.item_embedding.weight.detach().cpu().numpy()
        state = model.state_dict()
        if name in state and state[name].dim() == 2 and state[name].shape[0] == model.n_items:
            return state[name].cpu().numpy()
    known = sorted(set(tables) | {"item"} | ({"llm"} if hasattr(model, "item_text_emb") else set()))
    raise ConfigError(f"model {type(model).__name__} has no item table '{name}'; use one of {known} "
                      f"or a state-dict key of an [n_items, d] tensor")


def _load(path: str, cache: dict):
    if path not in cache:
        if not os.path.isfile(path):
            raise ConfigError(f"checkpoint {path} does not exist")
        cache[path] = load_data_and_model(path)
    return cache[path]


def _spec(text: str, default: Optional[str] = None) -> Tuple[str, str]:
    """``CKPT.pth:TABLE`` -> ``(CKPT.pth, TABLE)``; a bare ``CKPT.pth`` gets ``default`` where one is given."""
    if default is not None and text.endswith(".pth"):
        return text, default
    path, sep, table = text.rpartition(":")
    if not sep or not path or not table:
        raise ConfigError(f"'{text}': write CHECKPOINT.pth:TABLE, e.g. saved/PAD-finetune-....pth:align_id")
    return path, table


def kendall_report(ref: str, comparisons: Sequence[str], out: str, max_pairs: int = 200_000, seed: int = 0,
                   n_buckets: int = 10) -> List[dict]:
    """Kendall tau per bucket of each ``CKPT:TABLE`` in ``comparisons`` against ``ref``; CSV + PNG in ``out``."""
    cache: dict = {}
    ref_path, ref_table = _spec(ref)
    _, ref_model, _, train_data, _, test_data = _load(ref_path, cache)
    a = item_table(ref_model, ref_table)
    bucket = frequency_buckets(training_counts(train_data.dataset)[0], n_buckets)
    inter = test_data.dataset.inter_feat
    cfg = test_data.dataset.config
    iid = test_data.dataset.iid_field
    src, tgt = sequence_pairs(inter[iid + cfg["LIST_SUFFIX"]].numpy(), inter[cfg["ITEM_LIST_LENGTH_FIELD"]].numpy(),
                              inter[iid].numpy())
    rows = []
    for spec in comparisons:
        path, table = _spec(spec)
        _, model, _, _, _, _ = _load(path, cache)
        if model.n_items != ref_model.n_items:
            raise ConfigError(f"{spec}: {model.n_items} items, the reference {ref_model.n_items}; use the same dataset")
        result = kendall_by_bucket(a, item_table(model, table), src, tgt, bucket, max_pairs, seed)
        for group, (tau, pairs) in result.items():
            rows.append({"comparison": f"{ref} vs {spec}", "group": group, "tau": tau, "pairs": pairs})
    write_csv(os.path.join(out, "kendall.csv"), rows, ["comparison", "group", "tau", "pairs"])
    _plot(rows, os.path.join(out, "kendall.png"))
    return rows


def _plot(rows: List[dict], path: str) -> None:
    with png_figure(path, figsize=(7, 4)) as (_, ax):
        for name in dict.fromkeys(r["comparison"] for r in rows):
            pts = [(int(r["group"][1:]), r["tau"]) for r in rows
                   if r["comparison"] == name and r["group"] != "overall"]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name.split(" vs ")[1])
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("target item popularity bucket (training split; 1 = most popular)")
        ax.set_ylabel("Kendall tau of behaviour-target distances")
        ax.set_title(f"reference: {rows[0]['comparison'].split(' vs ')[0]}" if rows else "")
        ax.legend(fontsize=8)


# -- how much of a model's ranking is popularity ------------------------------------------------------------
def popularity_profile(scores: np.ndarray, table: Optional[np.ndarray], item_counts: np.ndarray, n_buckets: int = 10,
                       k: int = 10) -> Dict[str, Dict[str, float]]:
    """How far a model's ranking follows training popularity, from its full-sort ``scores [U, n_items]`` (column 0,
    padding, and already-seen items set to -inf by the caller) and its item ``table [n_items, d]`` (or None).

    Returns ``{"overall": {"score_rho", "norm_rho", "topk_share", "norm"}, "b01": {...}, ...}``: ``score_rho`` is
    the mean over users of Spearman's rho between an item's score and its training count (1: the popularity
    ranker), ``topk_share`` the share of top-``k`` slots that go to each popularity bucket (the popularity ranker
    puts them all in b01), ``norm`` the bucket's mean item-vector norm over the table's mean and ``norm_rho`` its
    rank correlation with the count (inner-product scoring favours long vectors).
    """
    from scipy.stats import spearmanr

    counts = np.asarray(item_counts)
    bucket = frequency_buckets(counts, n_buckets)
    if scores.shape[1] != len(counts) or (table is not None and len(table) != len(counts)):
        raise ConfigError(f"scores over {scores.shape[1]} items, the dataset {len(counts)}; use a checkpoint of this "
                          f"dataset")
    seen = np.isfinite(scores[:, 1:])
    rhos = [spearmanr(row[ok], counts[1:][ok]).statistic for row, ok in zip(scores[:, 1:], seen) if ok.sum() > 2]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    shares = np.bincount(bucket[top].ravel(), minlength=n_buckets + 1)[1:] / top.size
    norms = np.linalg.norm(np.asarray(table, dtype=np.float64), axis=1)[1:] if table is not None else None
    out = {"overall": {"score_rho": float(np.nanmean(rhos)) if rhos else float("nan"),
                       "norm_rho": float(spearmanr(norms, counts[1:]).statistic) if norms is not None else float("nan"),
                       "topk_share": 1.0, "norm": 1.0 if norms is not None else float("nan")}}
    for b in range(1, n_buckets + 1):
        mask = bucket[1:] == b
        norm = float(norms[mask].mean() / norms.mean()) if norms is not None and mask.any() else float("nan")
        out[f"b{b:02d}"] = {"score_rho": float("nan"), "norm_rho": float("nan"), "topk_share": float(shares[b - 1]),
                            "norm": norm}
    return out


def _full_sort_scores(model, data, max_users: int) -> np.ndarray:
    """``[U, n_items]`` full-sort scores of up to ``max_users`` evaluation users, padding and the items each user
    has already seen at -inf (as RecBole's full-sort evaluation masks them)."""
    model.eval()
    rows, done = [], 0
    with torch.no_grad():
        for interaction, history_index, _, _ in data:
            scores = model.full_sort_predict(interaction.to(model.device)).view(len(interaction), -1).float().cpu()
            scores[:, 0] = -np.inf
            if history_index is not None:
                scores[history_index] = -np.inf
            rows.append(scores[: max_users - done].numpy())
            done += len(rows[-1])
            if done >= max_users:
                break
    return np.concatenate(rows)


def popularity_report(specs: Sequence[str], out: str, n_buckets: int = 10, k: int = 10,
                      max_users: int = 1000) -> List[dict]:
    """:func:`popularity_profile` of each ``CKPT`` or ``CKPT:TABLE`` (default table ``item``) on its test users;
    ``popularity.csv`` + ``popularity.png`` (top-``k`` share per bucket, one curve per checkpoint) in ``out``."""
    cache: dict = {}
    rows = []
    for spec in specs:
        path, table = _spec(spec, "item")
        _, model, _, train_data, _, test_data = _load(path, cache)
        try:
            vectors = item_table(model, table)
        except ConfigError:
            if table != "item":
                raise
            vectors = None  # a model with no item table (the popularity ranker): scores only
        profile = popularity_profile(_full_sort_scores(model, test_data, max_users), vectors,
                                     training_counts(train_data.dataset)[0], n_buckets, k)
        rows += [{"checkpoint": spec, "group": group, **values} for group, values in profile.items()]
    write_csv(os.path.join(out, "popularity.csv"), rows,
              ["checkpoint", "group", "score_rho", "norm_rho", "topk_share", "norm"])
    _plot_popularity(rows, k, os.path.join(out, "popularity.png"))
    return rows


def _label(spec: str) -> str:
    """A checkpoint's name in a legend: its folder (a bench's ``saved/<model>-seed<k>/``), else its file name."""
    path = _spec(spec, "item")[0]
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or os.path.basename(path)


def _plot_popularity(rows: List[dict], k: int, path: str) -> None:
    with png_figure(path, figsize=(7, 4)) as (_, ax):
        for name in dict.fromkeys(r["checkpoint"] for r in rows):
            mine = [r for r in rows if r["checkpoint"] == name]
            rho = mine[0]["score_rho"]
            pts = [(int(r["group"][1:]), r["topk_share"]) for r in mine[1:]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{_label(name)} (rho {rho:.2f})")
        ax.set_xlabel("item popularity bucket (training split; 1 = most popular)")
        ax.set_ylabel(f"share of top-{k} slots")
        ax.legend(fontsize=7)


# -- Information Sufficiency Index (PtE paper §3, Eq. 1-2; estimator of spec PtE §8.2) ------------------------
def _reduce(x: np.ndarray, fit: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """Standardise on the ``fit`` rows, then PCA to ``dims`` if wider (spec §8.2: PCA-256 pre-reduction)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[fit])
    z = scaler.transform(x)
    dims = min(dims, int(np.sum(fit)))  # PCA has at most as many components as fitted rows (small spaces)
    if z.shape[1] > dims:
        z = PCA(dims, random_state=seed).fit(z[fit]).transform(z)
    return z


def isi(u: np.ndarray, v: np.ndarray, seeds: Sequence[int] = (0, 1, 2, 3, 4), clusters: int = 256,
        families: Sequence[str] = ("linear", "mlp"), dims: int = 256) -> Dict[str, Tuple[float, float]]:
    """``I_S(U -> V) = 1 - CE(V | U) / H(V)`` of PtE Eq. 2, estimated as spec §8.2 (``discrete`` mode).

    ``u [N, d_u]``, ``v [N, d_v]`` paired rows (e.g. the same items in two spaces). Per seed: an 80/20 split;
    ``V`` standardised and discretised by k-means with ``min(clusters, N_train // 20)`` clusters fitted on the
    training fold; ``H`` = test cross-entropy of add-one smoothed training label frequencies; ``CE`` = test
    cross-entropy of a conditional model of the label given ``U`` — ``linear`` (multinomial logistic
    regression, L2 strength picked on an inner split) or ``mlp`` (one 256-unit ReLU layer, early stopping).
    Returns ``{family: (mean, std)}`` over seeds plus ``best`` (the better family per seed: the infimum over
    model families). Values can be negative when a probe overfits; they are reported as they are.
    """
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    if len(u) != len(v) or len(u) < 50:
        raise ConfigError(f"ISI needs at least 50 paired rows in both spaces; got {len(u)} and {len(v)}")
    scores: Dict[str, List[float]] = {f: [] for f in (*families, "best")}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(u))
        cut = int(0.8 * len(u))
        train, test = np.zeros(len(u), bool), np.zeros(len(u), bool)
        train[order[:cut]], test[order[cut:]] = True, True
        zu, zv = _reduce(u, train, dims, seed), _reduce(v, train, dims, seed)
        k = max(2, min(clusters, cut // 20))
        labels = KMeans(k, n_init=4, random_state=seed).fit(zv[train]).predict(zv)
        freq = np.bincount(labels[train], minlength=k) + 1.0
        h = float(-np.log(freq[labels[test]] / freq.sum()).mean())

        def cross_entropy(model) -> float:
            proba = np.full((int(test.sum()), k), 1e-12)
            proba[:, model.classes_] = np.clip(model.predict_proba(zu[test]), 1e-12, None)
            proba /= proba.sum(1, keepdims=True)
            return float(-np.log(proba[np.arange(len(proba)), labels[test]]).mean())

        per = {}
        if "linear" in families:  # L2 strength on an inner 80/20 split of the training fold
            inner = order[:cut]
            fit_i, val_i = inner[: int(0.8 * cut)], inner[int(0.8 * cut):]
            best_c, best_ce = 1.0, np.inf
            for c in (0.01, 0.1, 1.0):
                m = LogisticRegression(C=c, max_iter=300).fit(zu[fit_i], labels[fit_i])
                p = np.full((len(val_i), k), 1e-12)
                p[:, m.classes_] = np.clip(m.predict_proba(zu[val_i]), 1e-12, None)
                ce = -np.log(p[np.arange(len(val_i)), labels[val_i]] / p.sum(1)).mean()
                if ce < best_ce:
                    best_c, best_ce = c, ce
            per["linear"] = cross_entropy(LogisticRegression(C=best_c, max_iter=300).fit(zu[train], labels[train]))
        if "mlp" in families:
            per["mlp"] = cross_entropy(MLPClassifier((256,), early_stopping=True, max_iter=300, alpha=1e-3,
                                                     random_state=seed).fit(zu[train], labels[train]))
        for family, ce in per.items():
            scores[family].append(1.0 - ce / h)
        scores["best"].append(1.0 - min(per.values()) / h)
    return {f: (float(np.mean(s)), float(np.std(s))) for f, s in scores.items() if s}


def _space(spec: str, cache: dict):
    """``NAME=CKPT.pth:TABLE`` (a trained model's item table, see :func:`item_table`) or ``NAME=FILE.npz``
    (a feature table keyed by item token) -> ``(name, kind, value)``."""
    name, sep, source = spec.partition("=")
    if not sep or not name or not source:
        raise ConfigError(f"'{spec}': write NAME=CHECKPOINT.pth:TABLE or NAME=FILE.npz (e.g. text=dataset/ml-100k/"
                          f"ml-100k.itememb.npz)")
    if source.endswith(".npz"):
        if not os.path.isfile(source):
            raise ConfigError(f"{source} does not exist")
        return name, "file", itememb.read_table(source)
    path, table = _spec(source)
    _, model, dataset, *_ = _load(path, cache)
    tokens = np.asarray(dataset.field2id_token[dataset.iid_field], dtype=str)
    return name, "model", (tokens[1:], item_table(model, table)[1:])


def isi_report(spaces: Sequence[str], out: str, seeds: Sequence[int] = (0, 1, 2, 3, 4), clusters: int = 256) -> List[dict]:
    """ISI of every ordered pair of ``spaces`` (each ``NAME=CKPT:TABLE`` or ``NAME=FILE.npz``) over the items all
    of them have; ``isi.csv`` and ``isi.png`` (heat map of the best-family ISI, rows = source U) in ``out``."""
    if len(spaces) < 2:
        raise ConfigError("analyze isi needs at least two --space entries")
    cache: dict = {}
    loaded = [_space(s, cache) for s in spaces]
    common = set.intersection(*(set(map(str, value[0])) for _, _, value in loaded))
    keys = sorted(common)
    tables = {}
    for name, _, (tokens, matrix) in loaded:
        index = {str(t): i for i, t in enumerate(tokens)}
        tables[name] = np.asarray(matrix, dtype=np.float64)[[index[k] for k in keys]]
    rows = []
    for a in tables:
        for b in tables:
            if a == b:
                continue
            result = isi(tables[a], tables[b], seeds=seeds, clusters=clusters)
            for family, (mean, std) in result.items():
                rows.append({"source": a, "target": b, "family": family, "isi": mean, "std": std, "items": len(keys)})
    write_csv(os.path.join(out, "isi.csv"), rows, ["source", "target", "family", "isi", "std", "items"])
    _plot_isi(rows, list(tables), os.path.join(out, "isi.png"))
    return rows


def _plot_isi(rows: List[dict], names: List[str], path: str) -> None:
    grid = np.full((len(names), len(names)), np.nan)
    for r in rows:
        if r["family"] == "best":
            grid[names.index(r["source"]), names.index(r["target"])] = r["isi"]
    with png_figure(path, figsize=(1.6 * len(names) + 2, 1.4 * len(names) + 1.5)) as (fig, ax):
        im = ax.imshow(grid, cmap="viridis", vmin=min(0.0, np.nanmin(grid)), vmax=1.0)
        for i in range(len(names)):
            for j in range(len(names)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                            color="w" if grid[i, j] < 0.6 else "k")
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("V (predicted space)")
        ax.set_ylabel("U (given space)")
        ax.set_title("ISI(U -> V) = 1 - CE(V|U) / H(V)")
        fig.colorbar(im, ax=ax, fraction=0.046)
