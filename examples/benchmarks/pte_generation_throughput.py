"""Throughput of the ``hf`` generation backend against a plain batched ``model.generate`` on the same prompts.

The prompts are real PtE user-profile prompts (Eq. 6: history + overlap neighbours) of the first ``--users``
users of a dataset's training split, built by the ``pte_profiles`` hook itself. Both sides use the same loaded
model, batch size, greedy decoding and ``max_new_tokens``: (A) ``HFGenerator.generate`` (chat template,
length-sorted batches, progress bar) and (B) the prompts rendered the same way, tokenised in their given order
and passed to ``model.generate`` batch by batch. A and B alternate ``--pairs`` times (odd pairs B first); each prints generated
tokens / second (non-padding tokens after the prompt) and the per-pair ratio A/B with its median.

    python examples/benchmarks/pte_generation_throughput.py --dataset ml-100k --users 16 --pairs 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import recbole_llmfuse  # noqa: F401
from recbole_llmfuse.config import Config
from recbole_llmfuse.dataset_prep.hooks import make_hook
from recbole_llmfuse.dataset_prep.profiles import overlap_neighbors
from recbole_llmfuse.generation import HFGenerator


def prompts(args) -> list:
    params = {"history_items": args.history_items, "num_neighbors": args.neighbors, "neighbor_items": 5}
    config = Config("FastSASRec", args.dataset, argv=[], config_dict={"data_path": args.data_path,
                                                                       "pte_profiles": params, "state": "WARNING"})
    hook = make_hook("pte_profiles", config)
    hist = hook.split.user_histories()
    users = sorted(hist, key=int)[: args.users] if all(u.isdigit() for u in hist) else sorted(hist)[: args.users]
    neighbors = overlap_neighbors(hist, args.neighbors, targets=users)
    items = hook._item_texts()
    p = hook.params
    return [p["prompt_user"].format(domain="movies", **hook._user_request(hist[u], neighbors[u], hist, items)["prompt_fields"])
            for u in users]


def plain(gen: HFGenerator, texts: list, batch: int, max_new: int) -> int:
    made = 0
    for b in range(0, len(texts), batch):
        enc = gen.tokenizer([gen.render(t) for t in texts[b:b + batch]], return_tensors="pt", padding=True,
                            add_special_tokens=False)
        enc.pop("token_type_ids", None)
        with torch.no_grad():
            out = gen.model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                     pad_token_id=gen.tokenizer.pad_token_id)[:, enc["input_ids"].shape[1]:]
        made += int((out != gen.tokenizer.pad_token_id).sum())
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default="dataset/")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--history_items", type=int, default=20)
    parser.add_argument("--neighbors", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    texts = prompts(args)
    gen = HFGenerator(args.model, batch_size=args.batch_size, progress=False, device="cpu")
    n_prompt = [len(gen.tokenizer(gen.render(t), add_special_tokens=False)["input_ids"]) for t in texts]
    print(f"{len(texts)} prompts, {statistics.mean(n_prompt):.0f} prompt tokens on average, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens at most, torch threads {torch.get_num_threads()}")
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
    requests = [{"prompt": t, "fields": {}} for t in texts]
    ratios = []
    for pair in range(args.pairs):
        timed = {}
        # odd pairs run B first: neither side always gets the warmer caches
        for side in ("A", "B") if pair % 2 == 0 else ("B", "A"):
            start = time.perf_counter()
            if side == "A":
                gen.generate(requests, sampling)
                tokens = gen.generated_tokens  # counted as in plain(): non-padding ids after the prompt
            else:
                tokens = plain(gen, texts, args.batch_size, args.max_new_tokens)
            timed[side] = (tokens, time.perf_counter() - start)
        (a_tokens, a_time), (b_tokens, b_time) = timed["A"], timed["B"]
        a_rate, b_rate = a_tokens / a_time, b_tokens / b_time
        ratios.append(a_rate / b_rate)
        print(f"pair {pair}: hf backend {a_rate:.1f} tokens/s ({a_tokens} tokens), plain generate {b_rate:.1f} "
              f"tokens/s ({b_tokens} tokens), ratio {ratios[-1]:.3f}", flush=True)
    print(f"median ratio hf backend / plain generate: {statistics.median(ratios):.3f} over {len(ratios)} pairs")


if __name__ == "__main__":
    main()
