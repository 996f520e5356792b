"""PtE's profiler tuning (spec PtE §3.4, §4.2-4.5): LoRA SFT and GRPO of the profile generator, as preparation hooks.

* ``profiler_sft`` (``recbole-llmfuse prep sft``): TRL's ``SFTTrainer`` + a PEFT LoRA adapter, trained to write the
  teacher profiles of ``pte_profiles`` from the Eq.-6 prompt whose neighbour block is dropped with probability
  ``neighbor_dropout`` (§3.4: distilling the privileged neighbour context); loss on the response tokens only.
* ``profiler_grpo`` (``prep grpo``): TRL's ``GRPOTrainer`` from the SFT model (the SFT adapter merged: the policy's
  reference ``π_ref`` is the SFT model, ``beta`` explicit), ``K`` samples per prompt, reward ``λ_c R_collab + λ_d
  R_dist`` with the format guard (Eq. 9-11, :mod:`~recbole_llmfuse.dataset_prep.pte_rewards`) computed with the
  ``pte_embeddings`` encoder, neighbour embeddings refreshed after every epoch, advantages ``group_std`` or
  ``paper_logsigmoid``; per-step reward components in ``reward_log.csv`` and ``reward_curve.png``.

Both read the *untuned* profile set (``pte_profiles`` with ``teacher`` over it, ``adapter``/``best_of_k`` off),
train on the training split only (the profiles hook's split), write ``<dataset>[.<tag>].profiler_{sft,grpo}/`` (the
adapter, the tokenizer, ``tuning.json``) into a temp folder renamed over the old one, and resume a killed run from
the last TRL checkpoint in ``<adapter>.work/`` (kept until the run completes). ``auto_run: false``: a model run
that needs them stops with the ``prep`` command. The tuned profiler is used by ``pte_profiles`` with
``adapter: profiler_grpo`` (or ``profiler_sft``) and ``best_of_k`` (spec §4.6).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from logging import getLogger
from typing import Dict, List, Optional

import numpy as np

from recbole_llmfuse.dataset_prep.encoder_lora import model_files_fingerprint
from recbole_llmfuse.dataset_prep.hooks import PrepError, PrepHook, atomic_write_text, hook_defaults_file, make_hook
from recbole_llmfuse.dataset_prep.profiles import profile_stem
from recbole_llmfuse.dataset_prep.pte_rewards import paper_logsigmoid
from recbole_llmfuse.files import png_figure, write_csv
from recbole_llmfuse.llm import ADAPTER_CHAIN_FILE, default_device, default_gguf_file, load_causal_lm, load_tokenizer

#: the file in the TRL work folder naming the fingerprint its checkpoints belong to
WORK_DIGEST = "fingerprint.txt"


class ProfilerTuningHook(PrepHook):
    """What the two tuning hooks share: the teacher profile set, the model, LoRA, TRL's run folder and resume,
    the atomic adapter write. Subclasses build the dataset and the trainer (:meth:`trainer`)."""

    uses_split = True
    runtime_params = ("auto_run", "device", "save_steps", "logging_steps", "progress")
    #: the adapter folder's suffix
    kind = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requires = (("pte_profiles", self.teacher_overrides()),)
        self._check_settings()

    def teacher_overrides(self) -> dict:
        """The untuned profile set: the run's ``pte_profiles`` settings with ``teacher`` over them (e.g. another
        backend, model or tag: a large served model teaching a small local one), without adapter or best-of-K."""
        teacher = self.params["teacher"] or {}
        if not isinstance(teacher, dict):
            raise PrepError(f"{self.name} teacher {teacher!r}: a dict of pte_profiles settings of the teacher profile "
                            f"set, e.g. teacher={{tag: llama70b, backend: openai}} ({{}} = the run's pte_profiles)")
        return {"tag": None, **teacher, "adapter": None, "best_of_k": 1}

    @functools.cached_property
    def teacher(self):
        return make_hook("pte_profiles", self.config, self.data_path, self.teacher_overrides())

    @property
    def adapter_dir(self) -> str:
        return os.path.join(self.data_path, f"{profile_stem(self.dataset, self.params['tag'])}.{self.name}")

    def outputs(self) -> List[str]:
        return [self.adapter_dir]

    def work_dirs(self) -> List[str]:
        return [self.adapter_dir + ".work"]

    def auto_runs(self) -> bool:
        return bool(self.params["auto_run"])  # false by default: tuning an LLM takes hours

    @property
    def model_name(self) -> str:
        """The model to tune: ``model``, else the teacher's (the profiler is the model that wrote the profiles)."""
        return self.params["model"] or self.teacher.params["model"]

    def fingerprint(self) -> dict:
        return {"params": self.shaping_params(), "model": self.model_name,
                "model_files": model_files_fingerprint(self.model_name)}

    def teacher_profiles(self) -> Dict[str, Dict[str, str]]:
        """``{"user": {u: text}, "item": {i: text}}`` of the teacher set."""
        out = {}
        for kind, path in zip(("user", "item"), self.teacher.outputs()):
            try:
                with open(path, encoding="utf-8") as f:
                    out[kind] = json.load(f)
            except (OSError, ValueError) as err:
                raise PrepError(f"{path}: cannot read the teacher profiles ({err}); run `{self.teacher.command()}`") \
                    from None
        return out

    def _check_settings(self) -> None:
        """Bad settings fail when the hook is made (before a model loads), in one line naming the setting."""
        p = self.params
        for key in ("learning_rate", "lora_dropout"):
            if isinstance(p[key], bool) or not isinstance(p[key], (int, float)):
                raise PrepError(f"{self.name} {key} {p[key]!r} is not a number")
        for key in ("lora_r", "lora_alpha", "epochs", "batch_size"):
            if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1:
                raise PrepError(f"{self.name} {key} {p[key]!r}: a positive integer")

    # -- model and tokenizer -----------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return self.params["device"] or default_device()

    def load(self, adapters=None):
        """``(model, tokenizer)``: the model to tune on :attr:`device` (bf16 on CUDA, fp32 on CPU unless
        ``dtype``), GGUF de-quantised, ``adapters`` merged in (the starting point of a new LoRA)."""
        gguf = default_gguf_file(self.model_name, self.params["gguf_file"] or self.teacher.params["gguf_file"])
        tokenizer = load_tokenizer(self.model_name, gguf)
        model = load_causal_lm(self.model_name, self.device, self.params["dtype"], gguf, adapters=adapters,
                               trainable=None)
        model.config.use_cache = False  # training; generation inside GRPO turns it back on per call
        return model, tokenizer

    def lora_config(self):
        from peft import LoraConfig

        p = self.params
        return LoraConfig(r=int(p["lora_r"]), lora_alpha=int(p["lora_alpha"]), lora_dropout=float(p["lora_dropout"]),
                          target_modules=p["target_modules"], task_type="CAUSAL_LM")

    def chat(self, tokenizer) -> bool:
        """Prompts as chat messages when the tokenizer has a chat template (as the ``hf`` generator renders them)."""
        return bool(getattr(tokenizer, "chat_template", None))

    def common_args(self) -> dict:
        """TRL/Trainer arguments both hooks share (CPU: fp32; CUDA: bf16)."""
        p = self.params
        cuda = self.device.startswith("cuda")
        args = {"output_dir": self.work_dir, "learning_rate": float(p["learning_rate"]),
                "num_train_epochs": int(p["epochs"]), "gradient_accumulation_steps": int(p["grad_accum"]),
                "logging_steps": int(p["logging_steps"]), "save_steps": int(p["save_steps"]), "save_total_limit": 2,
                "report_to": "none", "seed": int(p["seed"]), "use_cpu": not cuda, "bf16": cuda and p["dtype"] != "float32",
                "disable_tqdm": not p["progress"], "lr_scheduler_type": p["lr_scheduler"],
                "warmup_steps": float(p["warmup_ratio"])}  # a float < 1: a share of the steps
        if p["gradient_checkpointing"]:
            # non-reentrant: gradients reach the LoRA weights although the embeddings are frozen (trl#3089)
            args.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
        return args

    # -- the run -----------------------------------------------------------------------------------------
    @property
    def work_dir(self) -> str:
        return self.work_dirs()[0]

    def _resume_point(self) -> Optional[bool]:
        """True when the work folder holds checkpoints of this very fingerprint (resume there); else the folder is
        emptied (checkpoints of other settings are not ours to continue)."""
        digest = self.fingerprint_digest()
        mark = os.path.join(self.work_dir, WORK_DIGEST)
        if os.path.isfile(mark) and open(mark).read().strip() == digest:
            if any(n.startswith("checkpoint-") for n in os.listdir(self.work_dir)):
                return True
        shutil.rmtree(self.work_dir, ignore_errors=True)
        os.makedirs(self.work_dir)
        atomic_write_text(mark, digest)
        return None

    def _check(self) -> None:
        """What must hold when the run starts (inputs on disk)."""

    def run(self, progress: bool = True, **_) -> dict:
        self._check()
        self.params["progress"] = progress
        start = time.perf_counter()
        resume = self._resume_point()
        trainer, info = self.trainer()
        if resume:
            getLogger().info(f"{self.name}: resuming from the last checkpoint in {self.work_dir}")
        result = trainer.train(resume_from_checkpoint=resume)
        history = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
        seconds = time.perf_counter() - start
        steps = int(trainer.state.global_step)
        record = {"digest": self.fingerprint_digest(), "model": self.model_name, "steps": steps,
                  "resumed": bool(resume), "train_runtime": float(result.metrics.get("train_runtime", seconds)),
                  "seconds_per_step": float(result.metrics.get("train_runtime", seconds)) / max(steps, 1),
                  "trainable_params": int(sum(w.numel() for w in trainer.model.parameters() if w.requires_grad)),
                  **info, **self.summarize(history)}
        tmp = self.adapter_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.model.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
        self.write_extra(tmp, history)
        atomic_write_text(os.path.join(tmp, "tuning.json"), json.dumps(record, indent=2, default=str))
        replace_dir(tmp, self.adapter_dir)
        shutil.rmtree(self.work_dir, ignore_errors=True)  # done: its checkpoints are not needed to resume
        report = {k: v for k, v in record.items() if k != "digest"}
        report["adapter"] = self.adapter_dir
        self.write_manifest({"report": report})
        return report

    def trainer(self):
        """``(TRL trainer, info dict)``."""
        raise NotImplementedError

    def summarize(self, history: List[dict]) -> dict:
        return {}

    def write_extra(self, folder: str, history: List[dict]) -> None:
        """Logs and plots beside the adapter."""
        write_history(folder, history, self.plot_keys)

    plot_keys: tuple = ("loss",)


def replace_dir(tmp: str, final: str) -> None:
    """Put the finished folder ``tmp`` at ``final``: the old one is renamed aside first and removed last, so at every
    moment ``final`` is either the old complete folder or the new one."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_history(folder: str, history: List[dict], keys) -> None:
    """``log.csv`` (every logged value per step) and ``curve.png`` (``keys`` over steps) in ``folder``."""
    if not history:
        return
    columns = sorted({k for h in history for k in h if isinstance(h[k], (int, float))})
    write_csv(os.path.join(folder, "log.csv"), history, columns, extrasaction="ignore")
    shown = [k for k in keys if any(k in h for h in history)]
    with png_figure(os.path.join(folder, "curve.png"), dpi=110, ncols=max(1, len(shown)),
                    figsize=(4.5 * max(1, len(shown)), 3.2), squeeze=False) as (_, axes):
        for ax, key in zip(axes[0], shown):
            pts = [(h.get("step", n + 1), h[key]) for n, h in enumerate(history) if key in h]
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3)
            ax.set_xlabel("step")
            ax.set_title(key)
            ax.grid(alpha=0.3)


class ProfilerSFTHook(ProfilerTuningHook):
    """LoRA SFT of the profiler on the teacher profiles (spec PtE §3.4); ``properties/hooks/profiler_sft.yaml``."""

    name = "profiler_sft"
    cli = "sft"
    summary = "PtE's profiler, LoRA SFT on the teacher profiles -> <dataset>.profiler_sft/"
    defaults_file = hook_defaults_file(name)

    def examples(self) -> List[dict]:
        """One ``{prompt, completion}`` per training user and epoch: the Eq.-6 prompt (neighbour block dropped
        with probability ``neighbor_dropout``, drawn anew per epoch) and the teacher's profile (``target:
        initial`` = the Eq.-6 profile ``p_u^(0)``, read from the teacher's generation cache; ``final`` = ``p_u*``)."""
        p, t = self.params, self.teacher
        if p["target"] not in ("initial", "final"):
            raise PrepError(f"profiler_sft target '{p['target']}': initial (p_u^(0), spec §3.4) | final (p_u*)")
        rate = p["neighbor_dropout"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise PrepError(f"profiler_sft neighbor_dropout {rate!r}: a probability in [0, 1]")
        profiles = self.teacher_profiles()["user"]
        t.setup(progress=bool(p["progress"]))
        users = sorted(u for u in profiles if u in t.hist)
        requests = {u: t._user_request(t.hist[u], t.neighbors.get(u, []), t.hist, t.items) for u in users}
        if p["target"] == "initial":  # the teacher's records: cached, nothing is generated again
            targets = dict(zip(users, t._generate("user", [requests[u] for u in users])))
        else:
            targets = {u: profiles[u] for u in users}
        rng = np.random.default_rng(int(p["seed"]))
        out = []
        for _ in range(int(p["epochs"])):
            for u in users:
                fields = requests[u]["prompt_fields"]
                if rng.random() < float(rate):
                    prompt = p["prompt_no_neighbors"].format(domain=t.params["domain"], history=fields["history"])
                else:
                    prompt = t.prompt("user", requests[u])
                out.append({"prompt": prompt, "completion": targets[u], "user": u})
        return out

    def trainer(self):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        p = self.params
        model, tokenizer = self.load()
        rows = self.examples()
        chat = self.chat(tokenizer)
        eos = tokenizer.eos_token or ""
        data = Dataset.from_list([
            {"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}]} if chat else
            {"prompt": r["prompt"] + "\n", "completion": r["completion"] + eos} for r in rows])
        args = SFTConfig(**{**self.common_args(), "num_train_epochs": 1},  # epochs are the dataset's copies
                         per_device_train_batch_size=int(p["batch_size"]), max_length=int(p["max_length"]),
                         completion_only_loss=True, packing=False, dataset_num_proc=None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=self.lora_config())
        return trainer, {"examples": len(rows), "users": len({r["user"] for r in rows}), "chat_template": chat}

    def summarize(self, history: List[dict]) -> dict:
        losses = [h["loss"] for h in history if "loss" in h]
        return {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


class ProfilerGRPOHook(ProfilerTuningHook):
    """GRPO of the profiler with PtE's reward (spec PtE §4.2-4.5); ``properties/hooks/profiler_grpo.yaml``."""

    name = "profiler_grpo"
    cli = "grpo"
    summary = "PtE's profiler, GRPO with the Eq. 9-11 reward -> <dataset>.profiler_grpo/"
    defaults_file = hook_defaults_file(name)
    plot_keys = ("pte/reward", "pte/collab", "pte/dist", "pte/well_formed", "kl", "loss")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.params["sft"]:  # π_ref and the policy's start = the SFT model; sft: false = the "no SFT" ablation
            self.requires = (*self.requires, "profiler_sft")

    @functools.cached_property
    def sft(self):
        return make_hook("profiler_sft", self.config, self.data_path) if self.params["sft"] else None

    @property
    def model_name(self) -> str:
        return self.params["model"] or (self.sft.model_name if self.sft else self.teacher.params["model"])

    def _check_settings(self) -> None:
        super()._check_settings()
        p = self.params
        k = p["num_generations"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise PrepError(f"profiler_grpo num_generations {k!r}: K >= 2 candidates per prompt (a group of one has "
                            f"no advantage; spec PtE §4.2: 8)")
        if p["advantage"] not in ("group_std", "paper_logsigmoid"):
            raise PrepError(f"profiler_grpo advantage '{p['advantage']}': group_std | paper_logsigmoid (spec §4.4)")
        if p["refresh_neighbor_emb"] not in ("epoch", "never"):
            raise PrepError(f"profiler_grpo refresh_neighbor_emb '{p['refresh_neighbor_emb']}': epoch | never")
        beta = p["beta"]
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise PrepError(f"profiler_grpo beta {beta!r} is not a number (KL weight; spec §4.4: 0.04)")

    def _check(self) -> None:
        if self.sft is not None and not os.path.isfile(os.path.join(self.sft.adapter_dir, "adapter_config.json")):
            raise PrepError(f"profiler_grpo starts from the SFT adapter {self.sft.adapter_dir}, which is missing or "
                            f"unreadable: run `{self.sft.command()}` first, or sft=false (the no-SFT ablation)")

    def prompts(self, chat: bool):
        """``(rows, rewarders)``: one row per training user (and item with ``train_items``) — the final prompt
        (spec §4.2), its entity and kind — capped at ``max_prompts`` (a seeded sample), and the reward of each kind."""
        p, t = self.params, self.teacher
        profiles = self.teacher_profiles()
        t.setup(progress=bool(p["progress"]))
        rows, rewarders = [], {}
        for kind in ("user", "item") if p["train_items"] else ("user",):
            if not profiles[kind]:
                continue
            prompt_kind, requests = t.final_requests(kind, profiles["user"], profiles["item"])
            rewarders[kind] = t.reward_model(kind, profiles["user"], profiles["item"])
            for key in sorted(requests):
                text = t.prompt(prompt_kind, requests[key])
                rows.append({"prompt": [{"role": "user", "content": text}] if chat else text + "\n",
                             "entity": key, "kind": kind})
        if p["max_prompts"] and len(rows) > int(p["max_prompts"]):
            keep = np.random.default_rng(int(p["seed"])).choice(len(rows), int(p["max_prompts"]), replace=False)
            rows = [rows[i] for i in sorted(keep)]
        if not rows:
            raise PrepError(f"{self.teacher.outputs()[0]}: no profiles to train GRPO on")
        return rows, rewarders

    def trainer(self):
        from datasets import Dataset
        from trl import GRPOTrainer

        p = self.params
        model, tokenizer = self.load(adapters=self.sft.adapter_dir if self.sft else None)
        rows, rewarders = self.prompts(self.chat(tokenizer))
        reward = PtEReward(rewarders, int(p["num_generations"]), p["advantage"])
        k = int(p["num_generations"])
        args = grpo_config(self.common_args(), p)
        callbacks = [reward.refresh_callback()] if p["refresh_neighbor_emb"] == "epoch" else []
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, peft_config=self.lora_config(), callbacks=callbacks)
        self._reward = reward
        return trainer, {"prompts": len(rows), "num_generations": k, "beta": float(p["beta"]),
                         "advantage": p["advantage"], "sft": bool(self.sft),
                         "base_adapters": [self.sft.adapter_dir] if self.sft else []}

    def summarize(self, history: List[dict]) -> dict:
        rewards = [h["pte/reward"] for h in history if "pte/reward" in h]
        head = rewards[:max(1, len(rewards) // 4)]
        tail = rewards[-max(1, len(rewards) // 4):]
        return {"reward_first_quarter": float(np.mean(head)) if rewards else None,
                "reward_last_quarter": float(np.mean(tail)) if rewards else None,
                "neighbor_refreshes": self._reward.refreshes}

    def write_extra(self, folder: str, history: List[dict]) -> None:
        super().write_extra(folder, history)
        if self.sft is not None:  # the GRPO adapter applies on top of the merged SFT adapter
            base = os.path.relpath(self.sft.adapter_dir, self.adapter_dir)

            atomic_write_text(os.path.join(folder, ADAPTER_CHAIN_FILE), json.dumps({"base_adapters": [base]}))


def grpo_config(common: dict, p: dict):
    """TRL ``GRPOConfig`` of spec PtE §4.4: ``num_generations`` K per prompt, ``prompts_per_step`` prompts per
    step, standard GRPO loss (``loss_type="grpo"``: clipped ratio, k3 KL with explicit ``beta``, token mean then
    group mean), group-std advantages or none (``paper_logsigmoid`` hands over centred-able ``log σ`` rewards)."""
    from trl import GRPOConfig

    k = int(p["num_generations"])
    return GRPOConfig(**common, per_device_train_batch_size=k * int(p["prompts_per_step"]), num_generations=k,
                      max_completion_length=int(p["max_new_tokens"]), temperature=float(p["temperature"]),
                      top_p=float(p["top_p"]), beta=float(p["beta"]), epsilon=float(p["epsilon"]), loss_type="grpo",
                      num_iterations=int(p["num_iterations"]),
                      scale_rewards="group" if p["advantage"] == "group_std" else "none", log_completions=False)


class PtEReward:
    """TRL reward function (``f(prompts=, completions=, entity=, kind=, log_metric=, **kw) -> [float]``) of Eq. 9-11
    over the completions of a generation batch; logs the mean reward, its two components and the share of
    well-formed candidates per step; keeps each entity's best candidate of the epoch for the neighbour refresh."""

    __name__ = "pte_reward"  # TRL names the reward's metrics after it

    def __init__(self, rewarders: Dict[str, object], group: int, advantage: str = "group_std"):
        self.rewarders, self.group, self.advantage = rewarders, group, advantage
        self.best: Dict[tuple, tuple] = {}
        self.refreshes = 0

    def __call__(self, prompts, completions, entity, kind, log_metric=None, **_) -> List[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        out: List[Optional[dict]] = [None] * len(texts)
        for k, rewarder in self.rewarders.items():
            idx = [i for i, kk in enumerate(kind) if kk == k]
            if idx:
                for i, s in zip(idx, rewarder.score([entity[i] for i in idx], [texts[i] for i in idx])):
                    out[i] = s
        for i, s in enumerate(out):
            if s["well_formed"] and s["reward"] > self.best.get((kind[i], entity[i]), (-np.inf,))[0]:
                self.best[(kind[i], entity[i])] = (s["reward"], s["vector"])
        rewards = np.asarray([s["reward"] for s in out], dtype=np.float64)
        if log_metric is not None:
            log_metric("pte/reward", float(rewards.mean()))
            log_metric("pte/well_formed", float(np.mean([s["well_formed"] for s in out])))
            for part in ("collab", "dist"):
                vals = [s[part] for s in out if s[part] is not None]
                if vals:
                    log_metric(f"pte/{part}", float(np.mean(vals)))
        if self.advantage == "paper_logsigmoid":
            if len(rewards) % self.group or any(len(set(entity[j:j + self.group])) != 1
                                                 for j in range(0, len(entity), self.group)):
                raise PrepError("profiler_grpo advantage paper_logsigmoid needs whole groups of num_generations "
                                "candidates per reward call (one process); use advantage=group_std")
            # TRL then subtracts the group mean (scale_rewards none): A_k = g_k - mean(g), spec §4.4
            return paper_logsigmoid(rewards.reshape(-1, self.group)).ravel().tolist()
        return rewards.tolist()

    def refresh(self) -> None:
        """ē_w <- f_enc(best profile of w found this epoch) (spec §4.3); the epoch's record starts over."""
        by_kind: Dict[str, dict] = {}
        for (k, e), (_, vec) in self.best.items():
            by_kind.setdefault(k, {})[e] = vec
        for k, vecs in by_kind.items():
            self.rewarders[k].update_neighbor_vecs(vecs)
        self.best = {}
        self.refreshes += 1

    def refresh_callback(self):
        from transformers import TrainerCallback

        reward = self

        class RefreshNeighbours(TrainerCallback):
            def on_epoch_end(self, args, state, control, **kwargs):
                reward.refresh()

        return RefreshNeighbours()
