"""PtE's profile stage (spec PtE §3): the collaborative neighbourhood and the ``pte_profiles`` hook.

The hook writes ``<dataset>.userprof.json`` and ``<dataset>.itemprof.json`` from the training split only:
initial user profiles (Eq. 6, history + overlap neighbours), item profiles (Eq. 7, their users' profiles and
metadata), then user <- item <- user rounds (Eq. 8) until the mean change between rounds (1 - cosine of
sentence-transformer encodings) is below ``tol`` for users and items, or ``max_rounds``. Prompts live in
``properties/hooks/pte_profiles.yaml``; generation goes through :mod:`recbole_llmfuse.generation`, every record
cached (a rerun generates nothing; an interrupted run resumes).
"""
from __future__ import annotations

import functools
import json
import os
import time
from logging import getLogger
from typing import Dict, List, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

from recbole_llmfuse.config import ConfigError
from recbole_llmfuse.dataset_prep.hooks import PrepError, PrepHook, atomic_write_text, hook_defaults_file
from recbole_llmfuse.dataset_prep.item_text import read_item_file, sha256_file
from recbole_llmfuse.generation import TemplateGenerator, cached_generate, make_generator


def overlap_neighbors(histories: Dict[str, Sequence[str]], k: int, score: str = "overlap_ratio",
                      targets: Sequence[str] = None) -> Dict[str, List[Tuple[str, float, int]]]:
    """``N(u)`` of PtE Eq. 5: the ``k`` users with the highest ``s(u, u') = |V_u ∩ V_u'| / |V_u|``.

    ``histories``: training-visible items per user (duplicates count once). ``score``: ``overlap_ratio``
    (the paper's, asymmetric: normalised by the target's history) or ``jaccard``. Only users with overlap > 0;
    ties go to the longer history, then the user listed first (deterministic); ``u`` itself never. ``targets``:
    the users to compute neighbours for (default: all); a held-out user's visible prefix may be passed in
    ``histories`` as long as it is not also a candidate neighbour of others (callers exclude it).
    Returns ``{u: [(neighbour, score, shared items), ...]}`` best first. One sparse product ``X Xᵀ`` (spec §3.2).
    """
    if score not in ("overlap_ratio", "jaccard"):
        raise ConfigError(f"neighbour score '{score}': choose overlap_ratio or jaccard")
    users = list(histories)
    index = {u: i for i, u in enumerate(users)}
    items: Dict[str, int] = {}
    rows, cols = [], []
    for i, u in enumerate(users):
        for item in set(histories[u]):
            rows.append(i)
            cols.append(items.setdefault(item, len(items)))
    x = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(users), max(1, len(items))))
    sizes = np.asarray(x.sum(1)).ravel()
    targets = list(targets) if targets is not None else users
    t = x[[index[u] for u in targets]]
    shared = (t @ x.T).tocsr()  # [targets, users]: |V_u ∩ V_u'|
    out: Dict[str, List[Tuple[str, float, int]]] = {}
    for row, u in enumerate(targets):
        lo, hi = shared.indptr[row], shared.indptr[row + 1]
        cand, inter = shared.indices[lo:hi], shared.data[lo:hi]
        keep = (cand != index[u]) & (inter > 0)
        cand, inter = cand[keep], inter[keep]
        own = sizes[index[u]]
        s = inter / own if score == "overlap_ratio" else inter / (own + sizes[cand] - inter)
        order = np.lexsort((cand, -sizes[cand], -s))[:k]
        out[u] = [(users[c], float(s[j]), int(inter[j])) for j, c in zip(order, cand[order])]
    return out


def _words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


class ProfilesHook(PrepHook):
    """PtE's profile stage on the training split (``properties/hooks/pte_profiles.yaml``; spec PtE §3.2-§3.6)."""

    name = "pte_profiles"
    defaults_file = hook_defaults_file(name)
    uses_split = True
    runtime_params = ("auto_run", "batch_size")

    def outputs(self) -> List[str]:
        return [os.path.join(self.data_path, f"{self.dataset}.userprof.json"),
                os.path.join(self.data_path, f"{self.dataset}.itemprof.json")]

    @functools.cached_property
    def _item_file(self) -> str:
        return os.path.join(self.data_path, f"{self.dataset}.item")

    def fingerprint(self) -> dict:
        return {"params": self.shaping_params(),
                "item_file_sha256": sha256_file(self._item_file) if os.path.isfile(self._item_file) else None}

    # -- generation --------------------------------------------------------------------------------------
    @functools.cached_property
    def _llm(self):
        p = self.params
        return make_generator("hf", model=p["model"], gguf_file=p["gguf_file"], adapter=p["adapter"],
                              batch_size=p["batch_size"], progress=self._progress)

    def _generate(self, kind: str, requests: List[dict]) -> List[str]:
        """Texts of ``requests`` (prompt ``prompt_<kind>``; template backend: ``template_<kind>``), cached."""
        p = self.params
        for r in requests:
            r["prompt"] = p[f"prompt_{kind}"].format(domain=p["domain"], **r["prompt_fields"])
        generator = TemplateGenerator(p[f"template_{kind}"]) if p["backend"] == "template" else self._llm
        sampling = {"max_new_tokens": int(p["max_new_tokens"]), "temperature": float(p["temperature"])}
        result = cached_generate(generator, requests, sampling, self._cache)
        self._counts["generated"] += result["generated"]
        self._counts["cached"] += result["cached"]
        return result["texts"]

    def _change(self, old: Dict[str, str], new: Dict[str, str]) -> float:
        """Mean ``1 - cos`` between the encodings of each entity's previous and new profile (spec §3.6)."""
        keys = list(new)
        if not keys:
            return 0.0
        a = self._encoder.encode([old[k] for k in keys], normalize_embeddings=True, show_progress_bar=False)
        b = self._encoder.encode([new[k] for k in keys], normalize_embeddings=True, show_progress_bar=False)
        return float(np.mean(1.0 - (a * b).sum(1)))

    # -- the stage ---------------------------------------------------------------------------------------
    def run(self, progress: bool = True, **_) -> dict:
        from sentence_transformers import SentenceTransformer

        from recbole_llmfuse.llm import resolve_model_path

        p, start = self.params, time.perf_counter()
        if p["backend"] not in ("hf", "template"):
            raise PrepError(f"pte_profiles backend '{p['backend']}': hf or template")
        self._progress, self._counts = progress, {"generated": 0, "cached": 0}
        self._cache = self.cache("generations")
        self._encoder = SentenceTransformer(resolve_model_path(p["encoder"]), device="cpu")
        items = self._item_texts()
        hist = self.split.user_histories()  # training interactions only (the leakage boundary, spec §3.1)
        users = sorted(hist)
        neighbors = overlap_neighbors(hist, int(p["num_neighbors"]), p["neighbor_score"])
        user_p = dict(zip(users, self._generate("user", [self._user_request(u, hist, neighbors, items) for u in users])))
        item_users = self._item_users(hist)
        item_keys = list(items)
        item_p = dict(zip(item_keys, self._generate("item", [self._item_request(i, items, item_users, user_p)
                                                             for i in item_keys])))
        rounds = []
        for t in range(1, int(p["max_rounds"]) + 1):
            new_u = dict(zip(users, self._generate("user_refine", [self._refine_request(u, hist, items, item_p)
                                                                    for u in users])))
            new_i = dict(zip(item_keys, self._generate("item", [self._item_request(i, items, item_users, new_u)
                                                                 for i in item_keys])))
            d_u, d_i = self._change(user_p, new_u), self._change(item_p, new_i)
            rounds.append({"round": t, "user_change": d_u, "item_change": d_i})
            getLogger().info(f"pte_profiles round {t}: user change {d_u:.4f}, item change {d_i:.4f}")
            user_p, item_p = new_u, new_i
            if d_u < float(p["tol"]) and d_i < float(p["tol"]):
                break
        for path, table in zip(self.outputs(), (user_p, item_p)):
            atomic_write_text(path, json.dumps(table, ensure_ascii=False, indent=0))
        report = {"users": len(user_p), "items": len(item_p), "rounds": rounds, **self._counts,
                  "converged": bool(rounds) and rounds[-1]["user_change"] < float(p["tol"])
                  and rounds[-1]["item_change"] < float(p["tol"]), "seconds": time.perf_counter() - start}
        self.write_manifest({"report": report})
        return report

    def _item_texts(self) -> Dict[str, Tuple[str, str]]:
        """``{item token: (short name, description)}`` from the ``.item`` file (raw text)."""
        columns, rows = read_item_file(self._item_file)
        fields = list(self.params["item_text_fields"] or [c for c in columns if c != "item_id"])
        out = {}
        for row in rows:
            values = [(f, " ".join(row[f].split())) for f in fields]
            name = next((v for _, v in values if v), row["item_id"])
            out[row["item_id"]] = (name, "; ".join(f"{f.replace('_', ' ')}: {v}" for f, v in values if v) or name)
        return out

    def _item_users(self, hist: Dict[str, List[str]]) -> Dict[str, List[str]]:
        """``U(v)``, most recent training interactors first (by their position from the end of the split)."""
        seen: Dict[str, List[Tuple[int, str]]] = {}
        for u, seq in hist.items():
            for back, item in enumerate(reversed(seq)):
                seen.setdefault(item, []).append((back, u))
        return {i: [u for _, u in sorted(v)] for i, v in seen.items()}

    def _user_request(self, u, hist, neighbors, items) -> dict:
        p = self.params
        recent = hist[u][-int(p["history_items"]):]
        own = set(hist[u])
        lines, extra = [], []
        for j, (v, _, shared) in enumerate(neighbors[u], start=1):
            other = [i for i in hist[v] if i not in own][-int(p["neighbor_items"]):]
            extra += other
            lines.append(f"- Neighbour {j} (shares {shared} items); other items they chose: "
                         + ", ".join(items.get(i, (i, i))[0] for i in other))
        history = "\n".join(f"- {items.get(i, (i, i))[1]}" for i in recent)
        return {"prompt_fields": {"history": history, "neighbors": "\n".join(lines) or "- (none)"},
                "fields": {"recent": ", ".join(items.get(i, (i, i))[0] for i in recent[-5:]),
                           "neighbor_items": ", ".join(items.get(i, (i, i))[0] for i in extra[:5]) or "nothing"}}

    def _item_request(self, i, items, item_users, user_p) -> dict:
        p = self.params
        shown = [_words(user_p[u], int(p["profile_words"])) for u in item_users.get(i, [])[:int(p["users_per_item"])]]
        return {"prompt_fields": {"item": items[i][1], "profiles": "\n".join(f"- {s}" for s in shown) or "- (none yet)"},
                "fields": {"item": items[i][1], "profiles": " | ".join(_words(s, 12) for s in shown[:3]) or "nobody yet"}}

    def _refine_request(self, u, hist, items, item_p) -> dict:
        p = self.params
        recent = hist[u][-int(p["history_items"]):]
        words = int(p["item_profile_words"])
        lines = [f"- {items.get(i, (i, i))[0]}: {_words(item_p.get(i, ''), words)}" for i in recent]
        return {"prompt_fields": {"history": "\n".join(lines)},
                "fields": {"recent_profiles": " | ".join(_words(item_p.get(i, ""), 8) for i in recent[-3:])}}
