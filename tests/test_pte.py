"""PtE: InfoNCE negatives, snapshots, whitening, the cold-start-user protocol, the models learning, the openai
backend against a local OpenAI-compatible server."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from recbole_llmfuse import Config
from recbole_llmfuse.config import ConfigError
from recbole_llmfuse.data import PREFIX_LENGTH_FIELD
from recbole_llmfuse.stats import cold_start_user_groups
from recbole_llmfuse.dataset_prep.profiles import snapshot_lengths
from recbole_llmfuse.model.pte import snapshot_slot
from recbole_llmfuse.model.base import uniform_negatives
from recbole_llmfuse.model.layers import whitening

from conftest import TINY, write_tiny_dataset


def test_infonce_negatives_are_uniform_and_never_the_target():
    torch.manual_seed(0)
    n_items = 12  # ids 1..11 (0 is padding)
    pos = torch.arange(1, n_items).repeat(400)  # every item a target
    neg = uniform_negatives(pos, 64, n_items)
    assert neg.shape == (len(pos), 64)
    assert (neg != pos.unsqueeze(1)).all() and neg.min() >= 1 and neg.max() <= n_items - 1
    for target in (1, 6, 11):  # the other ten items equally often
        counts = torch.bincount(neg[pos == target].flatten(), minlength=n_items)[1:].float()
        counts = counts[torch.arange(1, n_items) != target]
        assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()


def test_snapshot_lengths_and_slot_selection():
    assert snapshot_lengths(1) == [] and snapshot_lengths(2) == [1]
    assert snapshot_lengths(5) == [1, 2, 4] and snapshot_lengths(9) == [1, 2, 4, 8]
    # an instance with n history items reads the largest snapshot L = 2**slot <= n
    n = torch.arange(1, 10)
    assert snapshot_slot(n, 4).tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3]
    assert snapshot_slot(n, 2).tolist() == [0] + [1] * 8  # capped at the table's slots
    assert snapshot_slot(n, 1).tolist() == [0] * 9  # one profile per user (leave-one-out)


def test_whitening_gives_unit_covariance_and_keeps_zero_rows():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 3).float()
    x[0] = 0
    w = whitening(x, 4)
    assert w.shape == (500, 4) and (w[0] == 0).all()
    cov = torch.cov(w[1:].T.double())
    assert torch.allclose(cov, torch.eye(4, dtype=torch.float64), atol=1e-3)


def test_cold_start_user_groups_by_hand():
    # user: last interaction time -> order u3 (5), u1 (7), u4 (8), u2 (9), u5 (9; tie -> smaller id first)
    users = np.array([1, 1, 2, 3, 4, 5, 2])
    times = np.array([1, 7, 2, 5, 8, 9, 9])
    group = cold_start_user_groups(users, times, [0.6, 0.2, 0.2])
    # the oldest 3 (u3, u1, u4) train, u2 validates, u5 (newest) tests; id 0 has no interactions
    assert group.tolist() == [-1, 0, 1, 0, 0, 2]


def _cold_config(root, model="PtE", **extra):
    cfg = {"data_path": root, "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "state": "WARNING",
           "eval_protocol": "cold_start_user", "cold_start_ratios": [0.6, 0.2, 0.2], "MAX_ITEM_LIST_LENGTH": 4,
           "hidden_size": 16, "inner_size": 32, "show_progress": False, "train_batch_size": 64,
           "pte_profiles": {"backend": "template", "max_rounds": 0}, **extra}
    return Config(model, TINY, config_dict=cfg, argv=[])


def test_cold_start_protocol_every_prefix_of_held_out_users_and_leakage_safe_snapshots(tmp_path):
    from recbole_llmfuse.data import create_dataset
    from recbole_llmfuse.dataset_prep.hooks import make_hook
    from recbole_llmfuse.dataset_prep.itememb import read_table

    root = write_tiny_dataset(str(tmp_path / "d"))
    config = _cold_config(root)
    dataset = create_dataset(config)
    train, valid, test = dataset.build()
    users = {name: set(d.inter_feat[d.uid_field].numpy().tolist()) for name, d in
             (("train", train), ("valid", valid), ("test", test))}
    assert not (users["train"] & users["valid"]) and not (users["valid"] & users["test"])
    assert (len(users["train"]), len(users["valid"]), len(users["test"])) == (36, 12, 12)  # 60 users, 6:2:2
    # held-out users are the newest by last interaction
    last = {u: t for u, t in zip(dataset.inter_feat[dataset.uid_field].numpy(), dataset.inter_feat["timestamp"].numpy())}
    assert max(last[u] for u in users["train"]) < min(last[u] for u in users["valid"])
    assert max(last[u] for u in users["valid"]) < min(last[u] for u in users["test"])
    # every prefix of a test user is an instance; prefix_length is the true history length (not cut at 4)
    seq_len = np.bincount(dataset.inter_feat[dataset.uid_field].numpy())  # augmented: one row per target
    for u in users["test"]:
        rows = test.inter_feat[test.inter_feat[test.uid_field] == u]
        assert len(rows) == seq_len[u] and rows[PREFIX_LENGTH_FIELD].tolist() == list(range(1, seq_len[u] + 1))
        assert rows[test.item_list_length_field].max() == 4
    # the hooks' view: training users only; held-out users' sequences only as prediction inputs
    hook = make_hook("pte_profiles", config)
    hist, held = hook.split.user_histories(), hook.split.heldout_histories()
    names = dataset.field2id_token[dataset.uid_field]
    assert set(hist) == {names[u] for u in users["train"]}
    assert set(held) == {names[u] for u in users["valid"] | users["test"]}
    # snapshots: powers of two below each sequence's length, each written from that prefix alone
    snaps = json.load(open(hook.outputs()[2]))
    for u, seq in held.items():
        assert sorted(map(int, snaps[u])) == snapshot_lengths(len(seq))
        for L, text in snaps[u].items():
            recent = text.split("Recently chose: ")[1].split(". Like-minded")[0]
            shown = [t.strip() for t in recent.split(",")]
            assert shown == [f"widget {i[1:]}" for i in seq[:int(L)][-5:]]  # the prefix's last items, nothing later
    # the user table: slot s = the encoding of the snapshot of length 2**s (later slots repeat the last)
    tokens, table = read_table(make_hook("pte_embeddings", config).outputs()[1], kind="user")
    u = max(held, key=lambda v: len(held[v]))
    row = table[list(tokens).index(u)]
    lengths = snapshot_lengths(len(held[u]))
    assert table.shape[1] == max(len(snapshot_lengths(len(s))) for s in {**hist, **held}.values())
    assert not np.allclose(row[0], row[len(lengths) - 1]) and np.allclose(row[-1], row[len(lengths) - 1])


def _fit(config, epochs):
    from recbole_llmfuse import get_trainer
    from recbole_llmfuse.quick_start import build

    dataset, net, train_data, valid_data, test_data = build(config)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
    for epoch in range(epochs):
        trainer._train_epoch(train_data, epoch, show_progress=False)
    return net, trainer.evaluate(test_data, load_best_model=False), train_data.dataset, test_data.dataset


USER_ONLY = {"item_mode": "text_only", "pte_profiles": {"backend": "template", "item_profiles": False, "max_rounds": 0}}


@pytest.mark.parametrize("model, protocol, variant", [("PtE", "recbole", {}), ("PtE", "cold_start_user", {}),
                                                      ("PtE", "recbole", USER_ONLY), ("LLMInit", "recbole", {})])
def test_pte_and_llminit_beat_popularity(tmp_path, model, protocol, variant):
    """On the tiny walks (+1 or +3 steps) the models learn the sequential signal; popularity cannot. USER_ONLY:
    the "User-only Profiling" ablation (no item profiles: an empty item-profile table)."""
    root = write_tiny_dataset(str(tmp_path / "d"))
    extra = {"eval_protocol": protocol, "learning_rate": 0.005, "seed": 0, "hidden_dropout_prob": 0.0,
             "attn_dropout_prob": 0.0, "eval_batch_size": 256, **variant}
    net, result, train, test = _fit(_cold_config(root, model=model, **extra), epochs=12)
    # popularity ranker on the same instances: the 10 most frequent training targets for everyone
    top = torch.bincount(train.inter_feat[train.iid_field], minlength=train.item_num).argsort(descending=True)[:10]
    pop = torch.isin(test.inter_feat[test.iid_field], top).float().mean().item()
    assert result["hit@10"] > pop + 0.1, (result, pop)
    if model == "PtE":  # user profiles reach the model
        assert net.user_profile_w.abs().sum() > 0


class _Server(BaseHTTPRequestHandler):
    """A local OpenAI-compatible stand-in (chat and completions): echoes a profile, fails each prompt's first
    request with 503 (the client must retry), 404 for an unknown model; counts requests in flight."""

    seen, lock, inflight, peak = {}, threading.Lock(), [0], [0]

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.inflight[0] += 1
            self.peak[0] = max(self.peak[0], self.inflight[0])
        time.sleep(0.05)
        prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        with self.lock:
            self.inflight[0] -= 1
            first = prompt not in self.seen
            self.seen[prompt] = self.seen.get(prompt, 0) + 1
        if body["model"] != "served-llm":
            return self._send(404, {"error": {"message": f"model {body['model']} does not exist"}})
        if first:
            return self._send(503, {"error": {"message": "warming up"}})
        text = f"Identity: viewer; Interests: {prompt[-20:]}; Patterns: steady. t={body['temperature']}"
        choice = {"index": 0, "finish_reason": "stop"}
        if "messages" in body:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [choice], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def served():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Server.seen.clear()
    _Server.peak[0] = 0
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_backend_retries_runs_concurrently_and_reports_errors(served):
    from recbole_llmfuse.generation import make_generator

    requests = [{"prompt": f"profile of user {u}", "fields": {}} for u in range(8)]
    gen = make_generator("openai", model="served-llm", base_url=served, concurrency=4, max_retries=2, progress=False)
    texts = gen.generate(requests, {"max_new_tokens": 32, "temperature": 0.0})
    assert [t.split("Interests: ")[1].split(";")[0] for t in texts] == [r["prompt"][-20:] for r in requests]
    assert all(n == 2 for n in _Server.seen.values())  # each prompt: one 503, one retry
    assert _Server.peak[0] > 1  # requests were in flight together
    plain = make_generator("openai", model="served-llm", base_url=served, chat_template=False, max_retries=2,
                           progress=False)
    assert plain.generate(requests[:1], {"max_new_tokens": 8, "temperature": 0.5})[0].endswith("t=0.5")
    wrong = make_generator("openai", model="nope", base_url=served, max_retries=0, progress=False)
    with pytest.raises(ConfigError, match="HTTP 404 for model 'nope'"):
        wrong.generate(requests[:1], {"max_new_tokens": 8})
    closed = make_generator("openai", model="served-llm", base_url="http://127.0.0.1:9/v1", max_retries=0,
                            timeout=5, progress=False)
    with pytest.raises(ConfigError, match=r"cannot reach http://127.0.0.1:9/v1 .*start the server"):
        closed.generate(requests[:1], {"max_new_tokens": 8})


def test_profiles_hook_through_a_served_llm_then_cached(tmp_path, served):
    from recbole_llmfuse.dataset_prep.hooks import make_hook

    root = write_tiny_dataset(str(tmp_path / "d"))
    config = Config("FastSASRec", TINY, config_dict={
        "data_path": root, "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "state": "WARNING",
        "pte_profiles": {"backend": "openai", "model": "served-llm", "base_url": served, "max_rounds": 0,
                         "max_retries": 2}}, argv=[])
    hook = make_hook("pte_profiles", config)
    report = hook.produce(progress=False)
    users = json.load(open(hook.outputs()[0]))
    assert report["generated"] == 60 + 40 and set(users) == set(hook.split.user_histories())
    assert all(text.startswith("Identity: viewer") for text in users.values())
    assert hook.produce(force=True, progress=False)["generated"] == 0  # every record cached
