"""PtE's profile rewards (spec PtE §4.3, Eq. 9-11) and GRPO advantages (§4.4), shared by the ``profiler_grpo``
hook (the reward GRPO maximises) and best-of-K extraction in ``pte_profiles`` (§4.6: the candidate kept).

``R(p) = λ_c R_collab(p) + λ_d R_dist(p)`` with

* ``R_collab(p) = mean_{i ∈ I(e)} cos(f_enc(p), f_enc(i))`` — closeness to what the entity interacted with (a
  user's items; an item's users, spec §4.5);
* ``R_dist(p) = -mean_{w ∈ N(e)} cos(f_enc(p), ē_w)`` — distance from the entity's overlap neighbours' current
  profile embeddings ``ē_w`` (refreshed as better profiles are found);
* the format guard: a candidate lacking the asked-for fields or with fewer than 10 words scores ``-1`` (spec §4.3;
  it blocks degenerate text that games ``R_dist``).

``f_enc`` is the ``pte_embeddings`` hook's encoder (one encoder for rewards and features, spec §4.1); vectors are
L2-normalised, so a cosine is a dot product.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

#: reward of a candidate that fails the format guard [spec PtE §4.3]
MALFORMED_REWARD = -1.0


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ProfileReward:
    """Eq. 9-11 for the entities of one kind (users or items).

    ``encode``: texts -> ``[n, d]`` L2-normalised vectors (``f_enc``). ``targets``: entity -> ``[n_e, d]`` vectors of
    ``I(e)`` (Eq. 10). ``neighbors``: entity -> its neighbours ``N(e)`` (Eq. 11). ``neighbor_vecs``: entity ->
    ``[d]`` current embedding ``ē`` (any entity that is someone's neighbour). ``well_formed``: text -> bool (the
    format guard; None = no guard).
    """

    def __init__(self, encode: Callable[[List[str]], np.ndarray], targets: Dict[str, np.ndarray],
                 neighbors: Dict[str, Sequence[str]], neighbor_vecs: Dict[str, np.ndarray], lambda_c: float = 1.0,
                 lambda_d: float = 0.5, well_formed: Optional[Callable[[str], bool]] = None):
        self.encode, self.well_formed = encode, well_formed
        self.targets = {k: _unit(v) for k, v in targets.items()}
        self.neighbors = {k: list(v) for k, v in neighbors.items()}
        self.neighbor_vecs = {k: _unit(v) for k, v in neighbor_vecs.items()}
        self.lambda_c, self.lambda_d = float(lambda_c), float(lambda_d)

    def update_neighbor_vecs(self, vecs: Dict[str, np.ndarray]) -> None:
        """Replace some entities' ``ē`` (spec §4.3: refreshed after every GRPO epoch)."""
        self.neighbor_vecs.update({k: _unit(v) for k, v in vecs.items()})

    def components(self, keys: Sequence[str], z: np.ndarray) -> List[Dict[str, float]]:
        """``[{collab, dist, reward}]`` of the candidates with L2-normalised encodings ``z`` ``[n, d]`` (no guard)."""
        out = []
        for key, v in zip(keys, _unit(z)):
            t = self.targets.get(key)
            collab = float((t @ v).mean()) if t is not None and len(t) else 0.0
            near = [self.neighbor_vecs[w] for w in self.neighbors.get(key, ()) if w in self.neighbor_vecs]
            dist = -float((np.stack(near) @ v).mean()) if near else 0.0
            out.append({"collab": collab, "dist": dist, "reward": self.lambda_c * collab + self.lambda_d * dist})
        return out

    def score(self, keys: Sequence[str], texts: Sequence[str]) -> List[Dict[str, object]]:
        """``[{reward, collab, dist, well_formed, vector}]`` per candidate; malformed ones get reward -1 and no
        components (None), and are not encoded."""
        ok = [self.well_formed(t) if self.well_formed else bool(t.strip()) for t in texts]
        idx = [i for i, good in enumerate(ok) if good]
        z = self.encode([texts[i] for i in idx]) if idx else np.zeros((0, 1), np.float32)
        scored = dict(zip(idx, zip(self.components([keys[i] for i in idx], z), z)))
        out = []
        for i in range(len(texts)):
            if i in scored:
                parts, vec = scored[i]
                out.append({**parts, "well_formed": True, "vector": vec})
            else:
                out.append({"reward": MALFORMED_REWARD, "collab": None, "dist": None, "well_formed": False,
                            "vector": None})
        return out


def group_advantages(rewards: Sequence[float], group: int, mode: str = "group_std") -> np.ndarray:
    """Per-candidate advantages of consecutive groups of ``group`` rewards (spec PtE §4.4).

    ``group_std`` (standard GRPO): ``A_k = (R_k - mean(R)) / (std(R) + 1e-4)`` with the sample standard deviation
    (as TRL's ``scale_rewards="group"``); ``paper_logsigmoid``: ``g_k = log σ(R_k - mean(R))``, ``A_k = g_k -
    mean(g)`` — the closest trainable reading of Eq. 12 (monotone in ``R_k``). Identical rewards: zero advantages.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group)
    centred = r - r.mean(1, keepdims=True)
    if mode == "group_std":
        std = r.std(1, ddof=1, keepdims=True) if group > 1 else np.zeros_like(centred)
        return (centred / (std + 1e-4)).ravel()
    if mode == "paper_logsigmoid":
        g = paper_logsigmoid(r)
        return (g - g.mean(1, keepdims=True)).ravel()
    raise ValueError(f"advantage '{mode}': group_std | paper_logsigmoid")


def paper_logsigmoid(r: np.ndarray) -> np.ndarray:
    """``log σ(R_k - mean_k R)`` per group (rows of ``r`` ``[groups, K]``): Eq. 12's summand."""
    centred = r - r.mean(-1, keepdims=True)
    return -np.logaddexp(0.0, -centred)
