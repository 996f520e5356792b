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
                      targets: Sequence[str] = None,
                      queries: Dict[str, Tuple[str, Sequence[str]]] = None) -> Dict[str, List[Tuple[str, float, int]]]:
    """``N(u)`` of PtE Eq. 5: the ``k`` users with the highest ``s(u, u') = |V_u ∩ V_u'| / |V_u|``.

    ``histories``: training-visible items per candidate user (duplicates count once). ``score``:
    ``overlap_ratio`` (the paper's, asymmetric: normalised by the target's history) or ``jaccard``. Only users
    with overlap > 0; ties go to the longer history, then the user listed first (deterministic); ``u`` itself
    never. ``targets``: the users of ``histories`` to compute neighbours for (default: all). ``queries``:
    instead, ``{key: (owner, items)}`` — e.g. a held-out user's visible prefix — scored against the users of
    ``histories`` except ``owner``. Returns ``{u or key: [(neighbour, score, shared items), ...]}`` best first.
    One sparse product ``Q Xᵀ`` (spec §3.2).
    """
    if score not in ("overlap_ratio", "jaccard"):
        raise ConfigError(f"neighbour score '{score}': choose overlap_ratio or jaccard")
    users = list(histories)
    index = {u: i for i, u in enumerate(users)}
    items: Dict[str, int] = {}

    def matrix(seqs: List[Sequence[str]], grow: bool) -> sp.csr_matrix:
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            for item in set(seq):
                col = items.setdefault(item, len(items)) if grow else items.get(item)
                if col is not None:
                    rows.append(i)
                    cols.append(col)
        return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(seqs), max(1, len(items))))

    x = matrix([histories[u] for u in users], grow=True)
    sizes = np.asarray(x.sum(1)).ravel()
    if queries is None:
        targets = list(targets) if targets is not None else users
        queries = {u: (u, histories[u]) for u in targets}
    keys = list(queries)
    q = matrix([queries[key][1] for key in keys], grow=False)
    shared = (q @ x.T).tocsr()  # [queries, users]: |V_u ∩ V_u'|
    out: Dict[str, List[Tuple[str, float, int]]] = {}
    for row, key in enumerate(keys):
        owner, seq = queries[key]
        lo, hi = shared.indptr[row], shared.indptr[row + 1]
        cand, inter = shared.indices[lo:hi], shared.data[lo:hi]
        keep = (cand != index.get(owner, -1)) & (inter > 0)
        cand, inter = cand[keep], inter[keep]
        own = max(1, len(set(seq)))
        s = inter / own if score == "overlap_ratio" else inter / (own + sizes[cand] - inter)
        order = np.lexsort((cand, -sizes[cand], -s))[:k]
        out[key] = [(users[c], float(s[j]), int(inter[j])) for j, c in zip(order, cand[order])]
    return out


def snapshot_lengths(n: int) -> List[int]:
    """Prefix lengths that get a user-profile snapshot for a sequence of ``n`` items: 1, 2, 4, ... < n (each
    an input of some prediction; spec §5.1.1). ``n <= 1``: none."""
    out, L = [], 1
    while L < n:
        out.append(L)
        L *= 2
    return out


def snapshot_slot(prefix_length, slots: int):
    """Snapshot slot an instance with ``prefix_length`` history items reads: the largest power of two
    ``<= prefix_length`` (slot ``floor(log2 n)``), capped at ``slots - 1`` (a table with one slot: always 0)."""
    import torch

    n = torch.as_tensor(prefix_length).clamp(min=1).float()
    return torch.floor(torch.log2(n)).long().clamp(max=slots - 1)


def profile_stem(dataset: str, tag) -> str:
    """``<dataset>`` or ``<dataset>.<tag>``: profile sets of different generators live side by side."""
    return f"{dataset}.{tag}" if tag else dataset


#: the fields each profile prompt asks for (spec §3.3, §3.5); a profile missing them is flagged
PROFILE_FIELDS = {"user": ("identity:", "interests:"), "item": ("what it is:", "appeals to:")}


def well_formed(text: str, kind: str) -> bool:
    """Spec §3.3's format rule: the asked-for fields are there and the profile has at least 10 words."""
    low = text.lower()
    return len(text.split()) >= 10 and all(f in low for f in PROFILE_FIELDS[kind])


def _words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


class ProfilesHook(PrepHook):
    """PtE's profile stage on the training split (``properties/hooks/pte_profiles.yaml``; spec PtE §3.2-§3.6)."""

    name = "pte_profiles"
    cli = "profiles"
    defaults_file = hook_defaults_file(name)
    uses_split = True
    runtime_params = ("auto_run", "batch_size", "concurrency", "timeout", "max_retries", "api_key_env")

    def outputs(self) -> List[str]:
        """User profiles ``{user: text}``, item profiles ``{item: text}``, user snapshots ``{user: {L: text}}``
        (profiles of each user's first ``L`` items; empty when snapshots are off)."""
        return [os.path.join(self.data_path, f"{profile_stem(self.dataset, self.params['tag'])}.{name}.json")
                for name in ("userprof", "itemprof", "usersnap")]

    def auto_runs(self) -> bool:
        """``auto_run: auto``: only the template backend (seconds), never an LLM (hours at scale)."""
        value = self.params["auto_run"]
        return self.params["backend"] == "template" if value == "auto" else bool(value)

    @property
    def snapshots_on(self) -> bool:
        wanted = self.params["snapshots"]
        if wanted not in ("auto", True, False):
            raise PrepError(f"pte_profiles snapshots '{wanted}': auto | true | false")
        return self.config["eval_protocol"] == "cold_start_user" if wanted == "auto" else bool(wanted)

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
        keys = {"hf": ("model", "gguf_file", "adapter", "batch_size"),
                "openai": ("model", "base_url", "api_key_env", "concurrency", "timeout", "max_retries")}[p["backend"]]
        return make_generator(p["backend"], progress=self._progress, **{k: p[k] for k in keys})

    def _generate(self, kind: str, requests: List[dict]) -> List[str]:
        """Texts of ``requests`` (prompt ``prompt_<kind>``; template backend: ``template_<kind>``), cached."""
        p = self.params
        for r in requests:
            r["prompt"] = p[f"prompt_{kind}"].format(domain=p["domain"], **r["prompt_fields"])
        generator = TemplateGenerator(p[f"template_{kind}"]) if p["backend"] == "template" else self._llm
        sampling = {"max_new_tokens": int(p["max_new_tokens"]), "temperature": float(p["temperature"]),
                    "seed": int(p["seed"])}
        result = cached_generate(generator, requests, sampling, self._cache)
        self._counts["generated"] += result["generated"]
        self._counts["cached"] += result["cached"]
        return result["texts"]

    def _change(self, old: Dict[str, str], new: Dict[str, str]) -> float:
        """Mean ``1 - cos`` between the encodings of each entity's previous and new profile (spec §3.6)."""
        keys = list(new)
        if not keys:
            return 0.0
        a, b = self._encode([old[k] for k in keys]), self._encode([new[k] for k in keys])
        return float(np.mean(1.0 - (a * b).sum(1)))

    def _encode(self, texts: List[str]) -> np.ndarray:
        """L2-normalised encodings ``[n, d]``, each text encoded once and kept in the record cache (a cached
        rerun of the whole step then encodes nothing and never loads the encoder)."""
        keys = [self._vectors.key(self.params["encoder"], t) for t in texts]
        found = self._vectors.get_many(keys)
        todo = sorted({k: i for i, k in enumerate(keys) if k not in found}.values())
        if todo:
            if self._encoder is None:
                from sentence_transformers import SentenceTransformer

                from recbole_llmfuse.llm import resolve_model_path

                self._encoder = SentenceTransformer(resolve_model_path(self.params["encoder"]), device="cpu")
            vecs = self._encoder.encode([texts[i] for i in todo], normalize_embeddings=True, show_progress_bar=False)
            fresh = {keys[i]: v.astype(np.float32).tolist() for i, v in zip(todo, vecs)}
            self._vectors.put_many(fresh)
            found.update(fresh)
        return np.asarray([found[k] for k in keys], dtype=np.float32)

    # -- the stage ---------------------------------------------------------------------------------------
    def run(self, progress: bool = True, **_) -> dict:
        p, start = self.params, time.perf_counter()
        if p["backend"] not in ("hf", "openai", "template"):
            raise PrepError(f"pte_profiles backend '{p['backend']}': hf, openai or template")
        self._progress, self._counts = progress, {"generated": 0, "cached": 0}
        self._cache = self.cache("generations")
        self._vectors, self._encoder = self.cache("encodings"), None
        items = self._item_texts()
        hist = self.split.user_histories()  # training interactions only (the leakage boundary, spec §3.1)
        users = sorted(hist)
        neighbors = overlap_neighbors(hist, int(p["num_neighbors"]), p["neighbor_score"])
        user_p = dict(zip(users, self._generate("user", [self._user_request(hist[u], neighbors[u], hist, items)
                                                               for u in users])))
        item_users = self._item_users(hist)
        item_keys = list(items) if p["item_profiles"] else []  # false: "User-only Profiling" (spec §11)
        item_p = dict(zip(item_keys, self._generate("item", [self._item_request(i, items, item_users, user_p)
                                                             for i in item_keys])))
        rounds = []
        for t in range(1, int(p["max_rounds"]) + 1 if item_keys else 1):  # rounds need item profiles
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
        snaps = self._snapshots(hist, items) if self.snapshots_on else {}
        malformed = {}
        if p["backend"] != "template":  # flagged, kept as written (spec §3.3; no sampled retry here)
            malformed = {"users": sorted(u for u, t in user_p.items() if not well_formed(t, "user")),
                         "items": sorted(i for i, t in item_p.items() if not well_formed(t, "item"))}
            if malformed["users"] or malformed["items"]:
                getLogger().warning(f"pte_profiles: {len(malformed['users'])} of {len(user_p)} user and "
                                    f"{len(malformed['items'])} of {len(item_p)} item profiles lack the asked-for "
                                    f"fields or 10 words (kept as written; listed in the manifest)")
        for path, table in zip(self.outputs(), (user_p, item_p, snaps)):
            atomic_write_text(path, json.dumps(table, ensure_ascii=False, indent=0))
        report = {"users": len(user_p), "items": len(item_p), "rounds": rounds, **self._counts,
                  "snapshots": sum(len(v) for v in snaps.values()),
                  "malformed": {k: len(v) for k, v in malformed.items()}, "malformed_ids": malformed,
                  "converged": bool(rounds) and rounds[-1]["user_change"] < float(p["tol"])
                  and rounds[-1]["item_change"] < float(p["tol"]), "seconds": time.perf_counter() - start}
        self.write_manifest({"report": report})
        return report

    def _snapshots(self, hist: Dict[str, List[str]], items) -> Dict[str, Dict[str, str]]:
        """Leakage-safe user profiles of prefixes (spec §5.1.1): for each user and each ``L`` of
        :func:`snapshot_lengths`, the Eq.-6 prompt on the first ``L`` items, neighbours from that prefix among
        the training users (never the user itself). Held-out users (cold-start protocol) always; training users
        too unless ``snapshot_train_users: full_sequence`` (then they read their full profile)."""
        seqs = dict(self.split.heldout_histories())
        if self.params["snapshot_train_users"] == "snapshots":
            seqs.update(hist)
        elif self.params["snapshot_train_users"] != "full_sequence":
            raise PrepError(f"pte_profiles snapshot_train_users '{self.params['snapshot_train_users']}': "
                            f"snapshots | full_sequence")
        queries = {f"{u}@{L}": (u, seq[:L]) for u, seq in seqs.items() for L in snapshot_lengths(len(seq))}
        neighbors = overlap_neighbors(hist, int(self.params["num_neighbors"]), self.params["neighbor_score"],
                                      queries=queries)
        requests = [self._user_request(seq, neighbors[key], hist, items) for key, (_, seq) in queries.items()]
        out: Dict[str, Dict[str, str]] = {}
        for key, text in zip(queries, self._generate("user", requests)):
            user, L = key.rsplit("@", 1)
            out.setdefault(user, {})[L] = text
        return out

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

    def _user_request(self, seq, neighbors, hist, items) -> dict:
        """Eq.-6 prompt for a user whose visible items are ``seq`` and whose neighbours are ``neighbors``."""
        p = self.params
        recent = seq[-int(p["history_items"]):]
        own = set(seq)
        lines, extra = [], []
        for j, (v, _, shared) in enumerate(neighbors, start=1):
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


class ProfileEmbeddingHook(PrepHook):
    """PtE's profiles -> vectors (spec PtE §4.1, §4.6 without best-of-K): ``<dataset>.pteitem.npz`` (item
    profiles, ``[n, d]``) and ``<dataset>.pteuser.npz`` (users, ``[n, S, d]``: slot ``s`` holds the profile of
    the user's first ``2**s`` items when snapshots exist, else every slot the full profile; models read slot
    :func:`snapshot_slot`). Encoders are the item_text_embedding hook's backends (one ``f_enc`` for everything,
    spec §4.1); the fingerprint chains to ``pte_profiles``, so new profiles mean new vectors."""

    name = "pte_embeddings"
    requires = ("pte_profiles",)
    defaults_file = hook_defaults_file(name)
    runtime_params = ("auto_run", "batch_size", "device")

    @functools.cached_property
    def _profiles(self) -> PrepHook:
        from recbole_llmfuse.dataset_prep.hooks import make_hook

        return make_hook("pte_profiles", self.config, self.data_path)

    def outputs(self) -> List[str]:
        stem = profile_stem(self.dataset, self._profiles.params["tag"])  # vectors of tagged profiles: tagged too
        return [os.path.join(self.data_path, f"{stem}.{name}.npz") for name in ("pteitem", "pteuser")]

    def table_files(self, output: str = ""):
        if output not in ("item", "user"):
            raise PrepError(f"pte_embeddings writes the tables 'item' and 'user', not {output!r}")
        return self.outputs()[output == "user"], None

    def run(self, progress: bool = True, **_) -> dict:
        from recbole_llmfuse.dataset_prep import itememb
        from recbole_llmfuse.dataset_prep.embed import make_encoder

        start = time.perf_counter()
        user_path, item_path, snap_path = self._profiles.outputs()
        tables = []
        for path in (user_path, item_path, snap_path):
            try:
                with open(path, encoding="utf-8") as f:
                    tables.append(json.load(f))
            except (OSError, ValueError) as err:
                raise PrepError(f"{path}: cannot read the profiles ({err}); run `recbole-llmfuse prep hook "
                                f"pte_profiles --dataset {self.dataset}`") from None
        users, items, snaps = tables
        slots = max([len(v) for v in snaps.values()] + [1])
        texts = sorted({*items.values(), *users.values(), *(t for v in snaps.values() for t in v.values())})
        encoder = make_encoder(self.params)
        index = {t: i for i, t in enumerate(texts)}
        vectors = np.concatenate([encoder.encode(texts[b:b + 4096]) for b in range(0, len(texts), 4096)]) \
            if texts else np.zeros((0, 1), np.float32)
        item_keys = list(items)
        itememb.write_table(self.outputs()[0], item_keys, vectors[[index[items[i]] for i in item_keys]])
        user_keys = sorted({*users, *snaps})
        table = np.zeros((len(user_keys), slots, vectors.shape[1]), dtype=np.float32)
        for row, u in enumerate(user_keys):
            own = snaps.get(u, {})
            if own:  # slot s = snapshot of length 2**s; later slots repeat the longest snapshot
                lengths = sorted(own, key=int)
                for s in range(slots):
                    table[row, s] = vectors[index[own[lengths[min(s, len(lengths) - 1)]]]]
            else:
                table[row, :] = vectors[index[users[u]]]
        itememb.write_table(self.outputs()[1], user_keys, table, kind="user")
        seconds = time.perf_counter() - start
        report = {"items": len(item_keys), "users": len(user_keys), "slots": slots, "texts": len(texts),
                  "dim": int(vectors.shape[1]), "seconds": seconds, "texts_per_s": len(texts) / max(seconds, 1e-9)}
        self.write_manifest({"report": report})
        return report
