"""Embedding hook vs raw ``SentenceTransformer.encode`` on the same item texts, alternately in one process.

    python examples/benchmarks/embed_throughput.py --dataset ml-100k --rounds 3

Reports items/s of: raw ``encode`` (model already loaded), the hook's encoding phase (shards, checks,
part files), the hook end to end (model load + text + encoding + writing .npz and .itememb), and the
time of an unchanged re-run (cache hit).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import recbole_llmfuse  # noqa: F401
from recbole_llmfuse.data import dataset_folder
from recbole_llmfuse.dataset_prep.embed import ItemTextEmbeddingHook, resolve_model_path
from recbole_llmfuse.dataset_prep.item_text import build_item_texts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    from sentence_transformers import SentenceTransformer

    work = tempfile.mkdtemp()
    source = dataset_folder(args.dataset, work)
    texts = build_item_texts(source, args.dataset).texts
    model = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")
    model.encode(texts[:64])
    raw, phase, total, cached = [], [], [], []
    for r in range(args.rounds):
        start = time.perf_counter()
        model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)
        raw.append(len(texts) / (time.perf_counter() - start))
        folder = os.path.join(work, f"round{r}", args.dataset)
        shutil.copytree(source, folder)
        hook = ItemTextEmbeddingHook(folder, args.dataset, {"device": "cpu", "batch_size": args.batch_size})
        report = hook.run(progress=False)
        phase.append(report["encode_items_per_s"])
        total.append(report["items"] / report["seconds"])
        start = time.perf_counter()
        assert ItemTextEmbeddingHook(folder, args.dataset, {"device": "cpu", "batch_size": args.batch_size}).status() == "fresh"
        cached.append(time.perf_counter() - start)
    med = statistics.median
    print(f"{args.dataset}: {len(texts)} items, {args.rounds} rounds (medians)")
    print(f"raw SentenceTransformer.encode : {med(raw):8.1f} items/s")
    print(f"hook, encoding phase           : {med(phase):8.1f} items/s  ratio {med(p / r for p, r in zip(phase, raw)):.3f}")
    print(f"hook, end to end (load+write)  : {med(total):8.1f} items/s  ratio {med(t / r for t, r in zip(total, raw)):.3f}")
    print(f"unchanged re-run (cache check) : {med(cached) * 1000:8.1f} ms")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
