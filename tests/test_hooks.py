"""Preparation hooks that can carry GPU-hours of work: one producer under concurrency, users' files kept,
crash recovery, the training-split boundary, dependencies with chained fingerprints, the record cache,
auto_run: false, and one-line CLI errors."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from recbole_llmfuse import Config, create_dataset, registry
from recbole_llmfuse.dataset_prep import hooks
from recbole_llmfuse.dataset_prep import embed
from recbole_llmfuse.dataset_prep.embed import ItemTextEmbeddingHook
from recbole_llmfuse.dataset_prep.item_text import build_item_texts
from recbole_llmfuse.dataset_prep.hooks import (HookConflictError, PrepHook, PrepRequiredError, RecordCache,
                                                TrainingSplit, atomic_write_text, ensure)
from recbole_llmfuse.quick_start import build

import stub_encoder
from conftest import SMALL

BIN = os.path.dirname(sys.executable)
TESTS = os.path.dirname(os.path.abspath(__file__))
LOAD_COL = {"inter": ["user_id", "item_id", "timestamp"]}


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _leftovers(folder):
    return glob.glob(os.path.join(folder, f".{SMALL}.itememb.parts-*")) + glob.glob(os.path.join(folder, "*.pending"))


def _stub_process(script: str, env: dict) -> subprocess.Popen:
    """``script`` in a fresh interpreter with the stub encoder registered."""
    prelude = f"import sys; sys.path.insert(0, {TESTS!r}); import stub_encoder; stub_encoder.install()\n"
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def test_two_runs_at_once_encode_once(folder, tmp_path):
    """Two processes start a model that needs missing embeddings at the same moment (a barrier: both are past
    their imports before either asks for the table): both succeed, the encoder runs in one process only and once
    per item, the other waited for it (it asked while the encoding was under way), no parts folder is left."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    script = f"""
        import json, os, time
        from recbole_llmfuse import Config, create_dataset
        from recbole_llmfuse.dataset_prep import hooks
        config = Config("MoRec", "{SMALL}", config_dict={{"data_path": {os.path.dirname(folder)!r},
                        "load_col": {LOAD_COL!r}, "item_text_embedding": {{"backend": "stub", "batch_size": 100}}}}, argv=[])
        open(os.path.join({str(barrier)!r}, str(os.getpid())), "w").close()
        while len(os.listdir({str(barrier)!r})) < 2:
            time.sleep(0.01)
        asked = time.time()
        ran = hooks.ensure(config, ["item_text_embedding"])
        table = create_dataset(config).feature_table("item_text_emb")
        print(json.dumps({{"ran": ran, "asked": asked, "pid": os.getpid(), "table": table.tolist()}}))
    """
    log = str(tmp_path / "calls.log")
    procs = [_stub_process(script, {"STUB_ENCODER_DELAY": "0.2", "STUB_ENCODER_LOG": log}) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(len(r["ran"]) for r in results) == [0, 1]
    calls = stub_encoder.calls(log)
    n_items = len(results[0]["table"]) - 1  # row 0 is padding
    assert {pid for pid, _, _ in calls} == {next(r["pid"] for r in results if r["ran"])}  # one process encoded
    assert sum(n for _, n, _ in calls) == n_items  # every item once
    waiter = next(r for r in results if not r["ran"])
    assert waiter["asked"] < max(t for _, _, t in calls)  # it asked before the encoding was done: they overlapped
    assert results[0]["table"] == results[1]["table"]
    assert not _leftovers(folder)


def test_users_custom_embedding_is_never_overwritten(folder):
    """`prep embed "item_text_template=Movie {movie_title}"`, then a model with the default template: the run
    stops naming both settings and the ways out; the file is untouched; prep_stale=use takes it as it is."""
    proc = subprocess.run([os.path.join(BIN, "recbole-llmfuse"), "prep", "embed", "--dataset", SMALL,
                           "--data_path", os.path.dirname(folder), "item_text_template=Movie {movie_title}",
                           "device=cpu", "formats=[npz]"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    npz = os.path.join(folder, f"{SMALL}.itememb.npz")
    manifest = json.load(open(npz + ".manifest.json"))
    assert manifest["fingerprint"]["params"]["item_text_template"] == "Movie {movie_title}"
    digest, mtime = _sha(npz), os.path.getmtime(npz)
    cfg = {"data_path": os.path.dirname(folder), "load_col": LOAD_COL, "item_text_embedding": {"device": "cpu"}}
    with pytest.raises(HookConflictError) as err:
        create_dataset(Config("MoRec", SMALL, config_dict=cfg, argv=[]))
    message = str(err.value)
    assert "item_text_template='Movie {movie_title}'" in message and "item_text_template=None" in message
    assert "--prep_stale=use" in message and "--force" in message
    assert _sha(npz) == digest and os.path.getmtime(npz) == mtime
    table = create_dataset(Config("MoRec", SMALL, config_dict={**cfg, "prep_stale": "use"}, argv=[])).feature_table("item_text_emb")
    assert table.shape[1] == 384 and _sha(npz) == digest
    # the same setting through the CLI without --force: refused with one line, exit 2
    proc = subprocess.run([os.path.join(BIN, "recbole-llmfuse"), "prep", "embed", "--dataset", SMALL,
                           "--data_path", os.path.dirname(folder), "device=cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--force" in proc.stderr
    assert _sha(npz) == digest


def test_killed_shard_200_run_then_default_run_recovers(folder, monkeypatch):
    """A `prep embed shard_size=200` killed after its first part file; the model's default run then embeds
    (parts keyed by shard size never mix), writes the manifest, leaves no parts folder or marker, and its table
    equals a clean encoding of every item."""
    script = f"""
        from recbole_llmfuse import cli
        cli.main(["prep", "embed", "--dataset", "{SMALL}", "--data_path", {os.path.dirname(folder)!r},
                  "backend=stub", "shard_size=200", "batch_size=20"])
    """
    proc = _stub_process(script, {"STUB_ENCODER_DELAY": "0.1"})
    deadline = time.time() + 300
    while time.time() < deadline and not glob.glob(os.path.join(folder, f".{SMALL}.itememb.parts-*", "part-*.npz")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert glob.glob(os.path.join(folder, f".{SMALL}.itememb.parts-*", "part-*.npz")), "the run finished before the kill"
    assert os.path.exists(os.path.join(folder, f"{SMALL}.itememb.npz.pending"))
    assert not os.path.exists(os.path.join(folder, f"{SMALL}.itememb.npz"))
    monkeypatch.setitem(embed.BACKENDS, "stub", (stub_encoder.StubEncoder, {}))  # in this process, for this test
    cfg = {"data_path": os.path.dirname(folder), "load_col": LOAD_COL, "item_text_embedding": {"backend": "stub"}}
    dataset = create_dataset(Config("MoRec", SMALL, config_dict=cfg, argv=[]))
    table = dataset.feature_table("item_text_emb")
    assert ItemTextEmbeddingHook(folder, SMALL, {"backend": "stub"}).status() == "fresh"
    assert not _leftovers(folder)
    texts = dict(zip(*(lambda items: (items.tokens, items.texts))(build_item_texts(folder, SMALL))))
    clean = np.stack([stub_encoder.vector(texts[dataset.id2token(dataset.iid_field, i)]) for i in range(1, dataset.item_num)])
    np.testing.assert_allclose(table[1:], clean, atol=1e-6)


def test_failed_run_leaves_no_empty_parts_folder_and_force_starts_clean(folder, monkeypatch):
    from recbole_llmfuse.dataset_prep import embed

    def broken(params):
        raise RuntimeError("model failed to load")

    monkeypatch.setattr(embed, "make_encoder", broken)
    hook = ItemTextEmbeddingHook(folder, SMALL, {"device": "cpu"})
    with pytest.raises(RuntimeError):
        hook.produce()
    assert not _leftovers(folder) and hook.status() == "missing"
    monkeypatch.undo()
    # killed after the outputs were written, before the manifest: ours, redone, never taken for the user's
    monkeypatch.setattr(ItemTextEmbeddingHook, "write_manifest", lambda self, extra=None: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        hook.produce(progress=False)
    assert os.path.exists(hook.outputs()[0]) and hook.status() == "pending"
    monkeypatch.undo()
    stale = os.path.join(folder, f".{SMALL}.itememb.parts-0123456789abcdef-s7")
    os.makedirs(stale)
    open(os.path.join(stale, "part-00000.npz"), "w").write("garbage")
    hook.produce(force=True, progress=False)
    assert hook.status() == "fresh" and not _leftovers(folder)


def test_split_view_holds_training_interactions_only(small_cfg):
    config = Config("FastSASRec", SMALL, config_dict=small_cfg(), argv=[])
    split = TrainingSplit(config)
    _, _, train_data, valid_data, test_data = build(config)
    dataset = test_data.dataset
    held_out = set()
    for data in (valid_data, test_data):
        inter = data.dataset.inter_feat
        users = dataset.id2token(dataset.uid_field, inter[dataset.uid_field].numpy())
        items = dataset.id2token(dataset.iid_field, inter[dataset.iid_field].numpy())
        held_out |= set(zip(users, items))
    seen = set(zip(split.users.tolist(), split.items.tolist()))
    assert held_out and not held_out & seen
    n_all = sum(1 for _ in open(os.path.join(config["data_path"], f"{SMALL}.inter"))) - 1
    assert len(split.users) == n_all - len(held_out)  # every other interaction is there
    # the last training item of each user comes before that user's held-out ones
    histories = split.user_histories()
    assert len(histories) == len({u for u, _ in held_out})


class Upstream(PrepHook):
    name = "toy_upstream"
    defaults = {"scale": 1.0}

    def outputs(self):
        return [os.path.join(self.data_path, f"{self.dataset}.toyup.json")]

    def run(self, **_):
        atomic_write_text(self.outputs()[0], json.dumps({"scale": self.params["scale"]}))
        self.write_manifest()
        return {"ok": True}


class Downstream(PrepHook):
    """Counts each item's training interactions times the upstream scale: reads the split and the upstream."""

    name = "toy_downstream"
    requires = ("toy_upstream",)
    uses_split = True
    defaults = {}

    def outputs(self):
        return [os.path.join(self.data_path, f"{self.dataset}.toydown.json")]

    def run(self, **_):
        scale = json.load(open(os.path.join(self.data_path, f"{self.dataset}.toyup.json")))["scale"]
        counts = {}
        for item in self.split.items.tolist():
            counts[item] = counts.get(item, 0) + scale
        atomic_write_text(self.outputs()[0], json.dumps(counts))
        self.write_manifest()
        return {"ok": True}


class Unrelated(Upstream):
    name = "toy_unrelated"

    def outputs(self):
        return [os.path.join(self.data_path, f"{self.dataset}.toyother.json")]


class Expensive(Upstream):
    name = "toy_expensive"
    defaults = {"scale": 1.0, "auto_run": False}

    def outputs(self):
        return [os.path.join(self.data_path, f"{self.dataset}.toyexp.json")]


@pytest.fixture
def toy_hooks(monkeypatch):
    for hook in (Upstream, Downstream, Unrelated, Expensive):  # registered in this process, as a notebook would
        monkeypatch.setitem(registry.REGISTERED_HOOKS, hook.name, hook)


def test_dependencies_chain_fingerprints_and_rerun_only_what_depends(small_cfg, toy_hooks):
    def config(**params):
        return Config("FastSASRec", SMALL, config_dict=small_cfg(prep_hooks=["toy_downstream", "toy_unrelated"],
                                                                 prep_stale="rerun", **params), argv=[])

    assert ensure(config()) == ["toy_upstream", "toy_downstream", "toy_unrelated"]  # upstream first
    assert ensure(config()) == []
    down = hooks.make_hook("toy_downstream", config())
    hooks.resolve(config(), ["toy_downstream"])
    up_digest = hooks.make_hook("toy_upstream", config()).fingerprint_digest()
    assert down.manifest()["fingerprint"]["inputs"] == {"toy_upstream": up_digest}
    assert "training_split" in down.manifest()["fingerprint"]
    # changing the upstream's settings reruns it and its dependant, not the unrelated hook
    assert ensure(config(toy_upstream={"scale": 2.0})) == ["toy_upstream", "toy_downstream"]
    counts = json.load(open(down.outputs()[0]))
    assert set(counts.values()) <= {2.0 * k for k in range(1, 1000)}
    # without prep_stale: rerun, other upstream settings are an error, not a silent rebuild
    with pytest.raises(HookConflictError, match="scale=2.0.*scale=3.0"):
        ensure(Config("FastSASRec", SMALL, config_dict=small_cfg(prep_hooks=["toy_downstream"],
                                                                 toy_upstream={"scale": 3.0}), argv=[]))


def test_expensive_hook_is_not_started_by_a_model_run(small_cfg, toy_hooks):
    config = Config("FastSASRec", SMALL, config_dict=small_cfg(prep_hooks=["toy_expensive"]), argv=[])
    with pytest.raises(PrepRequiredError, match=r"does not run by itself .*`recbole-llmfuse prep hook toy_expensive "
                                                r"--dataset ml-small --data_path \S+`"):
        ensure(config)
    hooks.make_hook("toy_expensive", config).produce()
    assert ensure(config) == []


def test_record_cache_resumes_and_counts(tmp_path):
    """Records are keyed by generator, prompt and sampling; a generation killed after 3 records keeps them, and the
    rerun (a new process: the same file opened again) generates only the 2 missing, through the production path
    (``cached_generate``, one record per chunk)."""
    from recbole_llmfuse.generation import TemplateGenerator, cached_generate

    assert RecordCache.key("hf", "model-sha", "prompt 0", {"temperature": 0}) == RecordCache.key("hf", "model-sha", "prompt 0", {"temperature": 0})
    assert RecordCache.key("hf", "model-sha", "prompt 0", {"temperature": 1}) != RecordCache.key("hf", "model-sha", "prompt 0", {"temperature": 0})

    class Killed(TemplateGenerator):
        def generate(self, requests, sampling):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 4:
                raise KeyboardInterrupt
            return super().generate(requests, sampling)

    requests = [{"prompt": f"prompt {i}", "fields": {"i": i}} for i in range(5)]
    cache = RecordCache(str(tmp_path / "c.sqlite"))
    with pytest.raises(KeyboardInterrupt):
        cached_generate(Killed("profile {i}"), requests, {"temperature": 0}, cache, chunk=1)
    assert len(cache) == 3
    cache = RecordCache(cache.path)
    out = cached_generate(TemplateGenerator("profile {i}"), requests, {"temperature": 0}, cache, chunk=1)
    assert (out["generated"], out["cached"]) == (2, 3) and out["texts"] == [f"profile {i}" for i in range(5)]
    assert (cache.hits, cache.misses) == (3, 2)


def test_prep_cli_errors_are_one_line(folder):
    where = ["--dataset", SMALL, "--data_path", os.path.dirname(folder)]
    for args, words in ((["hook", "no_such_hook", *where], "unknown prep hook 'no_such_hook'"),
                        (["embed", *where, "no_such_param=1"], "unknown parameter(s) ['no_such_param']"),
                        (["embed", *where, "item_text_fields=[nope]"], "item_text_fields names ['nope']")):
        proc = subprocess.run([os.path.join(BIN, "recbole-llmfuse"), "prep", *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-1500:]
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr
        assert not _leftovers(folder) and not os.path.exists(os.path.join(folder, f"{SMALL}.itememb.npz"))


class ItemTokens(PrepHook):
    """Writes a ragged table: each item's 'token ids' (its id's digits), as a tokenizer hook would."""

    name = "toy_item_tokens"
    defaults = {}

    def outputs(self):
        return [os.path.join(self.data_path, f"{self.dataset}.toytokens.npz")]

    def run(self, **_):
        from recbole_llmfuse.dataset_prep.item_text import read_item_file
        from recbole_llmfuse.dataset_prep.itememb import Ragged, write_table

        _, rows = read_item_file(os.path.join(self.data_path, f"{self.dataset}.item"))
        tokens = [r["item_id"] for r in rows]
        ids = [[int(c) for c in t] for t in tokens]
        write_table(self.outputs()[0], tokens, Ragged(np.concatenate(ids), np.cumsum([0] + [len(i) for i in ids])))
        self.write_manifest()
        return {"ok": True}


class UserVectors(PrepHook):
    """Writes a user table from the training split only: [number of training items, mean item id]."""

    name = "toy_user_vectors"
    uses_split = True
    defaults = {}

    def outputs(self):
        return [os.path.join(self.data_path, f"{self.dataset}.toyusers.npz")]

    def run(self, **_):
        from recbole_llmfuse.dataset_prep.itememb import write_table

        hist = self.split.user_histories()
        users = sorted(hist)
        vectors = np.array([[len(hist[u]), np.mean([int(i) for i in hist[u]])] for u in users], dtype=np.float32)
        write_table(self.outputs()[0], users, vectors, kind="user")
        self.write_manifest()
        return {"ok": True}


def test_declared_ragged_and_user_tables_load_row_aligned(small_cfg, monkeypatch):
    """A model declares a ragged item table and a user table; both hooks run, and the buffers are row-aligned
    with RecBole's internal ids (checked against the tokens), the user table built from the training split."""
    import torch

    from recbole_llmfuse.data import FeatureTable
    from recbole_llmfuse.model.fast_sasrec import FastSASRec

    class WithTables(FastSASRec):
        config_file = registry.model_config_file(FastSASRec)
        feature_tables = (FeatureTable("item_tokens", hook="toy_item_tokens", ragged=True),
                          FeatureTable("user_vec", hook="toy_user_vectors", kind="user", options="user_emb"))

    real_model = registry.get_model
    monkeypatch.setitem(registry.REGISTERED_HOOKS, "toy_item_tokens", ItemTokens)
    monkeypatch.setitem(registry.REGISTERED_HOOKS, "toy_user_vectors", UserVectors)
    monkeypatch.setattr(registry, "get_model", lambda name: WithTables if name == "WithTables" else real_model(name))
    config = Config("WithTables", SMALL, config_dict=small_cfg(user_emb_format="npz", user_emb_dim=2,
                                                               user_emb_missing="error"), argv=[])
    dataset, model, train_data, _, _ = build(config)
    assert isinstance(model.item_tokens, torch.Tensor) and model.item_tokens_len.shape == (dataset.item_num,)
    for internal in (1, 7, dataset.item_num - 1):
        token = dataset.id2token(dataset.iid_field, internal)
        n = int(model.item_tokens_len[internal])
        assert model.item_tokens[internal, :n].tolist() == [int(c) for c in token]
        assert (model.item_tokens[internal, n:] == -1).all()
    split = TrainingSplit(config)
    for internal in (1, 5, dataset.user_num - 1):
        token = dataset.id2token(dataset.uid_field, internal)
        n_train = int((split.users == token).sum())
        assert model.user_vec[internal, 0].item() == n_train  # training interactions only
    assert not model.user_vec[0].any() and not model.item_tokens_len[0]


def test_output_made_before_a_parameter_existed_counts_as_made_with_its_default(small_cfg, toy_hooks):
    """Upgrading the package adds hook parameters; outputs made before are not conflicts when the run asks for
    the new parameter's default (the old behaviour), and are when it asks for something else."""
    config = Config("FastSASRec", SMALL, config_dict=small_cfg(), argv=[])
    hook = hooks.make_hook("toy_upstream", config)
    hook.produce()
    manifest = hook.manifest()
    del manifest["fingerprint"]["params"]["scale"]  # as written by a version without `scale`,
    manifest["digest"] = "0" * 64  # whose fingerprint (without the key) hashed to something else
    with open(hook.manifest_path, "w") as f:
        json.dump(manifest, f)
    assert hook.status() == "stale"  # same settings, other fingerprint: rebuilt without asking
    other = hooks.make_hook("toy_upstream", Config("FastSASRec", SMALL, config_dict=small_cfg(
        toy_upstream={"scale": 2.0}), argv=[]))
    assert other.status() == "conflict" and "scale=1.0" in other.conflict_message()
