"""Lean checkpoints: one protocol for saving and loading a model's weights, for every model and trainer.

A model with a large frozen part (an LLM decoder, a pre-trained item table read from a file) marks it
once with :func:`freeze` (``freeze(self, self.decoder)``). Checkpoints then hold every tensor of the
model's ``state_dict`` **except** the frozen ones: the frozen weights are rebuilt from their source when
the model is constructed, and what training changed (PEFT LoRA adapters inside the frozen decoder
included: they are new tensors, not frozen ones) is saved. A model that freezes nothing saves its whole
``state_dict``, exactly as RecBole does, so RecBole's own models work unchanged.

A model may instead define ``checkpoint_state() -> dict`` and ``load_checkpoint_state(state)`` to save
something else entirely (e.g. adapter folders).

Every load in the package goes through :func:`load_weights` (resume, best-model reload for the test,
``load_data_and_model``, a staged model's hand-off between phases, ``pretrained_checkpoint``, the
analysis tools): a missing key that is not frozen, or an unexpected key, is an error naming the file.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from recbole_llmfuse.compat import trusted_torch_load
from recbole_llmfuse.errors import CheckpointError
from recbole_llmfuse.files import atomic_write

_FROZEN_ATTR = "_llmfuse_frozen_tensors"


def freeze(model: nn.Module, module: nn.Module) -> None:
    """Freeze ``module`` (a sub-module of ``model``) and leave its current tensors out of ``model``'s checkpoints.

    Tensors are recorded by identity, so wrapping the module later (PEFT injects LoRA layers around
    the frozen ``Linear`` weights) keeps the base weights out and the new adapter weights in.
    """
    ids = getattr(model, _FROZEN_ATTR, None)
    if ids is None:
        ids = set()
        object.__setattr__(model, _FROZEN_ATTR, ids)  # a plain attribute, not a sub-module or buffer
    for p in module.parameters():
        p.requires_grad_(False)
        ids.add(id(p))
    for b in module.buffers():
        ids.add(id(b))


def unfreeze(model: nn.Module, params) -> None:
    """Train ``params`` (tensors of a module :func:`freeze` marked) again and keep them in ``model``'s
    checkpoints, e.g. the decoder's norms of an otherwise frozen LLM."""
    ids = getattr(model, _FROZEN_ATTR, set())
    for p in params:
        p.requires_grad_(True)
        ids.discard(id(p))


def frozen_keys(model: nn.Module) -> set:
    """``state_dict`` keys of the tensors :func:`freeze` marked."""
    ids = getattr(model, _FROZEN_ATTR, None)
    if not ids:
        return set()
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids}


def checkpoint_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """What a checkpoint stores of ``model``: its ``state_dict`` less the frozen tensors."""
    if hasattr(model, "checkpoint_state"):
        return model.checkpoint_state()
    skip = frozen_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a lean state into ``model``; only frozen tensors may be absent."""
    if hasattr(model, "load_checkpoint_state"):
        model.load_checkpoint_state(state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    lacking = sorted(set(missing) - frozen_keys(model))
    if lacking or unexpected:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: "
            + (f"missing {lacking[:5]}{' ...' if len(lacking) > 5 else ''} " if lacking else "")
            + (f"unexpected {list(unexpected)[:5]}{' ...' if len(unexpected) > 5 else ''} " if unexpected else "")
            + "- was it written for another model or config?"
        )


def read(path: str, map_location="cpu") -> dict:
    """A checkpoint file written by :func:`write` (or by RecBole) as a dict."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    import pickle
    import zipfile

    try:
        return trusted_torch_load(path, map_location=map_location)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:  # cut or not a checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be read ({str(err).splitlines()[0][:120]}): truncated or not "
                              f"a torch checkpoint; give a complete .pth written by a run") from None


def load_weights(model: nn.Module, path: str, map_location="cpu") -> dict:
    """Load a checkpoint's weights (and RecBole's ``other_parameter``) into ``model``; returns the checkpoint."""
    checkpoint = read(path, map_location)
    load_state(model, checkpoint["state_dict"], source=path)
    if hasattr(model, "load_other_parameter"):
        model.load_other_parameter(checkpoint.get("other_parameter"))
    return checkpoint


def write(path: str, model: nn.Module, config, optimizers: Optional[dict] = None, **extra) -> int:
    """Write a lean checkpoint (temp file, then rename); returns its size in bytes.

    Keys as RecBole's (``config``, ``state_dict``, ``other_parameter``, ``optimizer``, ``epoch``, ...), so
    RecBole's readers of the file keep working; ``optimizer`` is a dict by name when there are several.
    """
    state = {
        "config": config,
        "state_dict": checkpoint_state(model),
        "other_parameter": model.other_parameter() if hasattr(model, "other_parameter") else None,
        **extra,
    }
    if optimizers is not None:
        state["optimizer"] = (next(iter(optimizers.values())).state_dict() if len(optimizers) == 1
                              else {k: o.state_dict() for k, o in optimizers.items()})
    atomic_write(path, lambda f: torch.save(state, f, pickle_protocol=4))  # never a half-written checkpoint
    return os.path.getsize(path)


def parameter_summary(model: nn.Module) -> Tuple[int, int, int]:
    """``(total parameters, trainable parameters, frozen-and-not-saved tensors' elements)``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids = getattr(model, _FROZEN_ATTR, set())
    frozen = sum(p.numel() for p in model.parameters() if id(p) in ids)
    return total, trainable, frozen
