"""HDRec: hybrid dual-semantics modelling with two LoRA adapters on one frozen LLM decoder.

Liu et al., "Hybrid Dual-Semantics Modeling for Enhancing Large Language Model Based Recommendation",
WSDM 2026 (spec ``HDRec.md``; section numbers below are the spec's). One frozen decoder (any local Hugging
Face causal LM, loaded bare: no LM head) runs two processes, each with its own PEFT LoRA adapter:

* **text** (adapter ``text``, φ): every history item as its text tokens, then ``[SEQ]`` (§2.3);
* **ID** (adapter ``id``, ψ): every history item as one soft token ``Proj(E[i])``, ``E`` the frozen 128-d item
  table of a SASRec pre-trained on the same training split (the ``sasrec_item_table`` hook), then ``[SEQ]``.

The last hidden state at each ``[SEQ]`` goes through one shared Item Projection Layer (IPL, §2.5) to logits over
all items; the k-th ``[SEQ]`` predicts item k+1 (§3.4). An item-alignment task (``P_align t(i) [ALIGN]`` -> i,
and its ID version) is mixed into every batch (§4.3). Training alternates per batch (DLA, §4.2): a text
forward without gradients gives the teacher, then the ID step (CE + λ·KL(sg[p] ‖ q)), then the text step
(CE + λ·KL(sg[q] ‖ p)), each with only its own adapter active — two ``yield`` s of ``train_steps`` on the
trunk's step-level trainer. Scores fuse the two processes only at inference (§3.5, :func:`fuse`).

Query positions are kept explicitly while each sequence is built (never searched by token id), the IPL is
applied at those rows only (never a ``[B, L, |I|]`` tensor), IPL/CE/KL run in fp32, and the decoder is frozen
with :func:`recbole_llmfuse.checkpoint.freeze`, so checkpoints hold the adapters, IPL, Proj and the
special-token offsets only.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from recbole_llmfuse import checkpoint
from recbole_llmfuse.data import FeatureTable
from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.llm import load_decoder, load_tokenizer
from recbole_llmfuse.model.base import SequentialBase

TEXT, IDTOK, SEQ, ALIGN = 0, 1, 2, 3
FUSIONS = ("text_dominant", "id_dominant", "both")
SCORES = ("fused", "text", "id")


def fuse(l_text: torch.Tensor, l_id: torch.Tensor, alpha: float, tau: float = 1.0, eps: float = 1e-8,
         mode: str = "text_dominant") -> torch.Tensor:
    """Inference-time fusion (§3.5, paper Eqs. 13-18) of ``[B, N]`` IPL logits over the N real items.

    ``E(l) = alpha * (l - min l + eps) * sigmoid((l - mean l) / tau)`` (per row; min and mean over the real
    items only). ``text_dominant``: ``l_text + E(l_id)``; ``id_dominant``: ``l_id + E(l_text)``; ``both``:
    ``E(l_text) + E(l_id)`` (the paper's reading). With ``alpha = 0`` text-dominant is the text ranking.
    """

    def enhance(logits: torch.Tensor) -> torch.Tensor:
        mu = logits.mean(-1, keepdim=True)
        low = logits.min(-1, keepdim=True).values
        return alpha * (logits - low + eps) * torch.sigmoid((logits - mu) / tau)

    if mode == "text_dominant":
        return l_text + enhance(l_id)
    if mode == "id_dominant":
        return l_id + enhance(l_text)
    if mode == "both":
        return enhance(l_text) + enhance(l_id)
    raise ConfigError(f"fusion '{mode}': choose one of {FUSIONS}")


class ItemProjection(nn.Module):
    """IPL (§2.5): ``W2 · SiLU(Dropout(W1 h + b1))``, ``[R, H] -> [R, N]`` in fp32 (W2 without bias)."""

    def __init__(self, hidden: int, n_items: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(hidden, hidden // 2)
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(hidden // 2, n_items, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.w2(F.silu(self.dropout(self.w1(h.float()))))


class HDRec(SequentialBase):
    """HDRec on any local HF causal LM (see module docstring and ``properties/model/HDRec.yaml``)."""

    feature_tables = (
        FeatureTable("item_tokens", hook="item_tokens", ragged=True, options="item_tokens",
                     description="item text token ids"),
        FeatureTable("cf_emb", hook="sasrec_item_table", options="cf_emb",
                     description="a pre-trained SASRec item table"),
    )

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.n_real = self.n_items - 1
        self.processes = list(config["processes"])
        if not self.processes or set(self.processes) - {"text", "id"}:
            raise ConfigError(f"processes: {self.processes}; use [text, id], [text] or [id]")
        self.lora_mode, self.early_fusion = config["lora_mode"], bool(config["early_fusion"])
        if self.lora_mode not in ("dual", "single"):
            raise ConfigError(f"lora_mode '{self.lora_mode}': dual or single")
        self.fusion, self.score_mode = config["fusion"], config["score"]
        if self.fusion not in FUSIONS or self.score_mode not in SCORES:
            raise ConfigError(f"fusion must be one of {FUSIONS} and score one of {SCORES}")
        self.alpha, self.fusion_tau, self.kl_weight = float(config["alpha"]), float(config["fusion_tau"]), float(config["kl_weight"])
        self.alternations, self.dla = int(config["alternations"]), bool(config["dla"])
        self.max_tokens, self.llm_batch_size = int(config["max_tokens"]), int(config["llm_batch_size"])

        # -- the frozen decoder, its tokenizer (prompts only: item texts come pre-tokenized) ----------------
        tokenizer = load_tokenizer(config["llm_path"], config["gguf_file"])
        on_cuda = str(config["device"]).startswith("cuda")
        dtype = "bfloat16" if on_cuda and config["precision"] in ("bf16", "auto") else "float32"
        decoder = load_decoder(config["llm_path"], "cpu", dtype, config["gguf_file"])
        decoder.config.use_cache = False
        self.hidden = decoder.config.hidden_size
        checkpoint.freeze(self, decoder)
        if on_cuda and config["gradient_checkpointing"]:
            decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.prompt_seq_text = config["prompt_seq"]
        self.prompt_seq = tokenizer(config["prompt_seq"], add_special_tokens=False)["input_ids"]
        self.prompt_align = tokenizer(config["prompt_align"], add_special_tokens=False)["input_ids"]
        self.pad_id = tokenizer.pad_token_id or 0
        # [SEQ] / [ALIGN]: a frozen base row (mean word embedding) plus a trainable zero-initialised offset (§2.3)
        base = decoder.get_input_embeddings().weight.detach().float().mean(0)
        self.register_buffer("special_base", base.expand(2, -1).clone(), persistent=False)
        self.special_offset = nn.Parameter(torch.zeros(2, self.hidden))

        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=int(config["lora_rank"]), lora_alpha=int(config["lora_alpha"]),
                          lora_dropout=float(config["lora_dropout"]), target_modules=list(config["lora_targets"]))
        self.llm = get_peft_model(decoder, lora, adapter_name="text")
        self.adapter_of = {"text": "text", "id": "text", "fused": "text"}
        if self.lora_mode == "dual" and not self.early_fusion:
            self.llm.add_adapter("id", lora)
            self.adapter_of["id"] = "id"
        self._adapter_params = [p for name, p in self.llm.named_parameters() if ".lora_" in name]
        if config["train_norms"]:  # the released code trains the decoder's RMSNorms (spec §4.1); the paper does not
            checkpoint.unfreeze(self, [p for name, p in self.llm.named_parameters() if "norm" in name])

        cf_dim = self.cf_emb.shape[1]
        self.proj = nn.Sequential(nn.Linear(cf_dim, self.hidden // 2), nn.SiLU(), nn.Linear(self.hidden // 2, self.hidden))
        self.ipl = ItemProjection(self.hidden, self.n_real, float(config["ipl_dropout"]))
        self.ipl_id = ItemProjection(self.hidden, self.n_real, float(config["ipl_dropout"])) if config["dual_ipl"] else None
        # item texts as Python lists once (sequence assembly is per row on the host)
        self._item_text = [self.item_tokens[i, : int(self.item_tokens_len[i])].tolist() for i in range(self.n_items)]

        # -- training rows and alignment items per batch -------------------------------------------------
        self.use_align = bool(config["use_align_task"])
        n_rows = len(dataset.inter_feat)
        batches = max(1, math.ceil(n_rows / config["train_batch_size"]))
        self.align_per_batch = math.ceil(self.n_real / batches) if self.use_align else 0
        self._align_order, self._align_next = torch.randperm(self.n_real) + 1, 0
        self._tokens = 0

    # -- assembly ------------------------------------------------------------------------------------------
    def take_token_count(self) -> int:
        """Decoder tokens processed since the last call (the trainer's progress bar shows tokens/s)."""
        count, self._tokens = self._tokens, 0
        return count

    def on_epoch_start(self, epoch: int) -> None:
        self._align_order, self._align_next = torch.randperm(self.n_real) + 1, 0

    def _next_align_items(self) -> List[int]:
        items = self._align_order[self._align_next:self._align_next + self.align_per_batch].tolist()
        self._align_next += len(items)
        return items

    def _budget(self, items: Sequence[int]) -> List[int]:
        """Newest-first token budget (§4.3): stop at the first item that would bring the text to ``max_tokens``."""
        total, kept = 0, 0
        for item in reversed(items):
            total += len(self._item_text[item])
            if total >= self.max_tokens and kept:
                break
            kept += 1
        return list(items[len(items) - kept:])

    def _item_segments(self, item: int, process: str) -> list:
        if process == "text":
            return [(TEXT, self._item_text[item])]
        if process == "id":
            return [(IDTOK, item)]
        return [(IDTOK, item), (TEXT, self._item_text[item])]  # early fusion: <i> t(i)

    def rows(self, histories: List[List[int]], align_items: List[int], process: str) -> list:
        """Segment lists of one process: a sequence row per history (every item then ``[SEQ]``), an alignment
        row per item (``P_align`` item ``[ALIGN]``). Both processes get the same rows in the same order."""
        out = []
        for items in histories:
            segs = [(TEXT, self.prompt_seq)]
            for item in items:
                segs += self._item_segments(item, process) + [(SEQ, None)]
            out.append(segs)
        for item in align_items:
            out.append([(TEXT, self.prompt_align)] + self._item_segments(item, process if process != "fused" else "text")
                       + [(ALIGN, None)])
        return out

    def hidden_at_queries(self, rows: list, adapter: str) -> Tuple[torch.Tensor, List[List[int]]]:
        """Decoder states at every ``[SEQ]``/``[ALIGN]`` of ``rows``: ``[R_q, H]`` (rows in order), and the
        query positions of each row (recorded while assembling; right padding, positions from 0)."""
        device = self.special_offset.device
        flat_ids, kinds, refs, queries = [], [], [], []
        for segs in rows:
            ids, kind, ref, q = [], [], [], []
            for k, payload in segs:
                if k == TEXT:
                    ids += payload
                    kind += [TEXT] * len(payload)
                    ref += [0] * len(payload)
                else:
                    if k != IDTOK:
                        q.append(len(ids))
                    ids.append(self.pad_id)
                    kind.append(k)
                    ref.append(payload if k == IDTOK else 0)
            flat_ids.append(ids), kinds.append(kind), refs.append(ref), queries.append(q)
        length = max(len(x) for x in flat_ids)
        pad = lambda xs, v: torch.tensor([x + [v] * (length - len(x)) for x in xs], device=device)  # noqa: E731
        ids, kind, ref = pad(flat_ids, self.pad_id), pad(kinds, -1), pad(refs, 0)
        mask = (kind >= 0).long()
        embed = self.llm.get_input_embeddings()
        emb = embed(ids)
        is_id = kind == IDTOK
        if is_id.any():
            emb[is_id] = self.proj(self.cf_emb[ref[is_id]]).to(emb.dtype)
        special = self.special_base + self.special_offset
        for k, row in ((SEQ, 0), (ALIGN, 1)):
            where = kind == k
            if where.any():
                emb[where] = special[row].to(emb.dtype).expand(int(where.sum()), -1)
        self.llm.set_adapter(adapter)
        # PEFT's set_adapter also freezes every other adapter (requires_grad False), which cuts an adapter out of
        # a graph built before the call: the joint "w/o DLA" step runs both processes before one backward, and its
        # text adapter got no gradient. Which adapter trains is decided by each step's loss, so all stay trainable.
        for p in self._adapter_params:
            p.requires_grad_(True)
        states = self.llm(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        self._tokens += int(mask.sum())
        b = torch.tensor([i for i, q in enumerate(queries) for _ in q], device=device)
        p = torch.tensor([j for q in queries for j in q], device=device)
        return states[b, p], queries

    def states(self, rows: list, adapter: str) -> torch.Tensor:
        """:meth:`hidden_at_queries` over rows grouped by length (one decoder forward per group of rows within
        1.5x of each other's length): short alignment rows are not padded to the sequence rows' length.
        Returns ``[R_q, H]`` in the rows' order."""
        lengths = [sum(len(p) if k == TEXT else 1 for k, p in r) for r in rows]
        groups, current = [], []
        for i in sorted(range(len(rows)), key=lengths.__getitem__):
            if current and lengths[i] > 1.5 * lengths[current[0]]:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        per_row = [None] * len(rows)
        for group in groups:
            hidden, queries = self.hidden_at_queries([rows[i] for i in group], adapter)
            for i, h in zip(group, hidden.split([len(q) for q in queries])):
                per_row[i] = h
        return torch.cat(per_row)

    def logits(self, rows: list, process: str) -> torch.Tensor:
        """IPL logits ``[R_q, N]`` (fp32) of one process at every query position of ``rows``."""
        hidden = self.states(rows, self.adapter_of[process])
        ipl = self.ipl_id if (process == "id" and self.ipl_id is not None) else self.ipl
        return ipl(hidden)

    # -- training ------------------------------------------------------------------------------------------
    def batch_rows(self, interaction) -> Tuple[List[List[int]], List[int], torch.Tensor]:
        """Histories (token budget applied), alignment items and the 0-based targets of every query row: the
        k-th ``[SEQ]`` predicts item k+1, the last one the row's target (``POS_ITEM_ID``), ``[ALIGN]`` its item."""
        seq, lengths, pos = (interaction[k].tolist() for k in (self.ITEM_SEQ, self.ITEM_SEQ_LEN, self.POS_ITEM_ID))
        histories, targets = [], []
        for s, n, t in zip(seq, lengths, pos):
            items = self._budget(s[:n])
            histories.append(items)
            targets += items[1:] + [t]
        align = self._next_align_items()
        targets += align
        return histories, align, torch.tensor(targets, device=self.special_offset.device) - 1

    def _kl(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """KL(teacher ‖ student), teacher detached, summed over items and averaged over rows (§3.4)."""
        return F.kl_div(F.log_softmax(student, -1), F.softmax(teacher.detach(), -1), reduction="batchmean")

    def train_steps(self, interaction) -> Iterator[Tuple[str, Dict[str, torch.Tensor]]]:
        histories, align, y = self.batch_rows(interaction)
        if self.early_fusion or len(self.processes) == 1:
            process = "fused" if self.early_fusion else self.processes[0]
            yield "main", {f"{process}_ce": F.cross_entropy(self.logits(self.rows(histories, align, process), process), y)}
            return
        text_rows, id_rows = self.rows(histories, align, "text"), self.rows(histories, align, "id")
        lam = self.kl_weight
        if not self.dla:  # "w/o DLA" (§9 item 23): one joint step, nothing detached
            lt, ld = self.logits(text_rows, "text"), self.logits(id_rows, "id")
            terms = {"text_ce": F.cross_entropy(lt, y), "id_ce": F.cross_entropy(ld, y)}
            if lam:
                terms["kl"] = lam * 0.5 * (F.kl_div(F.log_softmax(ld, -1), F.softmax(lt, -1), reduction="batchmean")
                                           + F.kl_div(F.log_softmax(lt, -1), F.softmax(ld, -1), reduction="batchmean"))
            yield "main", terms
            return
        text_teacher = None
        if lam:
            with torch.no_grad():  # t = 1: the text forward only provides the ID step's teacher (§4.2)
                text_teacher = self.logits(text_rows, "text")
        for _ in range(self.alternations - 1):
            ld = self.logits(id_rows, "id")
            terms = {"id_ce": F.cross_entropy(ld, y)}
            if lam:
                terms["id_kl"] = lam * self._kl(ld, text_teacher)
            id_teacher = ld.detach()  # before ψ's update
            yield "main", terms
            lt = self.logits(text_rows, "text")
            terms = {"text_ce": F.cross_entropy(lt, y)}
            if lam:
                terms["text_kl"] = lam * self._kl(lt, id_teacher)
            text_teacher = lt.detach()
            yield "main", terms

    def calculate_loss(self, interaction) -> torch.Tensor:
        """All of one batch's losses summed (``train_steps`` is what training uses)."""
        return sum(sum(t.values()) for _, t in self.train_steps(interaction))

    # -- scoring -------------------------------------------------------------------------------------------
    def last_logits(self, histories: List[List[int]], process: str) -> torch.Tensor:
        """``[B, N]`` logits at each history's last ``[SEQ]``, in chunks of ``llm_batch_size`` rows."""
        out = []
        for start in range(0, len(histories), self.llm_batch_size):
            chunk = histories[start:start + self.llm_batch_size]
            rows = self.rows(chunk, [], process)
            hidden, queries = self.hidden_at_queries(rows, self.adapter_of[process])
            last = torch.tensor(list(torch.tensor([len(q) for q in queries]).cumsum(0) - 1), device=hidden.device)
            ipl = self.ipl_id if (process == "id" and self.ipl_id is not None) else self.ipl
            out.append(ipl(hidden[last]))
        return torch.cat(out)

    def scores(self, interaction, mode: str = None) -> torch.Tensor:
        """``[B, N]`` scores over the real items: ``fused`` (§3.5), or one process's logits (``text`` / ``id``)."""
        mode = mode or self.score_mode
        seq, lengths = interaction[self.ITEM_SEQ].tolist(), interaction[self.ITEM_SEQ_LEN].tolist()
        histories = [self._budget(s[:n]) for s, n in zip(seq, lengths)]
        if self.early_fusion:
            return self.last_logits(histories, "fused")
        if mode != "fused" or len(self.processes) == 1:
            return self.last_logits(histories, mode if mode != "fused" else self.processes[0])
        return fuse(self.last_logits(histories, "text"), self.last_logits(histories, "id"), self.alpha,
                    self.fusion_tau, mode=self.fusion)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        scores = self.scores(interaction)
        return torch.cat([torch.full_like(scores[:, :1], -torch.inf), scores], dim=1)  # column 0 = padding

    def predict(self, interaction) -> torch.Tensor:
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].view(-1, 1)).squeeze(1)
