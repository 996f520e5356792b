"""The ``item_encoder_lora`` hook: LoRA-tune an item text encoder on the training split's co-occurrences.

Any ``item_text_embedding`` backend (sentence-transformers, hf, llm2vec) gets a PEFT LoRA adapter, trained with an
in-batch InfoNCE objective on item pairs ``(s_t, s_t+k)``, ``1 <= k <= window``, of the training split's user
sequences (LLMEmb / LLM2Rec-style collaborative tuning of the text encoder); then the item table is written by the
embedding hook's own sharded path with the adapter merged. Outputs: ``<dataset>.<suffix>.npz`` (+ text twin),
``<dataset>.<suffix>.adapter/`` (PEFT ``save_pretrained``; its ``tuning.json`` records the run). The fingerprint
covers the settings, the ``.item`` file, the model folder's files and the training split, so a change of any
of them makes the output stale; an adapter whose fingerprint matches is reused (a sharded table write on
several machines tunes once).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from recbole_llmfuse.dataset_prep.embed import ENCODER_KEYS, ItemTextEmbeddingHook, as_list, make_encoder
from recbole_llmfuse.dataset_prep.hooks import PrepError, atomic_write_text, hook_defaults_file
from recbole_llmfuse.llm import resolve_model_path


def cooccurrence_pairs(histories: Dict[str, Sequence[str]], row: Dict[str, int], window: int) -> np.ndarray:
    """``[P, 2]`` int64 rows of item pairs ``(s_t, s_t+k)``, ``1 <= k <= window``, over every user sequence
    (split order); pairs of an item with itself are left out. ``row``: item token -> table row."""
    out: List[np.ndarray] = []
    for seq in histories.values():
        ids = np.asarray([row[i] for i in seq], dtype=np.int64)
        for k in range(1, window + 1):
            if len(ids) > k:
                out.append(np.stack([ids[:-k], ids[k:]], axis=1))
    pairs = np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def in_batch_infonce(za: torch.Tensor, zb: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Symmetric in-batch InfoNCE on cosine similarities. ``za``, ``zb``: ``[B, H]`` embeddings of the pairs'
    items ``a``, ``b`` (``[B]`` item rows). Another pair's item equal to the target is masked out of the
    negatives: popular items co-occur in many pairs of one batch, and sentence-transformers'
    MultipleNegativesRankingLoss would push such an item away from itself (hence this loss by hand)."""
    za, zb = torch.nn.functional.normalize(za, dim=-1), torch.nn.functional.normalize(zb, dim=-1)
    logits = za @ zb.T / temperature  # [B, B]
    eye = torch.eye(len(a), dtype=torch.bool, device=za.device)
    target = torch.arange(len(a), device=za.device)
    a2b = logits.masked_fill((b[None, :] == b[:, None]) & ~eye, float("-inf"))
    b2a = logits.T.masked_fill((a[None, :] == a[:, None]) & ~eye, float("-inf"))
    return (torch.nn.functional.cross_entropy(a2b, target) + torch.nn.functional.cross_entropy(b2a, target)) / 2


def model_files_fingerprint(model: str) -> Optional[List]:
    """Name and size of every file of a local model folder (a changed checkpoint makes the output stale); None
    for a hub id."""
    path = resolve_model_path(model)
    if not os.path.isdir(path):
        return None
    return sorted([os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f))]
                  for d, _, files in os.walk(path) for f in files)


class ItemEncoderLoraHook(ItemTextEmbeddingHook):
    """See module docstring; parameters in ``properties/hooks/item_encoder_lora.yaml``."""

    name = "item_encoder_lora"
    cli = None
    uses_split = True
    defaults_file = hook_defaults_file(name)
    late_params = ()

    @property
    def adapter_dir(self) -> str:
        return os.path.join(self.data_path, f"{self.dataset}.{self.params['suffix']}.adapter")

    def outputs(self) -> List[str]:
        return super().outputs() + [self.adapter_dir]

    def fingerprint(self) -> dict:
        p = self.params
        models = {k: model_files_fingerprint(p[k]) for k in ("model", "base_model") if p.get(k)}
        return {**super().fingerprint(), "model_files": models}

    def work_dirs(self) -> List[str]:
        return super().work_dirs() + [self.adapter_dir + ".tmp"]

    def encoder_params(self) -> dict:
        return {**self.params, "peft_model": as_list(self.params["peft_model"]) + [self.adapter_dir]}

    def run(self, shard: Optional[str] = None, progress: bool = True) -> dict:
        """Tune (unless this fingerprint's adapter exists), then write the table with it. Returns the table
        report plus ``tuning`` (pairs, epochs, loss per epoch, seconds per epoch, pairs/s)."""
        digest = self.fingerprint_digest()
        record = os.path.join(self.adapter_dir, "tuning.json")
        tuning = None
        if os.path.isfile(record):
            with open(record) as f:
                tuning = json.load(f)
        if tuning is None or tuning.get("digest") != digest:
            tuning = self.tune(progress)
        self.extra_report = {"tuning": tuning}
        return {**super().run(shard=shard, progress=progress), "tuning": tuning}

    def tune(self, progress: bool = True) -> dict:
        """Train the adapter and save it (a temp folder, then renamed over the old one). Returns the record."""
        from peft import LoraConfig, get_peft_model
        from tqdm.auto import tqdm

        p = self.params
        items = self._texts()
        row = {tok: i for i, tok in enumerate(items.tokens)}
        histories = self.split.user_histories()
        unknown = sorted({i for seq in histories.values() for i in seq} - set(row))
        if unknown:
            raise PrepError(f"{items.item_file}: {len(unknown)} items of the training split have no row (e.g. "
                            f"{unknown[:3]}); the .item file must list every item of the .inter file")
        pairs = cooccurrence_pairs(histories, row, int(p["window"]))
        if not len(pairs):
            raise PrepError(f"{self.dataset}: the training split has no item pairs within window {p['window']}; "
                            "item_encoder_lora needs users with two or more training interactions")
        torch.manual_seed(int(p["seed"]))
        rng = np.random.default_rng(int(p["seed"]))
        encoder = make_encoder({k: v for k, v in p.items() if k in ENCODER_KEYS or k == "backend"})
        # no LoRA dropout: the encoder is tuned in eval mode (see below), where dropout is off anyway
        config = LoraConfig(r=int(p["lora_r"]), lora_alpha=int(p["lora_alpha"]), lora_dropout=0.0,
                            target_modules=p["target_modules"])
        encoder.set_backbone(get_peft_model(encoder.backbone, config))
        if p["gradient_checkpointing"]:
            # non-reentrant: gradients reach the LoRA weights although the embeddings are frozen
            encoder.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [w for w in encoder.parameters() if w.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=float(p["learning_rate"]), weight_decay=float(p["weight_decay"]))
        texts = np.asarray(items.texts, dtype=object)
        size, per_epoch = int(p["train_batch_size"]), min(int(p["pairs_per_epoch"] or len(pairs)), len(pairs))
        history = []
        # dropout off: the pairs are two different items, no dropout "augmentation" is needed (as SimCSE's
        # unsupervised pairs need it), and the loss then scores the vectors that will be written
        encoder.eval()
        for epoch in range(int(p["epochs"])):
            order = rng.permutation(len(pairs))[:per_epoch]
            bar = tqdm(total=per_epoch, unit="pair", desc=f"tuning {self.dataset} encoder, epoch {epoch + 1}",
                       disable=not progress)
            start, losses = time.perf_counter(), []
            for first in range(0, per_epoch, size):
                batch = pairs[order[first:first + size]]
                if len(batch) < 2:
                    continue  # a lone pair has no negatives
                # each distinct item of the step is encoded once, then gathered for both sides
                uniq, inverse = np.unique(batch.reshape(-1), return_inverse=True)
                z = encoder(encoder.tokenize(list(texts[uniq])))  # [U, H]
                inverse = torch.as_tensor(inverse.reshape(-1, 2), device=z.device)
                ids = torch.as_tensor(batch, device=z.device)
                loss = in_batch_infonce(z[inverse[:, 0]], z[inverse[:, 1]], ids[:, 0], ids[:, 1], float(p["temperature"]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update(len(batch))
                bar.set_postfix_str(f"loss {np.mean(losses[-20:]):.3f}, {bar.n / (time.perf_counter() - start):.0f} pairs/s")
            bar.close()
            seconds = time.perf_counter() - start
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                            "first_step_loss": losses[0] if losses else None, "seconds": seconds,
                            "pairs_per_s": per_epoch / seconds if seconds > 0 else None})
        record = {"digest": self.fingerprint_digest(), "pairs": int(len(pairs)), "pairs_per_epoch": per_epoch,
                  "trainable_params": int(sum(w.numel() for w in params)), "epochs": history}
        tmp = self.adapter_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        encoder.backbone.save_pretrained(tmp)
        atomic_write_text(os.path.join(tmp, "tuning.json"), json.dumps(record, indent=2))
        if os.path.isdir(self.adapter_dir):
            shutil.rmtree(self.adapter_dir)
        os.replace(tmp, self.adapter_dir)
        return record
