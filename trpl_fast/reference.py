"""Slow, obviously-correct float64 reference math for every distance and projection.

Everything here is written straight from ``../shared/design/MATH.md`` on dense covariance
matrices, in float64, with plain torch autograd. It is the test oracle, the baseline the
benchmarks compare with, and executable documentation. It is never on a hot path.

Conventions (per state; any number of leading batch dimensions):

* ``mean``, ``old_mean``: (..., d).
* ``cov``, ``old_cov``: (..., d, d) symmetric positive definite covariances.
* ``sqrt_cov``: (..., d, d) the symmetric positive definite square root ``Q`` (``S = Q Q``).
* ``bound``: a Python float or a tensor broadcastable to the batch shape (...).

The parametrized wrappers :func:`project_diag` and :func:`project_full` take and return the
same parametrization as the public API ``trpl_fast.project_diag`` / ``project_full``: std
vectors, lower Cholesky factors (``frob``, ``kl``) or symmetric square roots (``w2``). The
diagonal wrappers embed the variances into dense matrices and call the dense projections,
so every diagonal kernel is also checked against the full-covariance math.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "maha",
    "mean_distance",
    "project_mean",
    "cov_distance",
    "frob_distance",
    "w2_distance",
    "kl_cov",
    "kl",
    "entropy",
    "project_frob",
    "project_w2",
    "project_kl",
    "project_diag",
    "project_full",
    "KINDS",
]

KINDS = ("frob", "w2", "kl")

f64 = torch.float64


def _bound(bound, like: Tensor) -> Tensor:
    return torch.as_tensor(bound, dtype=f64, device=like.device)


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.mT)


def maha(mean: Tensor, old_mean: Tensor, old_cov: Tensor) -> Tensor:
    """Squared Mahalanobis distance ``(mu - mu_o)^T S_o^-1 (mu - mu_o)``, shape (...)."""
    diff = (mean - old_mean).to(f64)
    sol = torch.linalg.solve(old_cov.to(f64), diff.unsqueeze(-1)).squeeze(-1)
    return (diff * sol).sum(-1)


def mean_distance(kind: str, mean: Tensor, old_mean: Tensor, old_cov: Tensor) -> Tensor:
    """The mean part of each projection's constraint (MATH.md "Mean projection").

    ``frob`` and ``w2`` bound the Mahalanobis distance ``m``; ``kl`` bounds ``0.5 m``.
    """
    m = maha(mean, old_mean, old_cov)
    return 0.5 * m if kind == "kl" else m


def project_mean(kind: str, mean: Tensor, old_mean: Tensor, old_cov: Tensor, bound) -> Tensor:
    """Mean projection (MATH.md "Mean projection"), shape (..., d).

    ``omega = sqrt(m / eps) - 1``, ``mu_t = (mu + omega mu_o) / (1 + omega)`` where the
    constraint is violated, ``mu_t = mu`` otherwise. For ``kl`` the bound is on ``0.5 m``.
    """
    mean, old_mean = mean.to(f64), old_mean.to(f64)
    eps = _bound(bound, mean)
    if kind == "kl":
        eps = 2.0 * eps
    m = maha(mean, old_mean, old_cov)
    active = m > eps
    omega = torch.sqrt(torch.where(active, m, eps) / eps) - 1.0
    proj = (mean + omega.unsqueeze(-1) * old_mean) / (1.0 + omega.unsqueeze(-1))
    return torch.where(active.unsqueeze(-1), proj, mean)


def frob_distance(cov: Tensor, old_cov: Tensor) -> Tensor:
    """Squared Frobenius norm ``||S - S_o||_F^2``, shape (...)."""
    diff = (cov - old_cov).to(f64)
    return (diff * diff).sum((-2, -1))


def w2_distance(sqrt_cov: Tensor, old_sqrt_cov: Tensor, scaled: bool = True) -> Tensor:
    """Covariance part of the squared W2 distance (MATH.md "Wasserstein-2").

    scaled:   ``tr(I + Q_o^-1 S Q_o^-1 - 2 Q_o^-1 Q)`` with ``S = Q Q``;
    unscaled: ``tr(S_o + S - 2 Q_o Q)``.
    """
    q, qo = sqrt_cov.to(f64), old_sqrt_cov.to(f64)
    s, so = q @ q, qo @ qo
    if scaled:
        qo_inv = torch.linalg.inv(qo)
        eye = torch.eye(q.shape[-1], dtype=f64, device=q.device)
        return _trace(eye + qo_inv @ s @ qo_inv - 2.0 * qo_inv @ q)
    return _trace(so + s - 2.0 * qo @ q)


def _trace(a: Tensor) -> Tensor:
    return a.diagonal(dim1=-2, dim2=-1).sum(-1)


def kl_cov(cov: Tensor, old_cov: Tensor) -> Tensor:
    """Covariance part of ``KL(N(., S) || N(., S_o))``:
    ``0.5 [tr(S_o^-1 S) - d + log|S_o| - log|S|]``, shape (...)."""
    s, so = cov.to(f64), old_cov.to(f64)
    d = s.shape[-1]
    tr = _trace(torch.linalg.solve(so, s))
    return 0.5 * (tr - d + torch.logdet(so) - torch.logdet(s))


def kl(mean: Tensor, cov: Tensor, old_mean: Tensor, old_cov: Tensor) -> Tensor:
    """Full ``KL(N(mu, S) || N(mu_o, S_o)) = 0.5 maha(mu, mu_o; S_o) + kl_cov``."""
    return 0.5 * maha(mean, old_mean, old_cov) + kl_cov(cov, old_cov)


def entropy(cov: Tensor) -> Tensor:
    """Gaussian entropy ``0.5 log|2 pi e S|``, shape (...)."""
    s = cov.to(f64)
    d = s.shape[-1]
    return 0.5 * (d * math.log(2.0 * math.pi * math.e) + torch.logdet(s))


def _interpolate_active(dist: Tensor, eps: Tensor, x: Tensor, x_old: Tensor) -> Tensor:
    """``(x + eta x_o) / (1 + eta)``, ``eta = sqrt(dist / eps) - 1`` where ``dist > eps``."""
    active = dist > eps
    eta = torch.sqrt(torch.where(active, dist, eps) / eps) - 1.0
    eta = eta[..., None, None]
    proj = (x + eta * x_old) / (1.0 + eta)
    return torch.where(active[..., None, None], proj, x)


def project_frob(mean, cov, old_mean, old_cov, mean_bound, cov_bound):
    """Frobenius projection (MATH.md), dense covariances in, dense covariances out."""
    cov, old_cov = cov.to(f64), old_cov.to(f64)
    mean_t = project_mean("frob", mean, old_mean, old_cov, mean_bound)
    eps = _bound(cov_bound, cov)
    cov_t = _interpolate_active(frob_distance(cov, old_cov), eps, cov, old_cov)
    return mean_t, cov_t


def project_w2(mean, sqrt_cov, old_mean, old_sqrt_cov, mean_bound, cov_bound, scaled=True):
    """Wasserstein-2 projection of the square root (MATH.md, commuting case)."""
    q, qo = sqrt_cov.to(f64), old_sqrt_cov.to(f64)
    mean_t = project_mean("w2", mean, old_mean, qo @ qo, mean_bound)
    eps = _bound(cov_bound, q)
    q_t = _interpolate_active(w2_distance(q, qo, scaled), eps, q, qo)
    return mean_t, q_t


def _kl_interp_cov(t: Tensor, prec: Tensor, old_prec: Tensor) -> Tensor:
    t = t[..., None, None]
    return torch.linalg.inv(t * prec + (1.0 - t) * old_prec)


def project_kl(mean, cov, old_mean, old_cov, mean_bound, cov_bound, iters: int = 200):
    """KL projection (MATH.md "KL covariance projection") by bisection on ``t``.

    ``L_t = t L + (1 - t) L_o`` with ``t`` in (0, 1) the root of ``KLc(S_t || S_o) = eps``,
    found by ``iters`` bisection steps on the monotone function ``KLc(t)`` evaluated with
    dense inverses and log-determinants (no whitening, no Newton). The returned covariance
    is differentiable: ``t`` enters the graph through one implicit-function step
    ``t* - F(t*, L) / stopgrad(dF/dt)``, whose value is ``t*`` and whose derivative is the
    implicit ``-F_L / F_t``.
    """
    cov, old_cov = cov.to(f64), old_cov.to(f64)
    mean_t = project_mean("kl", mean, old_mean, old_cov, mean_bound)
    eps = _bound(cov_bound, cov).expand(cov.shape[:-2])
    prec, old_prec = torch.linalg.inv(cov), torch.linalg.inv(old_cov)
    active = kl_cov(cov, old_cov) > eps

    with torch.no_grad():
        lo = torch.zeros(cov.shape[:-2], dtype=f64, device=cov.device)
        hi = torch.ones_like(lo)
        p, po = prec.detach(), old_prec
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            over = kl_cov(_kl_interp_cov(mid, p, po), old_cov) > eps
            hi = torch.where(over, mid, hi)
            lo = torch.where(over, lo, mid)
        t_star = torch.where(active, 0.5 * (lo + hi), torch.ones_like(lo))

    # dF/dt at t*, by autograd on a detached copy.
    with torch.enable_grad():
        tv = t_star.clone().requires_grad_(True)
        f = kl_cov(_kl_interp_cov(tv, prec.detach(), old_prec), old_cov)
        (dfdt,) = torch.autograd.grad(f.sum(), tv)
    f_at = kl_cov(_kl_interp_cov(t_star, prec, old_prec), old_cov) - eps
    safe = torch.where(active, dfdt, torch.ones_like(dfdt))
    t = torch.where(active, t_star - f_at / safe, t_star)
    cov_t = _kl_interp_cov(t, prec, old_prec)
    cov_t = torch.where(active[..., None, None], _sym(cov_t), cov)
    return mean_t, cov_t


def _project_dense(kind, mean, cov_param, old_mean, old_cov_param, mean_bound, cov_bound):
    if kind == "frob":
        return project_frob(mean, cov_param, old_mean, old_cov_param, mean_bound, cov_bound)
    if kind == "w2":
        return project_w2(mean, cov_param, old_mean, old_cov_param, mean_bound, cov_bound)
    if kind == "kl":
        return project_kl(mean, cov_param, old_mean, old_cov_param, mean_bound, cov_bound)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def project_diag(mean, std, old_mean, old_std, *, kind, mean_bound, cov_bound):
    """Reference for ``trpl_fast.project_diag``: std vectors (..., d) in and out."""
    std, old_std = std.to(f64), old_std.to(f64)
    if kind == "w2":  # the square root of a diagonal covariance is diag(std)
        param, old_param = torch.diag_embed(std), torch.diag_embed(old_std)
    else:
        param, old_param = torch.diag_embed(std**2), torch.diag_embed(old_std**2)
    mean_t, param_t = _project_dense(kind, mean, param, old_mean, old_param, mean_bound, cov_bound)
    diag = param_t.diagonal(dim1=-2, dim2=-1)
    return mean_t, (diag if kind == "w2" else torch.sqrt(diag))


def project_full(mean, factor, old_mean, old_factor, *, kind, mean_bound, cov_bound):
    """Reference for ``trpl_fast.project_full``.

    ``factor`` is the lower Cholesky factor (``frob``, ``kl``; only its lower triangle is
    read) or the symmetric square root (``w2``); the result has the same type.
    """
    factor, old_factor = factor.to(f64), old_factor.to(f64)
    if kind == "w2":
        return project_w2(mean, factor, old_mean, old_factor, mean_bound, cov_bound)
    chol, old_chol = factor.tril(), old_factor.tril()
    cov, old_cov = chol @ chol.mT, old_chol @ old_chol.mT
    mean_t, cov_t = _project_dense(kind, mean, cov, old_mean, old_cov, mean_bound, cov_bound)
    # Rows inside the region are returned unchanged (the identity), as the operators do.
    active = (cov_distance(kind, cov, old_cov) > _bound(cov_bound, cov))[..., None, None]
    chol_t = torch.linalg.cholesky(torch.where(active, cov_t, old_cov))
    return mean_t, torch.where(active, chol_t, chol)


def cov_distance(kind: str, cov_param: Tensor, old_cov_param: Tensor) -> Tensor:
    """The covariance part of each projection's constraint, on dense parameters:
    covariances for ``frob`` and ``kl``, square roots for ``w2`` (scaled)."""
    if kind == "frob":
        return frob_distance(cov_param, old_cov_param)
    if kind == "w2":
        return w2_distance(cov_param, old_cov_param)
    if kind == "kl":
        return kl_cov(cov_param, old_cov_param)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
