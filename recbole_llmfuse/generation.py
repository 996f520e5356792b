"""Text generation for preparation hooks (PtE's profiles): one interface, cached per record.

A backend turns a list of requests into texts. A request is a dict with ``prompt`` (the text an LLM reads)
and ``fields`` (the structured values the prompt was made from, which the ``template`` backend formats
without an LLM). Backends:

* ``template`` — ``template.format(**fields)``: deterministic profile text from titles/genres, no LLM (tests, a
  baseline);
* ``hf`` — any local Hugging Face causal LM (``llm_path`` rules of :mod:`recbole_llmfuse.llm`, GGUF included),
  batched ``model.generate`` over length-sorted, left-padded batches, greedy or sampled, optional PEFT adapter
  (a tuned profiler plugs in here), chat template when the tokenizer has one; a progress bar with tokens/s;
* ``openai`` — any OpenAI-compatible server (vLLM, llama.cpp's ``llama-server``, TGI, OpenAI) at ``base_url``
  through the official ``openai`` client: chat or plain completions, ``concurrency`` requests in flight,
  the client's own retries with exponential backoff (``max_retries``) and ``timeout``; an unreachable server
  is one error naming the URL.

``sampling`` (every backend): ``max_new_tokens`` (required: the hook's YAML holds the default), ``temperature``
(0 = greedy), optional ``top_p`` and ``seed``.

:func:`cached_generate` keys every request by (backend fingerprint, prompt, sampling settings) in a
:class:`~recbole_llmfuse.dataset_prep.hooks.RecordCache`: a rerun generates nothing, an interrupted run
resumes with the records it committed (each batch is committed as it finishes).
"""
from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import Dict, List, Optional

from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.llm import (
    adapter_digest,
    default_device,
    default_gguf_file,
    load_causal_lm,
    load_tokenizer,
    tokenizer_fingerprint,
)


class TemplateGenerator:
    """``template.format(**request["fields"])`` for every request."""

    def __init__(self, template: str, **_):
        self.template = template

    def fingerprint(self) -> str:
        return "template:" + hashlib.sha256(self.template.encode()).hexdigest()

    def generate(self, requests: List[dict], sampling: dict) -> List[str]:
        try:
            return [self.template.format(**r["fields"]) for r in requests]
        except KeyError as err:
            raise ConfigError(f"template backend: the template names {err}, which the requests do not have; "
                              f"fields: {sorted(requests[0]['fields'])}") from None


class HFGenerator:
    """Batched generation with a local causal LM (see module docstring)."""

    def __init__(self, model: str, gguf_file: Optional[str] = None, adapter: Optional[str] = None,
                 device: Optional[str] = None, dtype: Optional[str] = None, batch_size: int = 8,
                 chat_template: bool = True, progress: bool = True, **_):
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(model, gguf_file)
        self.tokenizer.padding_side = "left"  # generation continues every row from its last token
        self._load = (model, default_gguf_file(model, gguf_file), adapter, dtype)
        # adapter: one folder or a list (merged in order); its weights' digest keys the cache (a retuned adapter at
        # the same path is another model)
        self.name = f"hf:{model}|{self._load[1]}|{adapter_digest(adapter)}"
        self.batch_size, self.chat, self.progress = int(batch_size), bool(chat_template), progress

    @functools.cached_property
    def model(self):
        """Loaded on first use: a rerun whose records are all cached never loads the weights."""
        model, gguf_file, adapter, dtype = self._load
        return load_causal_lm(model, self.device, dtype, gguf_file, adapters=adapter)

    def fingerprint(self) -> str:
        return self.name + ":" + tokenizer_fingerprint(self.tokenizer)[:16]

    def render(self, prompt: str) -> str:
        if self.chat and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt

    def generate(self, requests: List[dict], sampling: dict) -> List[str]:
        import torch
        from tqdm.auto import tqdm

        texts = [self.render(r["prompt"]) for r in requests]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # similar lengths share a batch
        out: List[Optional[str]] = [None] * len(texts)
        bar = tqdm(total=len(texts), unit="record", desc="generating", disable=not self.progress)
        made, start = 0, time.perf_counter()
        do_sample = float(sampling.get("temperature", 0.0)) > 0
        kwargs = {"max_new_tokens": int(sampling["max_new_tokens"]), "do_sample": do_sample,
                  "pad_token_id": self.tokenizer.pad_token_id}
        if do_sample:
            kwargs.update(temperature=float(sampling["temperature"]), top_p=float(sampling.get("top_p", 1.0)))
            torch.manual_seed(int(sampling.get("seed", 0)))
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                 add_special_tokens=not self.chat).to(self.device)
            enc.pop("token_type_ids", None)  # BERT-style tokenizers add it; causal LMs take no such input
            with torch.no_grad():
                gen = self.model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, gen):
                out[i] = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            made += int((gen != self.tokenizer.pad_token_id).sum())
            bar.update(len(idx))
            bar.set_postfix_str(f"{made / (time.perf_counter() - start):.1f} tokens/s")
        bar.close()
        self.generated_tokens = made  # of the last call: non-padding tokens after the prompts
        return out


class OpenAIGenerator:
    """Requests to an OpenAI-compatible server (see module docstring). ``api_key``: the key itself, else the
    environment variable ``api_key_env`` (servers that check none accept any string). ``extra_body``: server
    specific sampling settings passed through (e.g. vLLM's ``top_k``, ``repetition_penalty``)."""

    def __init__(self, model: str, base_url: str, api_key: Optional[str] = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 120.0, max_retries: int = 5, chat_template: bool = True,
                 extra_body: Optional[dict] = None, progress: bool = True, **_):
        import os

        try:
            import openai
        except ImportError:
            raise ConfigError("generation backend 'openai' needs the openai package: pip install 'recbole-llmfuse[llm]'") \
                from None
        if not base_url:
            raise ConfigError("generation backend 'openai' needs base_url, e.g. http://localhost:8000/v1 (vllm serve) "
                              "or http://localhost:8080/v1 (llama-server)")
        self.openai = openai
        # the client retries connection errors, 408/409/429 and 5xx with exponential backoff and jitter
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get(api_key_env) or "EMPTY",
                                    timeout=float(timeout), max_retries=int(max_retries))
        self.model, self.base_url, self.chat = model, base_url, bool(chat_template)
        self.concurrency, self.extra_body, self.progress = max(1, int(concurrency)), extra_body or {}, progress

    def fingerprint(self) -> str:
        extra = f"|{json.dumps(self.extra_body, sort_keys=True)}" if self.extra_body else ""  # it can change outputs
        return f"openai:{self.base_url}|{self.model}|{'chat' if self.chat else 'completion'}{extra}"

    def _one(self, prompt: str, sampling: dict):
        kwargs = {"model": self.model, "max_tokens": int(sampling["max_new_tokens"]),
                  "temperature": float(sampling.get("temperature", 0.0)), "extra_body": self.extra_body or None}
        for key in ("top_p", "seed"):
            if sampling.get(key) is not None:
                kwargs[key] = sampling[key]
        try:
            if self.chat:
                r = self.client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kwargs)
                text = r.choices[0].message.content or ""
            else:
                r = self.client.completions.create(prompt=prompt, **kwargs)
                text = r.choices[0].text or ""
        except self.openai.APIConnectionError as err:
            raise ConfigError(f"openai backend: cannot reach {self.base_url} ({err.__class__.__name__}: {err}); "
                              f"start the server (e.g. `vllm serve MODEL`, `llama-server -m FILE`) or fix base_url") \
                from None
        except self.openai.APIStatusError as err:
            raise ConfigError(f"openai backend: {self.base_url} answered HTTP {err.status_code} for model "
                              f"'{self.model}': {str(err)[:300]}") from None
        tokens = getattr(getattr(r, "usage", None), "completion_tokens", None) or len(text.split())
        return text.strip(), int(tokens)

    def check_reachable(self) -> None:
        """A refused port or an unknown host cannot recover: fail at once, not after the client's retries with
        backoff (about a minute); timeouts and 5xx stay the client's to retry."""
        import socket
        from urllib.parse import urlparse

        if getattr(self, "_reached", False):
            return
        url = urlparse(self.base_url)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
        except (ConnectionRefusedError, socket.gaierror) as err:
            raise ConfigError(f"openai backend: cannot reach {self.base_url} ({err.__class__.__name__}: {err}); start "
                              f"the server (e.g. `vllm serve MODEL`, `transformers serve MODEL`) or fix base_url") from None
        except OSError:
            pass  # slow rather than wrong: the client's retries decide
        self._reached = True

    def generate(self, requests: List[dict], sampling: dict) -> List[str]:
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        self.check_reachable()
        out: List[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), unit="record", desc="generating", disable=not self.progress)
        made, start = 0, time.perf_counter()
        # requests are I/O-bound: a thread pool keeps `concurrency` of them in flight (the client is thread-safe)
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._one, r["prompt"], sampling) for r in requests]
            for i, f in enumerate(futures):
                out[i], n = f.result()
                made += n
                bar.update(1)
                bar.set_postfix_str(f"{made / max(time.perf_counter() - start, 1e-9):.1f} tokens/s")
        bar.close()
        return out


BACKENDS = {"template": TemplateGenerator, "hf": HFGenerator, "openai": OpenAIGenerator}


def make_generator(backend: str, **params):
    if backend not in BACKENDS:
        raise ConfigError(f"generation backend '{backend}': choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend](**params)


def cached_generate(generator, requests: List[dict], sampling: dict, cache, chunk: int = 32) -> Dict[str, object]:
    """Texts of ``requests`` (in order) from ``cache`` where present, else generated ``chunk`` at a time and
    committed as each chunk finishes. Returns ``{"texts": [...], "generated": n, "cached": n}``."""
    fp = generator.fingerprint()
    keys = [cache.key(fp, r["prompt"] if "prompt" in r else json.dumps(r["fields"], sort_keys=True), sampling)
            for r in requests]
    found = cache.get_many(keys)
    todo = [i for i, k in enumerate(keys) if k not in found]
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        texts = generator.generate([requests[i] for i in part], sampling)
        fresh = {keys[i]: t for i, t in zip(part, texts)}
        cache.put_many(fresh)
        found.update(fresh)
    return {"texts": [found[k] for k in keys], "generated": len(todo), "cached": len(keys) - len(todo)}
