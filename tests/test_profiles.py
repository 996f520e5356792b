"""PtE's profile-stage building blocks: the collaborative neighbourhood (Eq. 5) and cached generation."""
from __future__ import annotations

import pytest

from recbole_llmfuse.dataset_prep.hooks import RecordCache
from recbole_llmfuse.dataset_prep.profiles import overlap_neighbors
from recbole_llmfuse.generation import TemplateGenerator, cached_generate, make_generator

HISTORIES = {"A": ["1", "2", "3", "4"], "B": ["1", "2"], "C": ["1", "2", "3", "4", "5", "6"], "D": ["9"],
             "E": ["3", "4", "4"]}


def test_overlap_ratio_neighbourhood_by_hand():
    n = overlap_neighbors(HISTORIES, k=3)
    # s(A, .) = |V_A ∩ V_.| / |V_A|: C 4/4, B 2/4, E 2/4 (tie: equal history sizes -> listed first), D no overlap
    assert n["A"] == [("C", 1.0, 4), ("B", 0.5, 2), ("E", 0.5, 2)]
    # asymmetric: s(B, A) = 2/2 = 1 while s(A, B) = 0.5; the tie A/C goes to the longer history (C)
    assert n["B"] == [("C", 1.0, 2), ("A", 1.0, 2)]
    assert n["D"] == [] and "D" not in [u for u, _, _ in n["A"]]
    assert overlap_neighbors(HISTORIES, k=1)["A"] == [("C", 1.0, 4)]
    jac = overlap_neighbors(HISTORIES, k=3, score="jaccard")["A"]
    assert [u for u, _, _ in jac] == ["C", "B", "E"] and jac[0][1] == pytest.approx(4 / 6)
    assert overlap_neighbors(HISTORIES, k=5, targets=["E"]) == {"E": [("C", 1.0, 2), ("A", 1.0, 2)]}  # longer first


class Flaky(TemplateGenerator):
    """Killed after its first chunk."""

    def __init__(self, template):
        super().__init__(template)
        self.calls = 0

    def generate(self, requests, sampling):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().generate(requests, sampling)


def test_cached_generation_resumes_and_reruns_nothing(tmp_path):
    requests = [{"prompt": f"profile of user {u}", "fields": {"user": u, "genres": "Drama"}} for u in range(10)]
    cache = RecordCache(str(tmp_path / "profiles.sqlite"))
    sampling = {"temperature": 0.0, "max_new_tokens": 64}
    flaky = Flaky("User {user} likes {genres}.")
    with pytest.raises(KeyboardInterrupt):
        cached_generate(flaky, requests, sampling, cache, chunk=4)
    assert len(cache) == 4  # the first chunk was committed before the kill
    generator = make_generator("template", template="User {user} likes {genres}.")
    first = cached_generate(generator, requests, sampling, cache, chunk=4)
    assert (first["generated"], first["cached"]) == (6, 4)
    assert first["texts"][7] == "User 7 likes Drama."
    again = cached_generate(generator, requests, sampling, cache, chunk=4)
    assert (again["generated"], again["cached"]) == (0, 10) and again["texts"] == first["texts"]
    other = cached_generate(generator, requests, {**sampling, "temperature": 0.7}, cache, chunk=4)
    assert other["generated"] == 10  # other sampling settings are other records


def test_hf_backend_equals_plain_generate(tmp_path):
    """The `hf` backend on a tiny random Llama gives exactly what a plain batched `model.generate` gives."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import tiny_causal_llama

    path = tiny_causal_llama(tmp_path / "tiny")
    prompts = ["user likes comedy and drama", "a short one", "items toy story heat casino and more words here"]
    backend = make_generator("hf", model=path, batch_size=8, chat_template=False, progress=False, device="cpu")
    texts = backend.generate([{"prompt": p, "fields": {}} for p in prompts], {"max_new_tokens": 6})
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    order = sorted(range(3), key=lambda i: -len(prompts[i]))
    enc = tok([prompts[i] for i in order], return_tensors="pt", padding=True)
    enc.pop("token_type_ids")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = {i: tok.decode(g[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for i, g in zip(order, gen)}
    assert texts == [plain[i] for i in range(3)] and all(texts)


def _profiles(root, **params):
    from recbole_llmfuse import Config
    from recbole_llmfuse.dataset_prep import hooks

    from conftest import TINY

    base = {"backend": "template", "template_item": "{item}", "template_user_refine": "A viewer.", "max_rounds": 5}
    config = Config("FastSASRec", TINY, config_dict={"data_path": root, "pte_profiles": {**base, **params},
                                                     "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
                                                     "state": "WARNING"}, argv=[])
    return hooks.make_hook("pte_profiles", config)


def test_profile_rounds_stop_on_convergence_and_on_the_cap(tmp_path):
    import json

    from conftest import write_tiny_dataset

    root = write_tiny_dataset(str(tmp_path / "d"))
    hook = _profiles(root)
    report = hook.produce(progress=False)
    # round 1 rewrites every user ("A viewer."), round 2 changes nothing: converged before max_rounds = 5
    assert [r["round"] for r in report["rounds"]] == [1, 2] and report["converged"]
    assert report["rounds"][0]["user_change"] > 0.05 and report["rounds"][1]["user_change"] < 0.05
    users = json.load(open(hook.outputs()[0]))
    split = hook.split.user_histories()
    assert set(users) == set(split) and set(users.values()) == {"A viewer."}
    items = json.load(open(hook.outputs()[1]))
    assert items[next(iter(items))].startswith("title: widget ")
    # every record is cached: a forced rerun generates nothing
    again = hook.produce(force=True, progress=False)
    assert again["generated"] == 0 and again["cached"] == report["generated"] + report["cached"]
    # profiles that keep changing stop at the cap
    capped = _profiles(root, template_user_refine="Chose: {recent_profiles}",
                       template_item="{item}. Chosen by users who: {profiles}", max_rounds=3, tol=-1.0)
    out = capped.produce(force=True, progress=False)
    assert len(out["rounds"]) == 3 and not out["converged"]
