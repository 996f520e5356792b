"""Small synthetic data and random-weight LLMs, for smoke tests and timings of code paths where real data or real
weights are not the point (the test suite, ``examples/gpu/check.py``, a new model's first run).

* :func:`write_walks` — atomic files of users walking the item catalogue in fixed steps: sequential signal a model
  learns in a few epochs (hit@10 near 1) while a popularity ranker cannot (about 0.33 with 40 items);
* :func:`write_amazon_category` — review and metadata files in the Amazon Reviews 2018 format (gzipped JSON lines,
  for ``recbole-llmfuse prep amazon``) of a made-up grocery category with a long tail, in which an item's title
  names its product line and users mostly move on within a line: ID models learn the transitions of frequent
  items, and the titles tell which line a rarely seen item belongs to;
* :func:`write_random_llama` — a randomly initialised Llama of any shape with a word-level tokenizer trained in
  process (no hub access), saved as a local Hugging Face folder that every LLM path here loads.
"""
from __future__ import annotations

import gzip
import json
import os
import random
from typing import Iterable, Optional, Tuple

from recbole_llmfuse.files import atomic_write, atomic_write_text


def write_walks(root: str, name: str, users: int = 60, items: int = 40, length: Tuple[int, int] = (6, 14),
                steps: Tuple[int, ...] = (1, 3), seed: int = 0) -> str:
    """``<root>/<name>/<name>.{inter,item}``: each user starts at a random item and moves ``step`` items on (a step
    drawn per user from ``steps``, modulo ``items``) for a length drawn from ``length``; items are ``i1..iN`` with
    a title ``widget <n>`` and a brand (``acme``, ``globex`` or empty). Returns ``root`` (RecBole's ``data_path``)."""
    folder = os.path.join(root, name)
    rng = random.Random(seed)
    inter = ["user_id:token\titem_id:token\ttimestamp:float\n"]
    for u in range(1, users + 1):
        item, step = rng.randrange(items), rng.choice(steps)
        for t in range(rng.randint(*length)):
            inter.append(f"u{u}\ti{item + 1}\t{1000 * u + t}\n")
            item = (item + step) % items
    item_rows = ["item_id:token\ttitle:token_seq\tbrand:token\n"]
    item_rows += [f"i{i}\twidget {i}\t{['acme', 'globex', ''][i % 3]}\n" for i in range(1, items + 1)]
    # each file by rename, .item first: a folder whose .inter exists holds both whole
    atomic_write_text(os.path.join(folder, f"{name}.item"), "".join(item_rows))
    atomic_write_text(os.path.join(folder, f"{name}.inter"), "".join(inter))
    return root


#: product lines of :func:`write_amazon_category` (an item's title names its line)
PRODUCT_LINES = (
    "green tea", "black tea", "herbal tea", "dark chocolate", "milk chocolate", "trail mix", "roasted almonds",
    "salted cashews", "oat cereal", "honey granola", "penne pasta", "basmati rice", "olive oil", "hot sauce",
    "coffee beans", "instant coffee", "protein bar", "energy drink", "sparkling water", "potato chips", "pretzels",
    "microwave popcorn", "wildflower honey", "peanut butter", "strawberry jam", "maple syrup", "baking flour",
    "cane sugar", "curry spice", "tomato soup", "black beans", "canned tuna", "wheat crackers", "oatmeal cookies",
    "fruit gummies", "peppermint mints", "dog treats", "cat food", "paper towels", "dish soap",
)
_VARIANTS = ("organic", "classic", "original", "low sugar", "family size", "sea salt", "vanilla", "spicy",
             "unsweetened", "extra crunchy", "gluten free", "value pack", "single serve", "reserve", "lite")
_BRANDS = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka")


def write_amazon_category(folder: str, name: str = "Synthetic_Pantry", users: int = 1500, items: int = 1000,
                          seed: int = 0) -> Tuple[str, str]:
    """``<folder>/<name>.json.gz`` (reviews) and ``meta_<name>.json.gz`` in the Amazon Reviews 2018 format; returns
    their paths. Items are spread over :data:`PRODUCT_LINES` (line popularity and item popularity within a line
    both Zipf-like, so most items are rarely bought); each user prefers two lines and buys 3 + Geometric(0.15)
    items (at most 40): the next item is the following one of the same line (60%), another item of the line by
    popularity (25%) or an item of another preferred or random line (15%). Ratings are mostly 4-5."""
    rng = random.Random(seed)
    lines = [[] for _ in PRODUCT_LINES]
    line_weight = [1 / (k + 1) ** 0.8 for k in range(len(PRODUCT_LINES))]
    for i in range(items):
        lines[rng.choices(range(len(lines)), line_weight)[0] if i >= len(lines) else i].append(i)
    meta = []
    for li, members in enumerate(lines):
        for rank, i in enumerate(members):
            variant, brand = _VARIANTS[rank % len(_VARIANTS)], _BRANDS[(i * 7) % len(_BRANDS)]
            title = f"{brand} {PRODUCT_LINES[li]}, {variant}, pack of {1 + rank % 6}"
            meta.append({"asin": f"B{i:06d}", "title": title, "brand": brand,
                         "category": ["Grocery & Gourmet Food", PRODUCT_LINES[li].title()],
                         "description": [f"{variant.capitalize()} {PRODUCT_LINES[li]} from {brand}."],
                         "price": f"${2 + (i % 17) * 0.75:.2f}"})
    weights = [[1 / (rank + 1) ** 1.2 for rank in range(len(m))] for m in lines]
    reviews = []
    for u in range(users):
        favourite = rng.choices(range(len(lines)), line_weight, k=2)
        length = 3
        while length < 40 and rng.random() > 0.15:
            length += 1
        li = favourite[0]
        rank = rng.choices(range(len(lines[li])), weights[li])[0]
        t = 1_400_000_000 + rng.randrange(50_000_000)
        for _ in range(length):
            item = lines[li][rank]
            rating = rng.choices((5, 4, 3, 2, 1), (50, 30, 10, 6, 4))[0]
            reviews.append({"reviewerID": f"A{u:07d}", "asin": f"B{item:06d}", "overall": float(rating),
                            "unixReviewTime": t, "reviewText": "good", "summary": "ok", "verified": True})
            t += rng.randrange(3_600, 30 * 86_400)
            step = rng.random()
            if step < 0.6 and rank + 1 < len(lines[li]):
                rank += 1
            elif step < 0.85:
                rank = rng.choices(range(len(lines[li])), weights[li])[0]
            else:
                li = rng.choice(favourite + [rng.randrange(len(lines))])
                rank = rng.choices(range(len(lines[li])), weights[li])[0]
    paths = os.path.join(folder, f"{name}.json.gz"), os.path.join(folder, f"meta_{name}.json.gz")
    for path, records in zip(paths, (reviews, meta)):
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(path, lambda f, text=text: f.write(gzip.compress(text.encode("utf-8"), mtime=0)))
    return paths


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
