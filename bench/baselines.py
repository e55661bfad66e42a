"""Eager-torch baselines: the projection math written the way the original TRPL code does
it, as a chain of unfused torch ops in the input dtype, differentiated by plain autograd.
Benchmarks time ``trpl`` against these and against ``torch.compile`` of them."""

from __future__ import annotations

import torch


def _mean(mean, old_mean, prec_delta_fn, eps):
    delta = mean - old_mean
    m = (delta * prec_delta_fn(delta)).sum(-1, keepdim=True)
    omega = torch.clamp(torch.sqrt(m / eps) - 1.0, min=0.0)
    return (mean + omega * old_mean) / (1.0 + omega)


def eager_diag(kind, mean, std, old_mean, old_std, mean_bound, cov_bound):
    """Diagonal Frobenius / W2 projection, (..., d) std vectors."""
    old_var = old_std**2
    mean_t = _mean(mean, old_mean, lambda x: x / old_var, mean_bound)
    if kind == "frob":
        var = std**2
        f = ((var - old_var) ** 2).sum(-1, keepdim=True)
        eta = torch.clamp(torch.sqrt(f / cov_bound) - 1.0, min=0.0)
        return mean_t, torch.sqrt((var + eta * old_var) / (1.0 + eta))
    w = ((std / old_std - 1.0) ** 2).sum(-1, keepdim=True)
    eta = torch.clamp(torch.sqrt(w / cov_bound) - 1.0, min=0.0)
    return mean_t, (std + eta * old_std) / (1.0 + eta)


def eager_full(kind, mean, factor, old_mean, old_factor, mean_bound, cov_bound):
    """Full-covariance Frobenius (Cholesky factors) / W2 (symmetric roots) projection."""
    if kind == "frob":
        mean_t = _mean(
            mean, old_mean, lambda x: torch.cholesky_solve(x.unsqueeze(-1), old_factor).squeeze(-1), mean_bound
        )
        cov, old_cov = factor @ factor.mT, old_factor @ old_factor.mT
        f = ((cov - old_cov) ** 2).sum((-2, -1))[..., None, None]
        eta = torch.clamp(torch.sqrt(f / cov_bound) - 1.0, min=0.0)
        return mean_t, torch.linalg.cholesky((cov + eta * old_cov) / (1.0 + eta))
    old_inv = torch.linalg.inv(old_factor)
    mean_t = _mean(mean, old_mean, lambda x: (old_inv @ (old_inv @ x.unsqueeze(-1))).squeeze(-1), mean_bound)
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    w = ((old_inv @ factor - eye) ** 2).sum((-2, -1))[..., None, None]
    eta = torch.clamp(torch.sqrt(w / cov_bound) - 1.0, min=0.0)
    return mean_t, (factor + eta * old_factor) / (1.0 + eta)


def _eager_newton(r, cov_bound, iters):
    """``iters`` plain Newton steps on ``log KLc(t) - log eps`` from the MATH.md start."""
    t = torch.clamp(2.0 * torch.sqrt(cov_bound / (r * r).sum(-1, keepdim=True)), max=1.0)
    for _ in range(iters):
        x = t * r
        kl = 0.5 * (torch.log1p(x) - x / (1.0 + x)).sum(-1, keepdim=True)
        dkl = 0.5 * (t * r * r / (1.0 + x) ** 2).sum(-1, keepdim=True)
        t = torch.clamp(t - torch.log(kl / cov_bound) * kl / dkl, 1e-12, 1.0)
    return t


def eager_kl_diag(mean, std, old_mean, old_std, mean_bound, cov_bound, iters: int = 8):
    """Diagonal KL projection as eager torch: the same safeguard-free Newton iteration on
    ``log KLc(t)`` for ``iters`` fixed steps, differentiated by autograd through the
    iterations (no implicit gradient, no fused kernel)."""
    old_var = old_std**2
    mean_t = _mean(mean, old_mean, lambda x: x / old_var, 2.0 * mean_bound)
    r = old_var / std**2 - 1.0
    kl1 = 0.5 * (torch.log1p(r) - r / (1.0 + r)).sum(-1, keepdim=True)
    t = _eager_newton(r, cov_bound, iters)
    t = torch.where(kl1 > cov_bound, t, torch.ones_like(t))
    return mean_t, old_std / torch.sqrt(1.0 + t * r)


def eager_kl_full(mean, factor, old_mean, old_factor, mean_bound, cov_bound, iters: int = 8):
    """Full-covariance KL projection as eager torch (whitening, eigh, fixed Newton steps,
    autograd through everything)."""
    mean_t = _mean(
        mean, old_mean, lambda x: torch.cholesky_solve(x.unsqueeze(-1), old_factor).squeeze(-1), 2.0 * mean_bound
    )
    a = torch.linalg.solve_triangular(factor, old_factor, upper=False)
    m, u = torch.linalg.eigh(a.mT @ a)
    r = m - 1.0
    t = _eager_newton(r, cov_bound, iters)
    w = old_factor @ u
    cov_t = (w / (1.0 + t * r).unsqueeze(-2)) @ w.mT
    return mean_t, torch.linalg.cholesky(0.5 * (cov_t + cov_t.mT))
