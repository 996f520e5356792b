"""RecBole's weight init, shared by every sequential model here (their backbones are
:class:`~recbole_llmfuse.model.encoders.SequenceBackbone`)."""
from __future__ import annotations

from torch import nn


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
