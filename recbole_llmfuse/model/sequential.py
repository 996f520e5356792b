"""Shared pieces of every sequential model here: the SASRec backbone and RecBole's weight init.

PAD's three experts, FAERec's backbone and :class:`~recbole_llmfuse.model.fast_sasrec.FastSASRec` are
all a :class:`SASRecBackbone` fed with different item-token embeddings.
"""
from __future__ import annotations

import torch
from torch import nn

from recbole_llmfuse.model.layers import Dropout, FastTransformerEncoder

TRANSFORMER_KEYS = (
    "n_layers",
    "n_heads",
    "hidden_size",
    "inner_size",
    "hidden_dropout_prob",
    "attn_dropout_prob",
    "hidden_act",
    "layer_norm_eps",
)


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


class SASRecBackbone(nn.Module):
    """Position embedding + LayerNorm + dropout + causal transformer, read out at the last item.

    ``forward(item_emb [B, L, D], item_seq [B, L], item_seq_len [B]) -> [B, D]``; ``D`` = ``hidden_size``.
    Exactly RecBole SASRec's ``forward`` after its item-embedding lookup.
    """

    def __init__(self, config, max_seq_length: int, hidden_size: int = None, causal: bool = True):
        super().__init__()
        kwargs = {k: config[k] for k in TRANSFORMER_KEYS}
        if hidden_size is not None:
            kwargs["hidden_size"] = hidden_size
        self.hidden_size = kwargs["hidden_size"]
        self.causal = causal
        self.position_embedding = nn.Embedding(max_seq_length, self.hidden_size)
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=config["layer_norm_eps"])
        self.dropout = Dropout(config["hidden_dropout_prob"])
        self.encoder = FastTransformerEncoder(**kwargs)

    def forward(self, item_emb: torch.Tensor, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(item_seq.size(1), device=item_seq.device)
        hidden = self.dropout(self.LayerNorm(item_emb + self.position_embedding(positions)))
        return self.encoder.forward_at(hidden, item_seq != 0, item_seq_len - 1, causal=self.causal)
