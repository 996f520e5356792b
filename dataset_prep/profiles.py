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

from recbole_llmfuse.dataset_prep import itememb
from recbole_llmfuse.dataset_prep.embed import ENCODER_KEYS, make_encoder
from recbole_llmfuse.dataset_prep.hooks import (
    PrepError,
    PrepHook,
    atomic_write_text,
    get_hook,
    hook_defaults_file,
    make_hook,
)
from recbole_llmfuse.dataset_prep.item_text import item_file_digest, read_item_file
from recbole_llmfuse.dataset_prep.pte_rewards import ProfileReward
from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.files import write_csv
from recbole_llmfuse.generation import TemplateGenerator, cached_generate, make_generator
from recbole_llmfuse.llm import adapter_digest, resolve_model_path


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


#: hooks whose adapter ``pte_profiles``' ``adapter`` may name (``dataset_prep.profiler_tuning``)
TUNING_HOOKS = ("profiler_sft", "profiler_grpo")
#: ``pte_profiles`` parameters of the reward (Eq. 9-11): they shape only scored profiles
REWARD_PARAMS = ("lambda_c", "lambda_d", "reward_items", "format_guard", "best_of_k_temperatures", "best_of_k_top_p",
                 "best_of_k_items")


def reward_encoder_params(config) -> dict:
    """``f_enc`` of spec PtE §4.1: the ``pte_embeddings`` hook's encoder settings (``backend`` and the encoder
    keys) for ``config`` — one encoder for the rewards and the features."""

    params = {**get_hook("pte_embeddings").default_params(), **((config["pte_embeddings"] if config else None) or {})}
    return {k: params[k] for k in ("backend", *ENCODER_KEYS) if k in params and k not in ("device", "batch_size")
            and params[k] is not None}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class _Encode:
    """A sentence-transformers model as ``encode(texts) -> [n, d]`` (normalised)."""

    def __init__(self, model):
        self.model = model

    def encode(self, texts: List[str]) -> np.ndarray:
        return self.model.encode(texts, normalize_embeddings=True, show_progress_bar=False)


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



def reward_summary(rows: list) -> dict:
    """``{kind: {entities, k, chosen_reward, candidate_reward, well_formed}}`` of reward-table rows
    ``[kind, entity, k, chosen, reward, collab, dist, well_formed, mean_reward]``."""
    summary = {}
    for kind in ("user", "item"):
        mine = [r for r in rows if r[0] == kind]
        if mine:
            summary[kind] = {"entities": len(mine), "k": mine[0][2],
                             "chosen_reward": float(np.mean([r[4] for r in mine])),
                             "candidate_reward": float(np.mean([r[8] for r in mine])),
                             "well_formed": float(np.mean([r[7] for r in mine]))}
    return summary

class ProfilesHook(PrepHook):
    """PtE's profile stage on the training split (``properties/hooks/pte_profiles.yaml``; spec PtE §3.2-§3.6)."""

    name = "pte_profiles"
    cli = "profiles"
    summary = "PtE's LLM-written user and item profiles -> <dataset>.userprof/itemprof.json"
    defaults_file = hook_defaults_file(name)
    uses_split = True
    runtime_params = ("auto_run", "batch_size", "concurrency", "timeout", "max_retries", "api_key_env", "reward_log")
    late_params = ("best_of_k", *REWARD_PARAMS)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        adapter = self.params["adapter"]
        # a tuning hook's name: its adapter, made first (chained fingerprint; a model run that lacks it stops with
        # the `prep sft` / `prep grpo` command)
        self.requires = (adapter,) if adapter in TUNING_HOOKS else ()
        if self.scored:  # bad K or reward settings fail at once, before any status check or generation
            self.check_reward_settings()

    def outputs(self) -> List[str]:
        """User profiles ``{user: text}``, item profiles ``{item: text}``, user snapshots ``{user: {L: text}}``
        (profiles of each user's first ``L`` items; empty when snapshots are off); with scored profiles
        (``best_of_k`` >= 2 or ``reward_log: true``) also the candidate log (JSON lines) and the reward table (CSV)."""
        stem = os.path.join(self.data_path, profile_stem(self.dataset, self.params["tag"]))
        scored = ("profilelog.jsonl", "rewards.csv") if self.scored else ()
        return [f"{stem}.{name}" for name in ("userprof.json", "itemprof.json", "usersnap.json", *scored)]

    @property
    def best_of_k(self) -> int:
        k = self.params["best_of_k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PrepError(f"pte_profiles best_of_k {k!r}: 1 (off) or the number K >= 2 of sampled candidates per "
                            f"entity (spec PtE §4.6), e.g. best_of_k=8")
        return k

    @property
    def scored(self) -> bool:
        log = self.params["reward_log"]
        if log not in ("auto", True, False):
            raise PrepError(f"pte_profiles reward_log {log!r}: auto (with best_of_k >= 2) | true | false")
        return self.best_of_k >= 2 if log == "auto" else bool(log)

    @functools.cached_property
    def adapter_path(self):
        """The adapter folder(s) of ``adapter`` (a tuning hook's name resolves to that hook's adapter)."""
        adapter = self.params["adapter"]
        if adapter in TUNING_HOOKS:
            return make_hook(adapter, self.config, self.data_path).adapter_dir
        return adapter

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

    def shaping_params(self) -> dict:
        out = super().shaping_params()
        if self.best_of_k == 1:  # the reward settings choose profiles only among K >= 2 candidates
            out = {k: v for k, v in out.items() if k not in REWARD_PARAMS}
        return out

    def fingerprint(self) -> dict:
        out = {"params": self.shaping_params(),
               "item_file_sha256": item_file_digest(self._item_file)}
        if self.adapter_path and self.params["adapter"] not in TUNING_HOOKS:  # a hook's adapter: its digest chains

            try:
                out["adapter_sha256"] = adapter_digest(self.adapter_path)
            except FileNotFoundError as err:
                raise PrepError(f"pte_profiles adapter: {err}; give the folder PEFT's save_pretrained wrote, or "
                                f"adapter=profiler_sft / adapter=profiler_grpo for this dataset's tuned profiler") from None
        if self.best_of_k > 1:
            out["reward_encoder"] = reward_encoder_params(self.config)
        return out

    # -- generation --------------------------------------------------------------------------------------
    @functools.cached_property
    def _llm(self):
        p = self.params
        keys = {"hf": ("model", "gguf_file", "adapter", "batch_size"),
                "openai": ("model", "base_url", "extra_body", "api_key_env", "concurrency", "timeout", "max_retries")}[p["backend"]]
        return make_generator(p["backend"], progress=self._progress,
                              **{k: self.adapter_path if k == "adapter" else p[k] for k in keys})

    def prompt(self, kind: str, request: dict) -> str:
        """The text of prompt ``prompt_<kind>`` for ``request``."""
        return self.params[f"prompt_{kind}"].format(domain=self.params["domain"], **request["prompt_fields"])

    def _generate(self, kind: str, requests: List[dict], sampling: dict = None) -> List[str]:
        """Texts of ``requests`` (prompt ``prompt_<kind>``; template backend: ``template_<kind>``), cached;
        ``sampling``: other than the profile loop's greedy settings (best-of-K candidates)."""
        p = self.params
        for r in requests:
            r["prompt"] = self.prompt(kind, r)
        generator = TemplateGenerator(p[f"template_{kind}"]) if p["backend"] == "template" else self._llm
        sampling = sampling or {"max_new_tokens": int(p["max_new_tokens"]), "temperature": float(p["temperature"]),
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

    def _encode(self, texts: List[str], reward: bool = False) -> np.ndarray:
        """L2-normalised encodings ``[n, d]``, each text encoded once and kept in the record cache (a cached
        rerun of the whole step then encodes nothing and never loads the encoder). ``reward``: with ``f_enc``, the
        ``pte_embeddings`` encoder (rewards, spec §4.1); else with ``encoder`` (the change between rounds)."""
        spec = reward_encoder_params(self.config) if reward else self.params["encoder"]
        keys = [self._vectors.key(spec, t) for t in texts]
        found = self._vectors.get_many(keys)
        todo = sorted({k: i for i, k in enumerate(keys) if k not in found}.values())
        if todo:
            vecs = self._encoder_for(reward).encode([texts[i] for i in todo])
            fresh = {keys[i]: np.asarray(v, np.float32).tolist() for i, v in zip(todo, vecs)}
            self._vectors.put_many(fresh)
            found.update(fresh)
        return _unit(np.asarray([found[k] for k in keys], dtype=np.float32))

    def _encoder_for(self, reward: bool):
        """``encode(texts) -> [n, d]`` of one of the two encoders (see :meth:`_encode`), loaded once."""
        if reward not in self._encoders:
            if reward:
                self._encoders[reward] = make_encoder(reward_encoder_params(self.config))
            else:
                from sentence_transformers import SentenceTransformer


                model = SentenceTransformer(resolve_model_path(self.params["encoder"]), device="cpu")
                self._encoders[reward] = _Encode(model)
        return self._encoders[reward]

    # -- the stage ---------------------------------------------------------------------------------------
    def setup(self, progress: bool = True) -> None:
        """Caches, item texts, the training histories and the overlap neighbours (what every step reads)."""
        p = self.params
        if p["backend"] not in ("hf", "openai", "template"):
            raise PrepError(f"pte_profiles backend '{p['backend']}': hf, openai or template")
        self._progress, self._counts = progress, {"generated": 0, "cached": 0}
        if p["backend"] == "openai":
            self._llm.check_reachable()  # a server that is not there fails before anything is written
        self._cache = self.cache("generations")
        self._vectors, self._encoders = self.cache("encodings"), {}
        self.items = self._item_texts()
        self.hist = self.split.user_histories()  # training interactions only (the leakage boundary, spec §3.1)
        self.neighbors = overlap_neighbors(self.hist, int(p["num_neighbors"]), p["neighbor_score"])
        self.item_users = self._item_users(self.hist)

    def run(self, progress: bool = True, **_) -> dict:
        p, start = self.params, time.perf_counter()
        self.setup(progress)
        items, hist, neighbors, item_users = self.items, self.hist, self.neighbors, self.item_users
        users = sorted(hist)
        user_p = dict(zip(users, self._generate("user", [self._user_request(hist[u], neighbors[u], hist, items)
                                                               for u in users])))
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
        scores = self._best_of_k(user_p, item_p) if self.scored else None
        if scores:
            user_p, item_p = scores["profiles"]["user"], scores["profiles"]["item"]
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
        if scores:
            report["rewards"] = scores["summary"]
        self.write_manifest({"report": report})
        return report

    # -- rewards and best-of-K (spec §4.3, §4.6) ---------------------------------------------------------
    def final_requests(self, kind: str, user_p: Dict[str, str], item_p: Dict[str, str]) -> Tuple[str, Dict[str, dict]]:
        """``(prompt kind, {entity: request})`` of the prompts the final profiles of ``kind`` come from: users'
        refinement prompt (history + item profiles ``p_v*``; the Eq.-6 prompt when there are no rounds or item
        profiles), items' Eq.-7 prompt on the final user profiles. GRPO trains on these (spec §4.2)."""
        if kind == "user":
            if item_p and int(self.params["max_rounds"]) > 0:
                return "user_refine", {u: self._refine_request(u, self.hist, self.items, item_p) for u in user_p}
            return "user", {u: self._user_request(self.hist[u], self.neighbors.get(u, []), self.hist, self.items)
                            for u in user_p}
        return "item", {i: self._item_request(i, self.items, self.item_users, user_p) for i in item_p}

    def check_reward_settings(self) -> None:
        """The reward settings are usable (checked before any generation)."""
        p = self.params
        if p["reward_items"] not in ("profile", "metadata", "both"):
            raise PrepError(f"pte_profiles reward_items '{p['reward_items']}': profile | metadata | both")
        for key in ("lambda_c", "lambda_d"):
            if isinstance(p[key], bool) or not isinstance(p[key], (int, float)):
                raise PrepError(f"pte_profiles {key} {p[key]!r} is not a number: give the reward weight, e.g. "
                                f"{key}=0.5 (spec PtE Eq. 9; 0 = the ablation without that term)")
        if p["format_guard"] not in ("fields", "words", "off"):
            raise PrepError(f"pte_profiles format_guard '{p['format_guard']}': fields | words | off")

    def reward_model(self, kind: str, user_p: Dict[str, str], item_p: Dict[str, str]):
        """Eq. 9-11 for ``kind`` with ``f_enc`` (the ``pte_embeddings`` encoder): users against their last 50
        training items (item profile ``p_v*``, else the item's text; ``reward_items``) and their overlap
        neighbours' profiles; items against their users' profiles (metadata-only items: their own text) and the
        items sharing most of their users (spec §4.5)."""
        p = self.params
        self.check_reward_settings()
        guard = {"fields": lambda t: well_formed(t, kind), "words": lambda t: len(t.split()) >= 10,
                 "off": None}[p["format_guard"]]

        def item_vecs(keys: List[str]) -> np.ndarray:
            meta = self._encode([self.items.get(i, (i, i))[1] for i in keys], reward=True)
            if p["reward_items"] == "metadata" or not item_p:
                return meta
            prof = self._encode([item_p.get(i) or self.items.get(i, (i, i))[1] for i in keys], reward=True)
            return prof if p["reward_items"] == "profile" else _unit(prof + meta)

        if kind == "user":
            keys = sorted(user_p)
            recent = {u: self.hist[u][-50:] for u in keys}
            vocab = sorted({i for seq in recent.values() for i in seq})
            row = {i: n for n, i in enumerate(vocab)}
            table = item_vecs(vocab) if vocab else np.zeros((0, 1), np.float32)
            targets = {u: table[[row[i] for i in recent[u]]] for u in keys}
            neighbors = {u: [w for w, _, _ in self.neighbors.get(u, [])] for u in keys}
            own = dict(zip(keys, self._encode([user_p[u] for u in keys], reward=True)))
        else:
            keys = sorted(item_p)
            users = sorted(user_p)
            uvec = dict(zip(users, self._encode([user_p[u] for u in users], reward=True)))
            meta = dict(zip(keys, self._encode([self.items[i][1] for i in keys], reward=True)))
            targets = {i: np.stack([uvec[u] for u in self.item_users[i] if u in uvec])
                       if any(u in uvec for u in self.item_users.get(i, [])) else meta[i][None] for i in keys}
            near = overlap_neighbors({i: self.item_users.get(i, []) for i in keys}, 10)
            neighbors = {i: [w for w, _, _ in near[i]] for i in keys}
            own = dict(zip(keys, self._encode([item_p[i] for i in keys], reward=True)))
        return ProfileReward(lambda texts: self._encode(texts, reward=True), targets, neighbors, own,
                             float(p["lambda_c"]), float(p["lambda_d"]), guard)

    def _best_of_k(self, user_p: Dict[str, str], item_p: Dict[str, str]) -> dict:
        """Spec §4.6: for every user (and item), ``best_of_k`` candidates sampled from the final prompts
        (candidate ``j``: temperature ``best_of_k_temperatures[j % T]``, seed ``seed + j``), scored with
        Eq. 9-11; the top-reward one becomes the profile. ``best_of_k: 1`` scores the loop's profiles as they
        are (``reward_log: true``: the rewards of untuned profiles, for comparisons). Writes the candidate log
        (chosen text, every candidate's text, rewards and sampling) and the per-entity reward table."""
        p, k = self.params, self.best_of_k
        temps = [float(t) for t in (p["best_of_k_temperatures"] or [p["temperature"]])]
        profiles = {"user": dict(user_p), "item": dict(item_p)}
        log, rows = [], []
        for kind in ("user", "item"):
            if not profiles[kind]:
                continue
            # best_of_k_items false: items keep the loop's profile (still scored)
            k_kind = k if kind == "user" or p["best_of_k_items"] else 1
            rewarder = self.reward_model(kind, user_p, item_p)
            prompt_kind, requests = self.final_requests(kind, user_p, item_p)
            keys = sorted(requests)
            cands: List[List[Tuple[str, dict]]] = [[] for _ in keys]
            if k_kind == 1:
                for n, key in enumerate(keys):
                    cands[n].append((profiles[kind][key], {"temperature": float(p["temperature"]), "seed": int(p["seed"])}))
            else:
                for j in range(k_kind):
                    sampling = {"max_new_tokens": int(p["max_new_tokens"]), "temperature": temps[j % len(temps)],
                                "top_p": float(p["best_of_k_top_p"]), "seed": int(p["seed"]) + j}
                    texts = self._generate(prompt_kind, [dict(requests[key]) for key in keys], sampling)
                    for n, text in enumerate(texts):
                        cands[n].append((text, {"temperature": sampling["temperature"], "seed": sampling["seed"]}))
            flat = [(key, text) for key, group in zip(keys, cands) for text, _ in group]
            scored = rewarder.score([f for f, _ in flat], [t for _, t in flat])
            for n, key in enumerate(keys):
                group = scored[n * k_kind:(n + 1) * k_kind]
                best = int(np.argmax([s["reward"] for s in group]))  # ties: the first candidate
                profiles[kind][key] = cands[n][best][0]
                log.append({"kind": kind, "entity": key, "chosen": best, "text": cands[n][best][0],
                            "candidates": [{"text": t, **samp, **{c: s[c] for c in ("reward", "collab", "dist",
                                                                                     "well_formed")}}
                                           for (t, samp), s in zip(cands[n], group)]})
                rows.append([kind, key, k_kind, best, *(group[best][c] for c in ("reward", "collab", "dist")),
                             group[best]["well_formed"], float(np.mean([s["reward"] for s in group]))])
        log_path, csv_path = self.outputs()[3:5]
        atomic_write_text(log_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in log))
        columns = ["kind", "entity", "k", "chosen", "reward", "collab", "dist", "well_formed", "mean_reward"]
        write_csv(csv_path, [dict(zip(columns, r)) for r in rows], columns)
        return {"profiles": profiles, "summary": reward_summary(rows)}

    def rewards(self) -> dict:
        """Per kind, the mean reward of the chosen profiles and of all candidates, from the reward table of a
        made (scored) profile set: the figures a report gives, also when the set was made by an earlier run."""
        import csv

        with open(self.outputs()[4], newline="") as f:
            rows = [[r["kind"], r["entity"], int(r["k"]), int(r["chosen"]), float(r["reward"]), float(r["collab"]),
                     float(r["dist"]), r["well_formed"] == "True", float(r["mean_reward"])] for r in csv.DictReader(f)]
        return reward_summary(rows)

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
    :func:`recbole_llmfuse.model.pte.snapshot_slot`). Encoders are the item_text_embedding hook's backends (one ``f_enc`` for everything,
    spec §4.1); the fingerprint chains to ``pte_profiles``, so new profiles mean new vectors."""

    name = "pte_embeddings"
    requires = ("pte_profiles",)
    defaults_file = hook_defaults_file(name)
    runtime_params = ("auto_run", "batch_size", "device")

    @functools.cached_property
    def _profiles(self) -> PrepHook:
        return make_hook("pte_profiles", self.config, self.data_path)

    def outputs(self) -> List[str]:
        stem = profile_stem(self.dataset, self._profiles.params["tag"])  # vectors of tagged profiles: tagged too
        return [os.path.join(self.data_path, f"{stem}.{name}.npz") for name in ("pteitem", "pteuser")]

    def table_files(self, output: str = ""):
        if output not in ("item", "user"):
            raise PrepError(f"pte_embeddings writes the tables 'item' and 'user', not {output!r}")
        return self.outputs()[output == "user"], None

    def run(self, progress: bool = True, **_) -> dict:

        start = time.perf_counter()
        user_path, item_path, snap_path = self._profiles.outputs()[:3]
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
