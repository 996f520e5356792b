"""Small synthetic data and random-weight LLMs, for smoke tests and timings of code paths where real data or real
weights are not the point (the test suite, ``examples/gpu/check.py``, a new model's first run).

* :func:`write_walks` — atomic files of users walking the item catalogue in fixed steps: sequential signal a model
  learns in a few epochs (hit@10 near 1) while a popularity ranker cannot (about 0.33 with 40 items);
* :func:`write_random_llama` — a randomly initialised Llama of any shape with a word-level tokenizer trained in
  process (no hub access), saved as a local Hugging Face folder that every LLM path here loads.
"""
from __future__ import annotations

import os
import random
from typing import Iterable, Optional, Tuple


def write_walks(root: str, name: str, users: int = 60, items: int = 40, length: Tuple[int, int] = (6, 14),
                steps: Tuple[int, ...] = (1, 3), seed: int = 0) -> str:
    """``<root>/<name>/<name>.{inter,item}``: each user starts at a random item and moves ``step`` items on (a step
    drawn per user from ``steps``, modulo ``items``) for a length drawn from ``length``; items are ``i1..iN`` with
    a title ``widget <n>`` and a brand (``acme``, ``globex`` or empty). Returns ``root`` (RecBole's ``data_path``)."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u in range(1, users + 1):
            item, step = rng.randrange(items), rng.choice(steps)
            for t in range(rng.randint(*length)):
                f.write(f"u{u}\ti{item + 1}\t{1000 * u + t}\n")
                item = (item + step) % items
    with open(os.path.join(folder, f"{name}.item"), "w") as f:
        f.write("item_id:token\ttitle:token_seq\tbrand:token\n")
        for i in range(1, items + 1):
            f.write(f"i{i}\twidget {i}\t{['acme', 'globex', ''][i % 3]}\n")
    return root


def write_random_llama(path: str, texts: Iterable[str], lm_head: bool = False, dtype: Optional[str] = None,
                       seed: int = 0, **shape) -> str:
    """A random-weight Llama (``transformers.LlamaConfig`` keys in ``shape``; ``vocab_size`` at least the
    tokenizer's) with a word-level tokenizer trained on ``texts``, saved to ``path``. ``lm_head``: a causal LM
    (generation) rather than the bare decoder; ``dtype``: the saved weights' dtype (e.g. ``bfloat16``).
    Built on the GPU when there is one (an 8B-shaped layer takes seconds there, minutes on a CPU)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(**{"max_position_embeddings": 512, **shape,
                            "vocab_size": max(int(shape.get("vocab_size", 0)), len(fast))})
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = (LlamaForCausalLM if lm_head else LlamaModel)(config)
    if dtype:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    return str(path)
