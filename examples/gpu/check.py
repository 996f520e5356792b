"""GPU check: what the package costs on one accelerator, with random-weight models of the real shapes (real LLM
weights do not travel to the GPU machine; speed and memory depend on the shapes, not on the weights).

* FastSASRec vs RecBole's SASRec: seconds per training epoch and their ratio (ml-100k; --dry: a tiny dataset);
* HDRec: seconds per training step and decoder tokens/s, with a SmolLM2-135M-shaped decoder and a
  Llama-3-8B-shaped one (its first 2 of 32 layers, the real vocabulary), bf16 on CUDA;
* PtE's ``hf`` profile generation: generated tokens/s;
* the ``llm2vec`` embedding backend (bidirectional decoder, mean pooling): items/s;
* peak accelerator memory of each (``torch.cuda.max_memory_allocated``; on the CPU the process's peak RSS).

    python examples/gpu/check.py --out DIR          # on a CUDA machine (examples/gpu/check.sh carries the wheels)
    python examples/gpu/check.py --dry --out DIR    # tiny shapes on the CPU in seconds (run by the default tests)

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (the table for docs).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

#: decoder shapes (transformers ``LlamaConfig`` keys) timed on the GPU
SHAPES = {
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "Llama-3-8B (2 of 32 layers)": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                        rope_theta=500000.0),
}
DRY_SHAPES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000)}


class Peak:
    """Peak memory of one section (MiB): the accelerator's allocator on CUDA, else the process's peak RSS."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return False


def epoch_seconds(model: str, dataset: str, settings: dict) -> float:
    from recbole_llmfuse import Config
    from recbole_llmfuse.quick_start import execute

    result = execute(Config(model, dataset, config_dict={**settings, "epochs": 2}, argv=[]), saved=False,
                     test=False, verbose=False)
    return min(result.trainer.epoch_times)  # the faster of two epochs (the first pays warm-up)


def hdrec_steps(world: str, llm: str, settings: dict, steps: int) -> dict:
    from recbole_llmfuse import Config
    from recbole_llmfuse.quick_start import build, make_trainer

    config = Config("HDRec", "walks", config_dict={
        **settings, "data_path": world, "llm_path": llm, "train_batch_size": 8, "MAX_ITEM_LIST_LENGTH": 20,
        "max_tokens": 512, "item_tokens": {"max_attr_tokens": 16}, "use_align_task": True,
        "sasrec_item_table": {"hidden_size": 32, "epochs": 1, "MAX_ITEM_LIST_LENGTH": 20}}, argv=[])
    _, model, train_data, _, _ = build(config)
    make_trainer(config, model)  # what a run builds before training (the model's optimizers, frozen modules)
    batches = iter(train_data)
    model.train()
    times, tokens = [], 0
    for i in range(steps + 1):
        interaction = next(batches).to(model.device)
        sync()
        start = time.perf_counter()
        for _, terms in model.train_steps(interaction):
            sum(terms.values()).backward()
        sync()
        if i:  # the first step pays compilation and allocator warm-up
            times.append(time.perf_counter() - start)
            tokens += model.take_token_count()
        else:
            model.take_token_count()
        model.zero_grad(set_to_none=True)
    return {"step_s": sum(times) / len(times), "tokens_per_s": tokens / sum(times)}


def generation(llm: str, device: str, prompts: int, new_tokens: int) -> dict:
    from recbole_llmfuse.generation import HFGenerator

    gen = HFGenerator(llm, device=device, batch_size=8, chat_template=False, progress=False)
    requests = [{"prompt": f"widget number {i} in colour red then widget number {i + 1}"} for i in range(prompts)]
    gen.generate(requests[:2], {"max_new_tokens": 4})  # loads the weights, warms up
    sync()
    start = time.perf_counter()
    gen.generate(requests, {"max_new_tokens": new_tokens, "temperature": 0.7, "seed": 0})
    sync()
    return {"tokens_per_s": gen.generated_tokens / (time.perf_counter() - start)}


def llm2vec(llm: str, device: str, texts) -> dict:
    from recbole_llmfuse.dataset_prep.embed import make_encoder

    encoder = make_encoder({"backend": "llm2vec", "model": llm, "device": device, "batch_size": 64})
    encoder.encode(texts[:64])
    sync()
    start = time.perf_counter()
    vectors = encoder.encode(texts)
    sync()
    assert vectors.shape[0] == len(texts) and bool(torch.isfinite(torch.from_numpy(vectors)).all())
    return {"items_per_s": len(texts) / (time.perf_counter() - start)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry", action="store_true", help="tiny shapes and data on the CPU (seconds)")
    args = parser.parse_args(argv)
    import recbole_llmfuse  # noqa: F401  (compat shims)
    from recbole_llmfuse.synthetic import write_random_llama, write_walks

    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.dry and device != "cuda":
        print("no CUDA device: run with --dry for the CPU smoke version", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="gpu_check_")
    os.chdir(work)  # RecBole writes ./log, ./saved
    world = write_walks(os.path.join(work, "data"), "walks", users=40 if args.dry else 2000,
                        items=30 if args.dry else 3000, length=(8, 30))
    rows = []
    base = {"data_path": world, "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "show_progress": False,
            "state": "WARNING", "seed": 0, "loss_type": "CE", "train_neg_sample_args": None}
    seq = {**base, "MAX_ITEM_LIST_LENGTH": 10 if args.dry else 50, "hidden_size": 16 if args.dry else 64,
           "inner_size": 32 if args.dry else 256, "train_batch_size": 256 if args.dry else 2048}
    if not args.dry:  # RecBole's own copy of ml-100k
        seq = {k: v for k, v in seq.items() if k not in ("data_path", "load_col")}
    dataset = "walks" if args.dry else "ml-100k"
    with Peak() as mem:
        fast = epoch_seconds("FastSASRec", dataset, seq)
    rows.append({"what": f"FastSASRec epoch ({dataset})", "s": fast, "peak_mib": mem.mib})
    with Peak() as mem:
        ref = epoch_seconds("SASRec", dataset, seq)
    rows.append({"what": f"RecBole SASRec epoch ({dataset})", "s": ref, "peak_mib": mem.mib, "ratio": fast / ref})
    texts = [line.split("\t")[1].strip() for line in open(os.path.join(world, "walks", "walks.item")).readlines()[1:]]
    prompts = texts + ["Provide the next item's hidden state for each [SEQ]. User's history: ",
                       "Provide the item's hidden state for [ALIGN]. Item Description: "]
    for name, shape in (DRY_SHAPES if args.dry else SHAPES).items():
        llm = write_random_llama(os.path.join(work, name.split()[0]), prompts, lm_head=True, dtype="bfloat16",
                                 max_position_embeddings=4096, **shape)
        with Peak() as mem:
            step = hdrec_steps(world, llm, base, steps=2 if args.dry else 20)
        rows.append({"what": f"HDRec step, {name}", "s": step["step_s"], "tokens_per_s": step["tokens_per_s"], "peak_mib": mem.mib})
        with Peak() as mem:
            gen = generation(llm, device, prompts=8 if args.dry else 64, new_tokens=8 if args.dry else 128)
        rows.append({"what": f"PtE hf generation, {name}", "tokens_per_s": gen["tokens_per_s"], "peak_mib": mem.mib})
        with Peak() as mem:
            enc = llm2vec(llm, device, texts if args.dry else texts * 4)
        rows.append({"what": f"llm2vec embedding, {name}", "items_per_s": enc["items_per_s"], "peak_mib": mem.mib})
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": "bfloat16" if device == "cuda" else "float32", "dry": args.dry}
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    fmt = lambda v: "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    cols = ["what", "s", "ratio", "tokens_per_s", "items_per_s", "peak_mib"]
    table = (f"{env['device']}, torch {env['torch']}, {env['dtype']}\n\n| " + " | ".join(cols) + " |\n|"
             + "---|" * len(cols) + "\n" + "".join("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |\n" for r in rows))
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
