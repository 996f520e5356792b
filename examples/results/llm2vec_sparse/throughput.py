"""Throughput of the llm2vec backend vs a raw forward of the same model on the same batches (same run)."""
import sys, time, json, numpy as np, torch
from recbole_llmfuse.dataset_prep.embed import make_encoder
from recbole_llmfuse.dataset_prep.item_text import build_item_texts
from recbole_llmfuse.data import embedded_dataset_dir
items = build_item_texts(embedded_dataset_dir("ml-100k"), "ml-100k")
texts = items.texts[: int(sys.argv[1])]
enc = make_encoder({"backend": "llm2vec", "model": "SmolLM2-135M-Instruct", "device": "cpu", "batch_size": 32})
order = np.argsort([-len(t) for t in texts], kind="stable")
batches = [enc.tokenize([texts[i] for i in order[s:s + 32]]) for s in range(0, len(texts), 32)]
def raw():
    with torch.no_grad():
        for f in batches:
            enc.model(input_ids=f["input_ids"], attention_mask=f["attention_mask"])
res = {"backend": [], "raw": []}
enc.encode(texts[:32]); raw()  # warm-up
for rep in range(3):
    t = time.perf_counter(); enc.encode(texts); res["backend"].append(len(texts) / (time.perf_counter() - t))
    t = time.perf_counter(); raw(); res["raw"].append(len(texts) / (time.perf_counter() - t))
out = {k: sorted(v) for k, v in res.items()}
out["ratio_of_best"] = max(res["backend"]) / max(res["raw"])
out["ratio_per_rep"] = [b / r for b, r in zip(res["backend"], res["raw"])]
print(json.dumps(out, indent=1))
