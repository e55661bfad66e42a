"""Batched, differentiable distances, KL and entropy in the policy parametrizations.

``form`` is ``"diag"`` (``cov`` = std (..., d)) or ``"full"`` (``cov`` = factor (..., d, d):
lower Cholesky factor for ``frob`` / ``kl``, symmetric square root for ``w2``). These are
the fast counterparts of the dense float64 functions in :mod:`trpl_fast.reference` (and
are tested against them); the layer uses them for its loss and metrics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI_E = math.log(2.0 * math.pi * math.e)


def cholesky_of(kind: str, form: str, cov: Tensor) -> Tensor:
    """Lower Cholesky factor of the covariance for a full parametrization."""
    if kind == "w2":
        return torch.linalg.cholesky(cov @ cov)
    return cov.tril()


def maha(kind: str, form: str, mean: Tensor, ref_mean: Tensor, ref_cov: Tensor) -> Tensor:
    """Squared Mahalanobis distance of ``mean`` w.r.t. the reference (old) policy, (...)."""
    delta = mean - ref_mean
    if form == "diag":
        return ((delta / ref_cov) ** 2).sum(-1)
    if kind == "w2":  # S_o^-1/2 = Q_o^-1
        z = torch.linalg.solve(ref_cov, delta.unsqueeze(-1)).squeeze(-1)
    else:
        z = torch.linalg.solve_triangular(ref_cov.tril(), delta.unsqueeze(-1), upper=False).squeeze(-1)
    return (z * z).sum(-1)


def mean_part(kind: str, form: str, mean: Tensor, ref_mean: Tensor, ref_cov: Tensor) -> Tensor:
    """The mean part of the projection's constraint: ``maha`` (frob, w2), ``0.5 maha`` (kl)."""
    m = maha(kind, form, mean, ref_mean, ref_cov)
    return 0.5 * m if kind == "kl" else m


def kl_cov_part(kind: str, form: str, cov: Tensor, ref_cov: Tensor) -> Tensor:
    """``KLc(S || S_ref) = 0.5 [tr(S_ref^-1 S) - d + log|S_ref| - log|S|]``, (...)."""
    if form == "diag":
        r = (cov / ref_cov) ** 2
        return 0.5 * (r - 1.0 - torch.log(r)).sum(-1)
    c, c_ref = cholesky_of(kind, form, cov), cholesky_of(kind, form, ref_cov)
    d = c.shape[-1]
    x = torch.linalg.solve_triangular(c_ref, c, upper=False)
    logdet_ratio = 2.0 * (torch.log(c_ref.diagonal(dim1=-2, dim2=-1)) - torch.log(c.diagonal(dim1=-2, dim2=-1))).sum(-1)
    return 0.5 * ((x * x).sum((-2, -1)) - d + logdet_ratio)


def cov_part(kind: str, form: str, cov: Tensor, ref_cov: Tensor) -> Tensor:
    """The covariance part of the projection's own constraint (MATH.md), (...)."""
    if kind == "kl":
        return kl_cov_part(kind, form, cov, ref_cov)
    if form == "diag":
        if kind == "frob":
            return ((cov * cov - ref_cov * ref_cov) ** 2).sum(-1)
        return ((cov / ref_cov - 1.0) ** 2).sum(-1)
    if kind == "frob":
        c, c_ref = cov.tril(), ref_cov.tril()
        diff = c @ c.mT - c_ref @ c_ref.mT
        return (diff * diff).sum((-2, -1))
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    rel = torch.linalg.solve(ref_cov, cov) - eye
    return (rel * rel).sum((-2, -1))


def kl(kind: str, form: str, mean: Tensor, cov: Tensor, ref_mean: Tensor, ref_cov: Tensor) -> Tensor:
    """Full ``KL(N(mean, S) || N(ref_mean, S_ref))``, (...)."""
    return 0.5 * maha(kind, form, mean, ref_mean, ref_cov) + kl_cov_part(kind, form, cov, ref_cov)


def log_det_cov(kind: str, form: str, cov: Tensor) -> Tensor:
    """``log|S|``, (...)."""
    if form == "diag":
        return 2.0 * torch.log(cov).sum(-1)
    return 2.0 * torch.log(cholesky_of(kind, form, cov).diagonal(dim1=-2, dim2=-1)).sum(-1)


def entropy(kind: str, form: str, cov: Tensor) -> Tensor:
    """Gaussian entropy ``0.5 log|2 pi e S|``, (...)."""
    return 0.5 * (cov.shape[-1] * LOG_2PI_E + log_det_cov(kind, form, cov))


LOG_2PI = math.log(2.0 * math.pi)


def log_prob(kind: str, form: str, mean: Tensor, cov: Tensor, actions: Tensor) -> Tensor:
    """Gaussian log-density of ``actions`` (..., d) under ``N(mean, S(cov))``, (...)."""
    d = mean.shape[-1]
    if form == "diag":
        z = (actions - mean) / cov
        return -0.5 * (z * z).sum(-1) - torch.log(cov).sum(-1) - 0.5 * d * LOG_2PI
    chol = cholesky_of(kind, form, cov)
    z = torch.linalg.solve_triangular(chol, (actions - mean).unsqueeze(-1), upper=False).squeeze(-1)
    return -0.5 * (z * z).sum(-1) - torch.log(chol.diagonal(dim1=-2, dim2=-1)).sum(-1) - 0.5 * d * LOG_2PI


def sample(
    kind: str,
    form: str,
    mean: Tensor,
    cov: Tensor,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """One sample per state from ``N(mean, S(cov))``: ``mean + L noise`` with ``L`` the
    std (diagonal) or the lower Cholesky factor, ``noise`` standard normal (drawn from
    ``generator`` unless given, shape of ``mean``)."""
    if noise is not None and noise.shape != mean.shape:
        raise ValueError(f"noise must have the shape of mean {tuple(mean.shape)}, got {tuple(noise.shape)}")
    eps = (
        torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        if noise is None
        else noise.to(mean.device, mean.dtype)
    )
    if form == "diag":
        return mean + cov * eps
    return mean + (cholesky_of(kind, form, cov) @ eps.unsqueeze(-1)).squeeze(-1)
