"""Alignment losses shared by every model of the package (PAD today; FAERec and others import them too).

Every function compares two sets of item vectors ``x [n, d]`` and ``y [m, d]`` (for the paired losses,
row ``i`` of ``x`` and row ``i`` of ``y`` describe the same item) and returns a scalar.

* :func:`mk_mmd` — multi-kernel maximum mean discrepancy (squared, unbiased), Gaussian or Laplacian
  kernels. ``bandwidth="adaptive"`` is the TLlib DAN convention PAD's authors ran
  (``GaussianKernel(alpha=2**k) for k in range(-3, 2)``): ``sigma_u^2 = 2^u * mean pairwise squared
  distance`` over ``[x; y]`` (detached); ``"fixed"`` reads the paper's ``sigma = 2^u`` literally.
* :func:`linear_mmd` — MMD with the linear kernel: ``||mean(x) - mean(y)||^2``.
* :func:`cosine_alignment` — paired ``mean(1 - cos(x_i, y_i))``.
* :func:`info_nce` — paired InfoNCE with in-batch negatives (items repeated in the batch are not
  each other's negatives when ``ids`` is given).
* :func:`barlow_twins` — Barlow-Twins cross-correlation loss between two paired views (FAERec's FLA),
  and :func:`grouped_barlow_twins`, the same per popularity group (high / low half), summed.
* :func:`alignment_loss` — any of the above by name (the config switch of PAD's RQ3).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

ALIGNMENT_LOSSES = ("mkmmd_gauss", "mkmmd_laplace", "mmd_linear", "cosine", "infonce", "none")
DEFAULT_EXPONENTS = (-3, -2, -1, 0, 1)


def _pairwise(z: torch.Tensor, kernel: str) -> torch.Tensor:
    """``[2n, 2n]`` squared Euclidean (gaussian) or L1 (laplacian) distances."""
    if kernel == "gaussian":
        sq = (z * z).sum(-1)
        return (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min_(0.0)
    if kernel == "laplacian":
        return torch.cdist(z, z, p=1.0)
    raise ValueError(f"unknown MMD kernel '{kernel}'; use gaussian or laplacian")


def mk_mmd(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: str = "gaussian",
    bandwidth: str = "adaptive",
    exponents: Sequence[float] = DEFAULT_EXPONENTS,
) -> torch.Tensor:
    """Unbiased squared MK-MMD between ``x [n, d]`` and ``y [m, d]`` with ``len(exponents)`` kernels.

    ``k = sum_u k_u`` (beta_u = 1, as TLlib's DAN); Gaussian ``k_u = exp(-||a-b||^2 / (2 s_u))``,
    Laplacian ``k_u = exp(-||a-b||_1 / s_u)``, where ``s_u = 2^u * mean(D)`` (adaptive; ``D`` the
    pairwise distance matrix of ``[x; y]``, diagonal included, detached) or ``s_u = (2^u)^2`` (fixed).
    Estimator: ``mean_{a!=b} k(x_a,x_b) + mean_{a!=b} k(y_a,y_b) - 2 mean_{a,b} k(x_a,y_b)``: about 0
    (``O(kernels / n)``) for samples of one distribution, growing as the distributions move apart.
    """
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        return x.new_zeros(())
    z = torch.cat([x, y]).float()
    dist = _pairwise(z, kernel)
    if bandwidth == "adaptive":
        base = dist.detach().mean().clamp_min(1e-12)
        scales = [base * (2.0 ** e) for e in exponents]
    elif bandwidth == "fixed":
        scales = [torch.tensor((2.0 ** e) ** 2, device=z.device) for e in exponents]
    else:
        raise ValueError(f"unknown mmd_bandwidth '{bandwidth}'; use adaptive or fixed")
    denom = 2.0 if kernel == "gaussian" else 1.0
    k = sum(torch.exp(-dist / (denom * s)) for s in scales)  # [n+m, n+m]
    n_k = len(scales)
    kxx = (k[:n, :n].sum() - n_k * n) / (n * (n - 1))  # k(a, a) = 1 per kernel: drop the diagonal
    kyy = (k[n:, n:].sum() - n_k * m) / (m * (m - 1))
    kxy = k[:n, n:].mean()
    return kxx + kyy - 2.0 * kxy


def linear_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MMD with the linear kernel ``k(a, b) = a.b``: ``||mean(x) - mean(y)||^2`` (not characteristic)."""
    diff = x.float().mean(0) - y.float().mean(0)
    return (diff * diff).sum()


def cosine_alignment(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Paired cosine distance ``mean_i (1 - cos(x_i, y_i))``."""
    return (1.0 - F.cosine_similarity(x.float(), y.float(), dim=-1)).mean()


def info_nce(x: torch.Tensor, y: torch.Tensor, temperature: float = 0.1, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One-directional InfoNCE ``x -> y`` with cosine similarity and in-batch negatives.

    ``ids [n]`` (optional): rows with the same id are the same item; they are not used as each other's
    negatives (FAERec's duplicate masking; PAD's "unique items" default).
    """
    logits = F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).T / temperature  # [n, n]
    if ids is not None:
        same = ids[:, None] == ids[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(x.shape[0], device=x.device)
    return F.cross_entropy(logits, target)


def barlow_twins(x: torch.Tensor, y: torch.Tensor, off_diagonal_weight: float = 0.005) -> torch.Tensor:
    """``sum_k (1 - C_kk)^2 + lambda * sum_{k != l} C_kl^2`` with ``C = (1/S) Zx^T Zy`` over ``S`` paired rows.

    Each column is standardised over the rows (unbiased std + 1e-5, as FAERec's code); a sum over
    dimensions, not a mean (the scale is O(d)). Fewer than 2 rows: 0 (the std is undefined).
    """
    s = x.shape[0]
    if s < 2:
        return x.new_zeros(())
    zx = (x - x.mean(0)) / (x.std(0) + 1e-5)
    zy = (y - y.mean(0)) / (y.std(0) + 1e-5)
    c = zx.T @ zy / s  # [d, d]
    diag = torch.diagonal(c)
    on = (1.0 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + off_diagonal_weight * off


def grouped_barlow_twins(x: torch.Tensor, y: torch.Tensor, popularity: torch.Tensor,
                         off_diagonal_weight: float = 0.005, split: bool = True) -> torch.Tensor:
    """FAERec's FLA: :func:`barlow_twins` on the rows with ``popularity >= median`` plus on the rest.

    ``popularity [S]`` per row (training counts). ``split=False``: one loss over all rows ("w/o PG").
    Groups of fewer than 2 rows are skipped (no NaN).
    """
    if not split:
        return barlow_twins(x, y, off_diagonal_weight)
    high = popularity >= popularity.float().median()
    return barlow_twins(x[high], y[high], off_diagonal_weight) + barlow_twins(x[~high], y[~high], off_diagonal_weight)


def alignment_loss(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    ids: Optional[torch.Tensor] = None,
    bandwidth: str = "adaptive",
    temperature: float = 0.1,
) -> torch.Tensor:
    """The alignment loss ``name`` (one of :data:`ALIGNMENT_LOSSES`) between paired sets ``x``, ``y``."""
    if name == "mkmmd_gauss":
        return mk_mmd(x, y, "gaussian", bandwidth)
    if name == "mkmmd_laplace":
        return mk_mmd(x, y, "laplacian", bandwidth)
    if name == "mmd_linear":
        return linear_mmd(x, y)
    if name == "cosine":
        return cosine_alignment(x, y)
    if name == "infonce":
        return info_nce(x, y, temperature, ids)
    if name == "none":
        return x.new_zeros(())
    raise ValueError(f"unknown alignment loss '{name}'; choose one of {ALIGNMENT_LOSSES}")
