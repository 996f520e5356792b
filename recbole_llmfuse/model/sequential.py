"""Shared pieces of every sequential model here: the SASRec backbone and RecBole's weight init.

PAD's three experts, FAERec's backbone and :class:`~recbole_llmfuse.model.fast_sasrec.FastSASRec` are
all a :class:`~recbole_llmfuse.model.encoders.SequenceBackbone` (SASRec by default) fed with different
item-token embeddings.
"""
from __future__ import annotations

from torch import nn

from recbole_llmfuse.model.encoders import TRANSFORMER_KEYS, SequenceBackbone  # noqa: F401  (re-exported)


def init_weights(module: nn.Module, std: float) -> None:
    """RecBole's ``SASRec._init_weights``: N(0, std) for Linear/Embedding weights, zero biases, LN = (1, 0).

    Use as ``model.apply(functools.partial(init_weights, std=config["initializer_range"]))``.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


class SASRecBackbone(SequenceBackbone):
    """Position embedding + LayerNorm + dropout + causal transformer, read out at the last item.

    ``forward(item_emb [B, L, D], item_seq [B, L], item_seq_len [B]) -> [B, D]``; ``D`` = ``hidden_size``.
    Exactly RecBole SASRec's ``forward`` after its item-embedding lookup (:class:`SequenceBackbone` with
    ``kind="SASRec"`` whatever the config's ``backbone`` says).
    """

    def __init__(self, config, max_seq_length: int, hidden_size: int = None, causal: bool = True):
        super().__init__(config, max_seq_length, hidden_size=hidden_size, causal=causal, kind="SASRec")
