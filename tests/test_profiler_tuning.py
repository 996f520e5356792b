"""PtE's profiler tuning (spec PtE §3.4, §4.2-4.6): rewards, advantages, TRL SFT/GRPO hooks, best-of-K, a real server."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from recbole_llmfuse import Config
from recbole_llmfuse.dataset_prep.hooks import PrepRequiredError, ensure, resolve
from recbole_llmfuse.dataset_prep.pte_rewards import ProfileReward, group_advantages, paper_logsigmoid
from recbole_llmfuse.synthetic import write_random_llama, write_walks

from conftest import tiny_causal_llama

# -- rewards (Eq. 9-11) and advantages (§4.4) by hand --------------------------------------------------------


def _unit(*v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def _table_encoder(vectors):
    """f_enc for hand-made cases: each text names its vector."""
    return lambda texts: np.stack([vectors[t] for t in texts])


def test_rewards_by_hand_collab_rises_near_items_dist_falls_near_neighbours():
    vectors = {"near items": _unit(1, 0, 0), "near neighbour": _unit(0, 1, 0), "between": _unit(1, 1, 0),
               "elsewhere": _unit(0, 0, 1)}
    r = ProfileReward(_table_encoder(vectors), targets={"u": np.stack([_unit(1, 0, 0), _unit(1, 0.2, 0)])},
                      neighbors={"u": ["w"]}, neighbor_vecs={"w": _unit(0, 1, 0)}, lambda_c=1.0, lambda_d=0.5)
    s = {t: r.score(["u"], [t])[0] for t in vectors}
    items = np.stack([_unit(1, 0, 0), _unit(1, 0.2, 0)])
    # Eq. 10 by hand: mean cosine to the user's items
    assert s["between"]["collab"] == pytest.approx(float((items @ _unit(1, 1, 0)).mean()), abs=1e-6)
    assert s["near items"]["collab"] > s["between"]["collab"] > s["elsewhere"]["collab"]
    # Eq. 11 by hand: minus the mean cosine to the neighbours' current embeddings
    assert s["near neighbour"]["dist"] == pytest.approx(-1.0, abs=1e-6)
    assert s["between"]["dist"] == pytest.approx(-float(_unit(1, 1, 0) @ _unit(0, 1, 0)), abs=1e-6)
    assert s["elsewhere"]["dist"] == pytest.approx(0.0, abs=1e-6)
    for t in vectors:  # Eq. 9
        assert s[t]["reward"] == pytest.approx(s[t]["collab"] + 0.5 * s[t]["dist"], abs=1e-6)
    # the refresh moves ē: a neighbour that now sits on the items makes "near items" less distinct
    r.update_neighbor_vecs({"w": _unit(1, 0, 0)})
    assert r.score(["u"], ["near items"])[0]["dist"] == pytest.approx(-1.0, abs=1e-6)


def test_format_guard_scores_minus_one_and_skips_encoding():
    from recbole_llmfuse.dataset_prep.profiles import well_formed

    seen = []

    def encode(texts):
        seen.extend(texts)
        return np.tile(_unit(1, 0), (len(texts), 1))

    r = ProfileReward(encode, {"u": _unit(1, 0)[None]}, {}, {}, well_formed=lambda t: well_formed(t, "user"))
    good = "Identity: film buff, night owl; Interests: noir, westerns, jazz; Patterns: watches old films weekly."
    bad_fields = "A person who likes many kinds of movies and watches them every single weekend at home."
    short = "Identity: x; Interests: y"
    out = r.score(["u"] * 3, [good, bad_fields, short])
    assert [o["well_formed"] for o in out] == [True, False, False]
    assert out[1]["reward"] == out[2]["reward"] == -1.0 and out[1]["collab"] is None
    assert out[0]["reward"] == pytest.approx(1.0)
    assert seen == [good]  # malformed candidates are never encoded


def test_group_advantages_by_hand_both_modes():
    r = [1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]
    a = group_advantages(r, 4, "group_std")
    g = np.asarray(r[:4])
    assert a[:4] == pytest.approx((g - 3.0) / (np.std(g, ddof=1) + 1e-4))
    assert a[4:] == pytest.approx([0.0] * 4)  # identical rewards: no advantage
    b = group_advantages(r, 4, "paper_logsigmoid")
    logsig = -np.log1p(np.exp(-(g - 3.0)))
    assert b[:4] == pytest.approx(logsig - logsig.mean())
    assert b[4:] == pytest.approx([0.0] * 4)
    assert np.argsort(b[:4]).tolist() == np.argsort(a[:4]).tolist()  # monotone in R, like group_std
    with pytest.raises(ValueError):
        group_advantages(r, 4, "eq12")


def test_eq12_literal_objective_is_maximal_at_equal_rewards():
    """Spec §4.4: Σ_k log σ(R_k - mean R) is maximal when all rewards are equal (why Eq. 12 is not the objective)."""
    rng = np.random.default_rng(0)
    equal = paper_logsigmoid(np.zeros((1, 4))).sum()
    for _ in range(200):
        assert paper_logsigmoid(rng.normal(size=(1, 4))).sum() <= equal + 1e-12


def test_trl_group_advantages_equal_ours():
    """TRL's GRPO advantage code (scale_rewards='group', which profiler_grpo uses) gives group_advantages' numbers."""
    import torch
    from trl.trainer.utils import nanstd

    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.7, 0.1])
    mean = r.view(-1, 4).mean(1).repeat_interleave(4)
    std = nanstd(r.view(-1, 4), dim=1).repeat_interleave(4)
    assert ((r - mean) / (std + 1e-4)).numpy() == pytest.approx(group_advantages(r.numpy(), 4), abs=1e-5)


# -- GRPO learns, on a tiny random Llama --------------------------------------------------------------------


def test_short_grpo_run_raises_the_mean_of_a_toy_reward(tmp_path):
    """Our GRPO settings (grpo_config: standard loss, β 0.04, group-std advantages, LoRA) push up a toy reward: the
    share of completion tokens from the lower half of the vocabulary (≈ 0.5 at random)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOTrainer

    from recbole_llmfuse.dataset_prep.profiler_tuning import grpo_config
    from recbole_llmfuse.llm import load_causal_lm, load_tokenizer

    # a larger init spread than the default 0.02: peaked next-token distributions that LoRA on attention can move
    path = write_random_llama(str(tmp_path / "llama"), [f"user {i} likes widget {i} acme globex" for i in range(40)],
                              lm_head=True, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, initializer_range=0.3)
    tok, model = load_tokenizer(path), load_causal_lm(path, trainable=None)
    low = len(tok) // 2

    def toy(prompts, completions, completion_ids, **_):
        return [sum(t < low for t in ids) / max(1, len(ids)) for ids in completion_ids]

    p = {"num_generations": 4, "prompts_per_step": 4, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0,
         "beta": 0.04, "epsilon": 0.2, "num_iterations": 1, "advantage": "group_std"}
    common = {"output_dir": str(tmp_path / "work"), "learning_rate": 3e-2, "num_train_epochs": 1, "logging_steps": 1,
              "save_steps": 1000, "report_to": "none", "seed": 0, "use_cpu": True, "bf16": False, "disable_tqdm": True,
              "lr_scheduler_type": "constant"}
    data = Dataset.from_list([{"prompt": f"user {i % 40} likes widget {i % 7}"} for i in range(160)])
    trainer = GRPOTrainer(model=model, reward_funcs=[toy], args=grpo_config(common, p), train_dataset=data,
                          processing_class=tok, peft_config=LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 40
    assert np.mean(rewards[-10:]) > np.mean(rewards[:5]) + 0.2, rewards


# -- the hooks on a small world -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """12 users walking 10 items, template teacher profiles, a tiny random Llama (MiniLM's tokenizer)."""
    root = tmp_path_factory.mktemp("tuning")
    write_walks(str(root), "tw", users=12, items=10)
    return {"root": str(root), "model": tiny_causal_llama(str(root / "llama"))}


#: the teacher profile set: the template backend (the tuned runs switch pte_profiles to the tiny Llama)
TEACHER = {"backend": "template", "model": "SmolLM2-135M-Instruct"}


def _config(world, profiles=None, sft=None, grpo=None):
    return Config("PtE", "tw", config_dict={
        "data_path": world["root"], "state": "WARNING", "show_progress": False,
        "pte_profiles": {"backend": "template", "snapshots": False, "format_guard": "off", "max_new_tokens": 8,
                         **(profiles or {})},
        "profiler_sft": {"model": world["model"], "teacher": TEACHER, "epochs": 2, "batch_size": 4, "grad_accum": 1, "max_length": 1024,
                         "progress": False, **(sft or {})},
        "profiler_grpo": {"teacher": TEACHER, "num_generations": 2, "prompts_per_step": 2, "max_new_tokens": 8, "max_prompts": 6,
                          "progress": False, **(grpo or {})}}, argv=[])


def _run(config, name):
    out = {}
    for hook in resolve(config, [name]):
        out[hook.name] = (hook, hook.produce())
    return out


@pytest.mark.integration
def test_sft_masks_prompt_tokens_and_its_adapter_reloads_to_equal_outputs(world):
    import torch

    from recbole_llmfuse.llm import load_causal_lm

    config = _config(world)
    hooks = _run(config, "profiler_sft")
    sft, report = hooks["profiler_sft"]
    assert report["examples"] == 24 and report["users"] == 12  # 2 epochs x 12 training users
    assert np.isfinite(report["first_loss"]) and report["steps"] == 6
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tuning.json", "log.csv", "curve.png"):
        assert os.path.isfile(os.path.join(sft.adapter_dir, f)), f
    assert sft.status() == "fresh"
    # neighbour dropout: about half of the student prompts lost the neighbour block
    rows = sft.examples()
    dropped = sum("overlap most" not in r["prompt"] for r in rows)
    assert 0 < dropped < len(rows)
    # the loss sees response tokens only: in every training row the labels mask (-100) exactly the prompt, which
    # decodes to the Eq.-6 prompt, and what is left decodes to the teacher's profile
    trainer, _ = sft.trainer()
    tok = trainer.processing_class
    targets = {r["completion"] for r in rows}
    for row in trainer.train_dataset:
        labels = row["labels"]
        n = next(i for i, t in enumerate(labels) if t != -100)
        assert n > 10 and all(t != -100 for t in labels[n:])
        assert "target user" in tok.decode(row["input_ids"][:n]).lower()
        assert tok.decode(row["input_ids"][n:], skip_special_tokens=True).replace(" ", "") in \
            {t.lower().replace(" ", "") for t in targets}
    batch = next(iter(trainer.get_train_dataloader()))
    assert ((batch["labels"] == -100) | (batch["attention_mask"] == 1)).all()
    # the saved adapter reloads to the trained model's outputs
    ids = tok(["Target user - items interacted with"], return_tensors="pt")["input_ids"]
    reloaded = load_causal_lm(world["model"], adapters=sft.adapter_dir)
    reloaded2 = load_causal_lm(world["model"], adapters=sft.adapter_dir)
    with torch.no_grad():
        a, b = reloaded(input_ids=ids).logits, reloaded2(input_ids=ids).logits
        base = load_causal_lm(world["model"])(input_ids=ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, base)  # the adapter changed the model


@pytest.mark.integration
def test_grpo_from_sft_then_tuned_best_of_k_profiles_feed_pte(world):
    config = _config(world)
    hooks = _run(config, "profiler_grpo")
    grpo, report = hooks["profiler_grpo"]
    assert report["sft"] and report["steps"] == 3 and report["neighbor_refreshes"] == 1
    assert report["prompts"] == 6 and report["beta"] == 0.04
    with open(os.path.join(grpo.adapter_dir, "adapter_chain.json")) as f:
        assert json.load(f)["base_adapters"] == ["../tw.profiler_sft"]
    log = open(os.path.join(grpo.adapter_dir, "log.csv")).read().splitlines()
    assert {"pte/reward", "pte/collab", "pte/dist", "kl"} <= set(log[0].split(",")) and len(log) >= 4
    assert os.path.getsize(os.path.join(grpo.adapter_dir, "curve.png")) > 1000
    # tuned profiles: the GRPO adapter (chained on SFT) + best-of-3, through pte_profiles -> pte_embeddings
    tuned = _config(world, profiles={"backend": "hf", "model": world["model"], "adapter": "profiler_grpo",
                                     "best_of_k": 3, "tag": "tuned", "best_of_k_items": False, "auto_run": True})
    ran = ensure(tuned, ["pte_embeddings"])
    assert ran == ["pte_profiles", "pte_embeddings"]
    folder = os.path.join(world["root"], "tw")
    records = [json.loads(line) for line in open(os.path.join(folder, "tw.tuned.profilelog.jsonl"))]
    users = [r for r in records if r["kind"] == "user"]
    assert len(users) == 12 and all(len(r["candidates"]) == 3 for r in users)
    with open(os.path.join(folder, "tw.tuned.userprof.json")) as f:
        chosen = json.load(f)
    for r in users:  # the kept candidate is the top-reward one, and it is the profile written
        rewards = [c["reward"] for c in r["candidates"]]
        assert r["chosen"] == int(np.argmax(rewards)) and r["text"] == chosen[r["entity"]]
        assert r["text"] == r["candidates"][r["chosen"]]["text"]
        assert {c["seed"] for c in r["candidates"]} == {0, 1, 2}
    assert len({c["text"] for r in users for c in r["candidates"]}) > 12  # sampled candidates differ
    items = [r for r in records if r["kind"] == "item"]
    assert items and all(len(r["candidates"]) == 1 for r in items)  # best_of_k_items: false
    csv_rows = open(os.path.join(folder, "tw.tuned.rewards.csv")).read().splitlines()
    assert csv_rows[0].startswith("kind,entity,k,chosen,reward,collab,dist") and len(csv_rows) == 1 + len(records)
    *_, made = resolve(tuned, ["pte_profiles"])  # the report's figures, re-read from the table by a later run
    summary = made.rewards()
    assert summary["user"]["k"] == 3 and summary["item"]["k"] == 1 and summary["user"]["entities"] == 12
    assert summary["user"]["chosen_reward"] == pytest.approx(np.mean([max(c["reward"] for c in r["candidates"])
                                                                      for r in users]), abs=1e-5)
    # the PtE model reads the tuned vectors, row-aligned with RecBole's ids
    from recbole_llmfuse.dataset_prep import itememb

    tokens, table = itememb.read_table(os.path.join(folder, "tw.tuned.pteuser.npz"), kind="user")
    assert sorted(map(str, tokens)) == sorted(chosen) and table.shape[0] == 12
    # a rerun is fully cached: nothing runs
    assert ensure(tuned, ["pte_embeddings"]) == []


@pytest.mark.integration
def test_a_killed_grpo_run_leaves_the_adapter_and_resumes_from_its_checkpoint(world):
    from transformers import TrainerCallback

    from recbole_llmfuse.dataset_prep import profiler_tuning

    tiny = {"tag": "resume", "save_steps": 1, "sft": False, "model": world["model"]}  # no SFT: name the tiny model
    first = _config(world, grpo=tiny)
    _run(first, "profiler_grpo")
    config = _config(world, grpo={**tiny, "beta": 0.05})  # other settings
    *_, hook = resolve(config, ["profiler_grpo"])
    assert hook.status() == "conflict"
    before = open(os.path.join(hook.adapter_dir, "tuning.json")).read()

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:  # before step 2's checkpoint: the last one is step 1's
                raise KeyboardInterrupt

    original = profiler_tuning.ProfilerGRPOHook.trainer

    def killed_trainer(self):
        trainer, info = original(self)
        trainer.add_callback(Kill())
        return trainer, info

    profiler_tuning.ProfilerGRPOHook.trainer = killed_trainer
    try:
        with pytest.raises(KeyboardInterrupt):
            hook.produce(replace=True)
    finally:
        profiler_tuning.ProfilerGRPOHook.trainer = original
    assert open(os.path.join(hook.adapter_dir, "tuning.json")).read() == before  # the previous adapter, untouched
    assert hook.status() == "pending"
    assert [n for n in os.listdir(hook.work_dir) if n.startswith("checkpoint-")] == ["checkpoint-1"]
    *_, again = resolve(config, ["profiler_grpo"])
    report = again.produce(replace=True)
    assert report["resumed"] and report["steps"] == 3 and again.status() == "fresh"
    assert not os.path.exists(again.work_dir)
    assert json.load(open(os.path.join(again.adapter_dir, "tuning.json")))["beta"] == 0.05


def test_a_model_run_that_needs_a_tuned_profiler_prints_the_prep_command(world):
    """auto_run false: the first missing tuning step stops the run with its exact command (SFT before GRPO)."""
    tuned = {"backend": "hf", "model": world["model"], "adapter": "profiler_grpo", "tag": "needs"}
    config = _config(world, profiles=tuned, sft={"tag": "never-made"}, grpo={"tag": "never-made"})
    with pytest.raises(PrepRequiredError) as err:
        ensure(config, ["pte_embeddings"])
    assert "`recbole-llmfuse prep sft --dataset tw" in str(err.value) and "tag=never-made" in str(err.value)
    config = _config(world, profiles=tuned, grpo={"tag": "never-made", "sft": False})
    with pytest.raises(PrepRequiredError) as err:
        ensure(config, ["pte_embeddings"])
    assert "`recbole-llmfuse prep grpo --dataset tw" in str(err.value) and "sft=false" in str(err.value)


@pytest.mark.parametrize("params, words", [
    ({"profiler_grpo": {"num_generations": 1}}, "num_generations 1: K >= 2"),
    ({"pte_profiles": {"lambda_d": "high", "best_of_k": 2}}, "lambda_d 'high' is not a number"),
    ({"pte_profiles": {"best_of_k": 0}}, "best_of_k 0"),
    ({"pte_profiles": {"adapter": "/no/such/adapter"}}, "not a PEFT adapter folder"),
    ({"profiler_grpo": {"advantage": "eq12"}}, "advantage 'eq12'"),
])
def test_bad_tuning_settings_are_one_line_with_exit_2(world, params, words, capsys):
    from recbole_llmfuse.cli import main

    hook = "profiler_grpo" if "profiler_grpo" in params else "pte_profiles"
    args = ["prep", "grpo" if hook == "profiler_grpo" else "profiles", "--dataset", "tw", "--data_path", world["root"],
            *(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in params[hook].items())]
    if hook == "profiler_grpo":
        args += ["sft=false", "tag=bad"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


# -- a real OpenAI-compatible server: `transformers serve` with the offline SmolLM2 -------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_smollm2():
    """``transformers serve`` on its own port with SmolLM2-135M-Instruct (GGUF, offline); killed at the end."""
    pytest.importorskip("fastapi", reason="`transformers serve` needs the transformers[serving] extra (fastapi, "
                        "uvicorn): pip install 'recbole-llmfuse[llm]'")
    pytest.importorskip("uvicorn", reason="`transformers serve` needs transformers[serving]")
    import urllib.request

    from recbole_llmfuse.llm import OFFLINE_MODELS, resolve_model_path

    model = f"{resolve_model_path('SmolLM2-135M-Instruct')}:{OFFLINE_MODELS['SmolLM2-135M-Instruct'][2]}"
    port = _free_port()
    exe = shutil.which("transformers", path=os.path.dirname(sys.executable)) or shutil.which("transformers")
    proc = subprocess.Popen([exe, "serve", "--port", str(port), "--log-level", "warning", model],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"transformers serve did not come up (exit {proc.poll()})")
                time.sleep(1)
        yield {"base_url": f"http://127.0.0.1:{port}/v1", "model": model}
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_profiles_and_best_of_k_through_transformers_serve_then_cached(tmp_path, served_smollm2):
    from recbole_llmfuse.generation import OpenAIGenerator

    # the plain /v1/completions path as well as chat
    plain = OpenAIGenerator(served_smollm2["model"], served_smollm2["base_url"], chat_template=False, progress=False)
    text, = plain.generate([{"prompt": "A profile of a movie fan. Identity:"}], {"max_new_tokens": 12})
    assert len(text.split()) >= 3
    write_walks(str(tmp_path), "sv", users=4, items=6, length=(4, 5))
    config = Config("PtE", "sv", config_dict={
        "data_path": str(tmp_path), "state": "WARNING", "show_progress": False,
        "pte_profiles": {"backend": "openai", **served_smollm2, "item_profiles": False, "max_rounds": 0,
                         "snapshots": False, "max_new_tokens": 24, "best_of_k": 2, "format_guard": "words",
                         # transformers serve samples only when asked to: its default generation config is greedy
                         "extra_body": {"generation_config": json.dumps({"do_sample": True})},
                         "domain": "gadgets", "concurrency": 2}}, argv=[])
    start = time.perf_counter()
    hook, = resolve(config, ["pte_profiles"])
    report = hook.produce()
    first = time.perf_counter() - start
    assert report["users"] == 4 and report["generated"] == 4 + 4 * 2  # greedy p*, then 2 candidates each
    records = [json.loads(line) for line in open(hook.outputs()[3])]
    assert all(len(r["candidates"]) == 2 and r["text"].strip() for r in records)
    assert len({c["text"] for r in records for c in r["candidates"]}) > 4  # sampled, not all alike
    # a rerun is fully cached: no request reaches the server
    start = time.perf_counter()
    again, = resolve(config, ["pte_profiles"])
    report = again.produce(force=True)
    assert report["generated"] == 0 and report["cached"] == 12
    assert time.perf_counter() - start < first
