"""DreamRec (Yang et al., NeurIPS 2023, "Generate What You Prefer"): next-item recommendation as conditional
generation. A DDPM over item embeddings learns to denoise the target item's vector ``x0`` given the history's
guidance vector ``c``; at test time it generates an "oracle" item ``x̂0`` from noise with classifier-free guidance
and ranks every item by the inner product with it.

Settings are those of AlphaFuse's DreamRec code, which PtE's DreamRec rows follow (spec PtE §5.2;
``Hugo-Chinn/AlphaFuse``, ``models/backbone_DreamRec.py``, ``models/diffusion.py``, ``train_diffusion.py``):

* history encoder: one Transformer block (``n_layers: 1``) over the item table, read at the last item -> ``c``;
* denoiser ``f(x_t, c, t) = Linear(3d -> d)([x_t; c; TimeEmbed(t)])`` (the code's ``FinalLayer``), predicting
  ``x0`` (not the noise); loss ``||f(x_t, c, t) - x0||²`` (the paper's DDPM MSE);
* ``T = 2000`` steps, linear β from 1e-4 to 0.02; ``c`` is replaced by a learned "no condition" vector with
  probability 0.1 in training; sampling ``x̂0 = (1 + w) f(x, c, t) - w f(x, ∅, t)`` with ``w = 5``, on DDIM's
  deterministic path (η = 0) every ``dreamrec_sample_stride`` steps (the code: 100, i.e. 20 denoising steps);
* items: a trainable ID table drawn from N(0, 1) (the code's ``ID_embs_init_type: normal``), the scale the noise
  schedule assumes. :class:`~recbole_llmfuse.model.dreamrec_pte.DreamRecPtE` puts a frozen whitened table there.

The generated vector depends on the starting noise; it is drawn from a generator seeded with
``dreamrec_sample_seed`` on every scoring call, so a model scores the same batch the same way each time (validation
curves are comparable across epochs and a reloaded checkpoint reproduces its scores).

The noise schedule is written here rather than taken from ``diffusers`` (its ``DDPMScheduler``/``DDIMScheduler`` do
the same arithmetic): that package is outside the design card's dependencies, and the schedule is a cumulative
product and two interpolations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole_llmfuse.errors import ConfigError
from recbole_llmfuse.model.base import SequentialBase
from recbole_llmfuse.model.encoders import SequenceBackbone


class TimeEmbedding(nn.Module):
    """Diffusion step ``t [B]`` -> ``[B, d]``: sinusoidal features (``frequencies`` of them, periods up to 10,000, as
    in "Attention is all you need") through ``Linear -> SiLU -> Linear`` (DiT's ``TimestepEmbedder``, which the
    DreamRec code uses)."""

    def __init__(self, dim: int, frequencies: int = 256):
        super().__init__()
        half = frequencies // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float().unsqueeze(-1) * self.freqs
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Denoiser(nn.Module):
    """``x_t [B, d]``, ``c [B, d]``, ``t [B]`` -> predicted ``x0 [B, d]`` = ``Linear(3d -> d)([x_t; c; TimeEmbed(t)])``."""

    def __init__(self, dim: int):
        super().__init__()
        self.time = TimeEmbedding(dim)
        self.out = nn.Linear(3 * dim, dim)

    def forward(self, x_t: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([x_t, c, self.time(t)], dim=-1))


class GaussianDiffusion(nn.Module):
    """The forward process ``q(x_t | x0) = N(sqrt(ᾱ_t) x0, (1 - ᾱ_t) I)`` of a linear β schedule (Ho et al., 2020,
    Eq. 4) and DDIM's deterministic reverse path for an ``x0``-predicting model (Song et al., 2021, Eq. 12, η = 0)."""

    def __init__(self, steps: int, beta_start: float, beta_end: float):
        super().__init__()
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        self.steps = steps
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0).float(), persistent=False)

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x0 [B, d]`` at steps ``t [B]`` -> ``x_t [B, d]``."""
        a = self.alpha_bar[t].unsqueeze(-1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def sample(self, predict_x0, noise: torch.Tensor, stride: int) -> torch.Tensor:
        """Run ``predict_x0(x_t, t [B]) -> x̂0`` from ``x_T = noise [B, d]`` down the steps ``T-1, T-1-stride, … ``;
        returns the last ``x̂0 [B, d]``."""
        x, steps = noise, list(range(self.steps - 1, -1, -stride))
        for i, step in enumerate(steps):
            t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
            x0 = predict_x0(x, t)
            if i + 1 == len(steps):
                return x0
            a, a_prev = self.alpha_bar[step], self.alpha_bar[steps[i + 1]]
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


class DreamRec(SequentialBase):
    """DreamRec over a trainable ID item table (see module docstring). Subclasses put another table there through
    :meth:`make_item_table` / :meth:`item_table` / :meth:`reset_item_table` and may add to the guidance in
    :meth:`encode`."""

    loss_types = ("MSE",)
    SCORINGS = ("sample", "mean")
    loss_hint = (" (DreamRec trains with the DDPM loss, loss_type: MSE; in a bench whose --tune space varies "
                 "loss_type, fix it in the label: DreamRec[loss_type=MSE])")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if not 0 <= float(config["dreamrec_cond_dropout"]) < 1:
            raise ConfigError(f"dreamrec_cond_dropout {config['dreamrec_cond_dropout']}: give a share in [0, 1)")
        dim = self.make_item_table(config)
        self.guidance, self.cond_dropout = float(config["dreamrec_guidance"]), float(config["dreamrec_cond_dropout"])
        self.stride, self.sample_seed = int(config["dreamrec_sample_stride"]), int(config["dreamrec_sample_seed"])
        self.scoring = config["dreamrec_scoring"]
        if self.scoring not in self.SCORINGS:
            raise ConfigError(f"dreamrec_scoring '{self.scoring}': choose one of {self.SCORINGS} (sample: the paper's "
                              "generated item; mean: the expected item, one guided step from the noise's mean)")
        self.backbone = SequenceBackbone(config, self.max_seq_length, hidden_size=dim)
        self.denoiser = Denoiser(dim)
        self.no_condition = nn.Parameter(torch.zeros(dim))  # ∅ of classifier-free guidance
        self.diffusion = GaussianDiffusion(int(config["dreamrec_steps"]), float(config["dreamrec_beta_start"]),
                                           float(config["dreamrec_beta_end"]))
        self.init_parameters()

    # -- the item table ------------------------------------------------------------------------------
    def make_item_table(self, config) -> int:
        """Build the item table; returns its width ``d`` (the diffusion's dimension)."""
        self.item_embedding = nn.Embedding(self.n_items, int(config["hidden_size"]), padding_idx=0)
        return self.item_embedding.embedding_dim

    def item_table(self) -> torch.Tensor:
        """``[n_items, d]``; row 0 (padding) is zero."""
        return self.item_embedding.weight

    def reset_item_table(self) -> None:
        with torch.no_grad():
            self.item_embedding.weight.normal_(0.0, 1.0)
            self.item_embedding.weight[0].zero_()

    def init_parameters(self) -> None:
        super().init_parameters()  # RecBole's init everywhere, then the item table and ∅ at the noise's scale
        self.reset_item_table()
        with torch.no_grad():
            self.no_condition.normal_(0.0, 1.0)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_table()[items]

    def all_item_vectors(self) -> torch.Tensor:
        return self.item_table()

    # -- guidance, training, generation --------------------------------------------------------------
    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """``[B, L]``, ``[B]`` -> the guidance vector ``c [B, d]``."""
        return self.backbone(self.item_table()[item_seq], item_seq, item_seq_len)

    def calculate_loss(self, interaction) -> torch.Tensor:
        c = self.encode(interaction)
        drop = torch.rand(c.shape[0], 1, device=c.device) < self.cond_dropout
        c = torch.where(drop, self.no_condition.expand_as(c), c)
        x0 = self.item_vectors(interaction[self.POS_ITEM_ID])
        t = torch.randint(0, self.diffusion.steps, (c.shape[0],), device=c.device)
        x_t = self.diffusion.perturb(x0, t, torch.randn_like(x0))
        return F.mse_loss(self.denoiser(x_t, c, t), x0)

    def generate(self, c: torch.Tensor) -> torch.Tensor:
        """The guided oracle item ``x̂0 [B, d]`` for guidance ``c [B, d]``.

        ``dreamrec_scoring: sample`` (the paper): DDIM from noise drawn by the seeded generator. ``mean`` (ours): the
        guided ``x0`` prediction at the last step ``T-1`` from ``x_T = 0``, the noise's mean. The denoiser is linear
        in ``x_t``, so this is exactly the average of that first prediction over every starting noise, the model's
        estimate of ``E[x0 | c]``; its inner product with an item is the expected inner product of a generated item
        with it, where one sample's ranking adds the noise of one draw."""
        empty = self.no_condition.expand_as(c)

        def guided(x, t):
            return (1 + self.guidance) * self.denoiser(x, c, t) - self.guidance * self.denoiser(x, empty, t)

        if self.scoring == "mean":
            last = torch.full((c.shape[0],), self.diffusion.steps - 1, dtype=torch.long, device=c.device)
            return guided(torch.zeros_like(c), last)
        generator = torch.Generator(device=c.device).manual_seed(self.sample_seed)
        noise = torch.randn(c.shape, generator=generator, device=c.device, dtype=c.dtype)
        return self.diffusion.sample(guided, noise, self.stride)

    def predict(self, interaction) -> torch.Tensor:
        return self.score_items(self.generate(self.encode(interaction)), interaction[self.ITEM_ID])

    def full_sort_predict(self, interaction) -> torch.Tensor:
        return self.score_all(self.generate(self.encode(interaction)))
