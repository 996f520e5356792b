"""FastSASRec vs RecBole's SASRec: training epoch time and test quality, same config and seeds.

Runs the models alternately (seed by seed, so drift on a shared machine hits both alike) through
recbole_llmfuse's ``run_recbole`` and times every training epoch and every evaluation inside the
process. Writes ``results.csv``, ``results.md`` (mean ± std over seeds, epoch-time ratio vs the first
model) and ``epoch_time.png`` to ``--out``.

    python examples/benchmarks/encoder_speed.py --seeds 0,1,2 --epochs 4 --out bench_out/encoder
    python examples/benchmarks/encoder_speed.py --epochs 1 --MAX_ITEM_LIST_LENGTH=20   # overrides
"""
from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict

import recbole_llmfuse  # noqa: F401
from recbole_llmfuse.config import Config
from recbole_llmfuse.files import atomic_write_text, png_figure, write_csv
from recbole_llmfuse.quick_start import execute


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="SASRec,FastSASRec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default="bench_out/encoder")
    args, overrides = parser.parse_known_args(argv)
    models = args.models.split(",")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for model in models:
            config = Config(model, args.dataset, argv=overrides, config_dict={
                "seed": seed, "epochs": args.epochs, "show_progress": False, "stopping_step": 1000})
            run = execute(config)
            row = {
                "model": model,
                "seed": seed,
                "epoch_s": statistics.mean(run.trainer.epoch_times),
                "eval_s": statistics.mean(run.trainer.eval_times),
                **{f"test_{k}": float(v) for k, v in run.test_result.items()},
            }
            rows.append(row)
            print(f"[{model} seed={seed}] epoch {row['epoch_s']:.1f}s  test ndcg@10 {row['test_ndcg@10']:.4f}", flush=True)

    write_csv(os.path.join(args.out, "results.csv"), rows, list(rows[0]))

    by_model = defaultdict(list)
    for row in rows:
        by_model[row["model"]].append(row)
    base = models[0]
    ratios = {
        m: [r["epoch_s"] / b["epoch_s"] for r, b in zip(by_model[m], by_model[base])] for m in models
    }
    lines = [
        f"dataset {args.dataset}, {args.epochs} epochs, seeds {args.seeds}, overrides {' '.join(overrides) or 'none'}",
        "",
        f"| model | epoch time / {base} epoch time (paired by seed) | test NDCG@10 | test Recall@10 | eval s / {base} eval s |",
        "|---|---|---|---|---|",
    ]
    for m in models:
        r_mean, r_std = mean_std(ratios[m])
        n_mean, n_std = mean_std([r["test_ndcg@10"] for r in by_model[m]])
        c_mean, c_std = mean_std([r["test_recall@10"] for r in by_model[m]])
        e_ratio = statistics.mean(r["eval_s"] for r in by_model[m]) / statistics.mean(r["eval_s"] for r in by_model[base])
        lines.append(
            f"| {m} | {r_mean:.3f} ± {r_std:.3f} | {n_mean:.4f} ± {n_std:.4f} | {c_mean:.4f} ± {c_std:.4f} | {e_ratio:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(args.out, "results.md"), table)
    print(table)

    with png_figure(os.path.join(args.out, "epoch_time.png"), ncols=2, figsize=(9, 3.5)) as (fig, (ax1, ax2)):
        ax1.bar(models, [statistics.mean(ratios[m]) for m in models], yerr=[mean_std(ratios[m])[1] for m in models])
        ax1.set_ylabel(f"epoch time / {base}")
        ax1.axhline(0.5, ls="--", c="grey", lw=1)
        ax2.bar(models, [mean_std([r["test_ndcg@10"] for r in by_model[m]])[0] for m in models],
                yerr=[mean_std([r["test_ndcg@10"] for r in by_model[m]])[1] for m in models])
        ax2.set_ylabel("test NDCG@10")
        fig.suptitle(f"{args.dataset}: {args.epochs} epochs, seeds {args.seeds}")


if __name__ == "__main__":
    main()
