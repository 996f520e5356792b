"""How hard each FAERec loss term pulls on the ID table while training (diagnostic for issue #7).

    python examples/benchmarks/faerec_grad_balance.py --steps 120 --every 10 \
        --config_files examples/bench_faerec_ml100k.yaml [--key=value ...]

Trains FAERec as usual (its own total loss, Adam) and, every ``--every`` optimizer steps, prints the value of
each term and the norm of the gradient it sends to the ID table ``E_ID`` and to the text adapter ``f``: the recommendation loss, the
weighted item-level term ``alpha * w_I * ILA`` and the weighted feature-level term ``alpha * (1 - w_I) * FLA``
(``w_I`` from the curriculum at that step), for the whole table and as the mean per-row norm over head and
tail items (top 20% / other 80% by training popularity). Writes ``grad_balance.csv`` and ``grad_balance.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import os

import torch

import recbole_llmfuse
from recbole_llmfuse.files import png_figure, write_csv
from recbole_llmfuse.stats import item_groups, training_counts
from recbole_llmfuse.quick_start import build


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config_files", default=None)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default="grad_balance_out")
    args, overrides = parser.parse_known_args(argv)
    from recbole.utils import init_seed

    config = recbole_llmfuse.Config("FAERec", args.dataset, config_file_list=args.config_files.split() if args.config_files else None,
                                    config_dict={"show_progress": False}, argv=overrides)
    init_seed(config["seed"], config["reproducibility"])
    _, model, train_data, _, _ = build(config)
    if model.alpha == 0 or not (model.use_ila and model.use_fla):
        parser.error("this diagnostic needs both alignment terms on: align_alpha > 0, use_ila and use_fla true")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    table = model.fusion.id.weight
    adapter = [p for p in model.fusion.adapter.parameters() if p.requires_grad]
    counts, _ = training_counts(train_data.dataset)
    is_head = torch.from_numpy(item_groups(counts, config["head_item_ratio"] or 0.2, 1)["is_head"])
    items = torch.arange(len(is_head))
    groups = {"head": items[is_head], "tail": items[1:][~is_head[1:]]}  # the evaluation's 20/80 rule
    rows, step = [], 0
    while step < args.steps:
        for batch in train_data:
            batch = batch.to(config["device"])
            model.steps += 1  # as FAERec.calculate_loss does before weighting
            raw, weights = model.loss_terms(batch), model.loss_weights()
            terms = {name: weights[name] * term for name, term in raw.items()}
            if step % args.every == 0:
                row = {"step": step, "w_I": weights["ila"] / model.alpha, "rec": raw["rec"].item(),
                       "ILA": raw["ila"].item(), "FLA": raw["fla"].item()}
                for name, term in terms.items():
                    grad = torch.autograd.grad(term, table, retain_graph=True, allow_unused=True)[0]
                    grad = torch.zeros_like(table) if grad is None else grad
                    row[f"grad_{name}"] = grad.norm().item()
                    for group, rows_of in groups.items():  # mean per-row gradient norm in the group
                        row[f"grad_{name}_{group}"] = grad[rows_of].norm(dim=1).mean().item()
                    adapter_grads = [g for g in torch.autograd.grad(term, adapter, retain_graph=True, allow_unused=True)
                                     if g is not None]
                    row[f"grad_{name}_adapter"] = float(sum(g.norm() ** 2 for g in adapter_grads) ** 0.5)
                rows.append(row)
                print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
            optimizer.zero_grad()
            sum(terms.values()).backward()
            optimizer.step()
            step += 1
            if step >= args.steps:
                break
    write_csv(os.path.join(args.out, "grad_balance.csv"), rows, list(rows[0]))
    titles = {"head": "ID rows of head items (mean per-row norm)", "tail": "ID rows of tail items (mean per-row norm)",
              "adapter": "text adapter f (norm over its parameters)"}
    with png_figure(os.path.join(args.out, "grad_balance.png"), ncols=3, figsize=(15, 4)) as (fig, axes):
        for ax, part in zip(axes, ("head", "tail", "adapter")):
            for name, label in (("rec", "recommendation (BCE)"), ("ila", "α·w_I·ILA"), ("fla", "α·(1−w_I)·FLA")):
                ax.plot([r["step"] for r in rows], [r[f"grad_{name}_{part}"] or float("nan") for r in rows], marker="o",
                        label=label)
            ax.set_yscale("log")
            ax.set_xlabel("optimizer step")
            ax.set_title(titles[part], fontsize=10)
        axes[0].set_ylabel("gradient norm")
        axes[0].legend()
        fig.suptitle("FAERec on ml-100k: gradient each loss term sends (the FLA weight is 0 where w_I = 1)", fontsize=10)
    print(f"wrote {args.out}/grad_balance.csv and grad_balance.png")


if __name__ == "__main__":
    main()
