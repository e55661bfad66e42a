"""Frobenius projection operators (MATH.md "Frobenius covariance projection"):
``trpl::project_frob_diag`` (std vectors, Triton on CUDA) and ``trpl::project_frob_full``
(lower Cholesky factors, batched torch linear algebra on every device), each with its
``_backward`` op. Mean part: Mahalanobis distance w.r.t. the old covariance <= eps_mu."""

from __future__ import annotations

import torch

from ..kernels.frobenius import launch_frob_diag_bwd, launch_frob_diag_fwd
from ._common import ProjectionOp
from ._linalg import cholesky_backward, inner, solve_lower, solve_lower_t
from ._torch_mean import bound_or_value, interpolation_scale, mean_project, mean_project_backward


def frob_diag(mean, std, old_mean, old_std, mean_bound, cov_bound, mbv, cbv):
    """(rows, d) std parametrization: ``v_t = v_o + a (v - v_o)``, ``a = sqrt(eps / f)``."""
    old_var = old_std * old_std
    mean_t = mean_project(mean, old_mean, (mean - old_mean) / old_var, bound_or_value(mean_bound, mbv))
    diff = std * std - old_var
    active, _, a = interpolation_scale((diff * diff).sum(-1), bound_or_value(cov_bound, cbv))
    std_t = torch.sqrt(old_var + a.unsqueeze(-1) * diff)
    return mean_t, torch.where(active.unsqueeze(-1), std_t, std)


def frob_diag_backward(g_mean, g_std, mean, std, old_mean, old_std, mean_bound, cov_bound, mbv, cbv):
    old_var = old_std * old_std
    g_mean = mean_project_backward(g_mean, mean, old_mean, (mean - old_mean) / old_var,
                                   bound_or_value(mean_bound, mbv))
    diff = std * std - old_var
    active, f, a = interpolation_scale((diff * diff).sum(-1), bound_or_value(cov_bound, cbv))
    a = a.unsqueeze(-1)
    g_var_t = g_std / (2.0 * torch.sqrt(old_var + a * diff))
    g_var = a * g_var_t - (a / f.unsqueeze(-1)) * (g_var_t * diff).sum(-1, keepdim=True) * diff
    return g_mean, torch.where(active.unsqueeze(-1), 2.0 * std * g_var, g_std)


def _frob_full_common(mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv):
    chol, old_chol = factor.tril(), old_factor.tril()
    delta = mean - old_mean
    prec_delta = solve_lower_t(old_chol, solve_lower(old_chol, delta))
    cov, old_cov = chol @ chol.mT, old_chol @ old_chol.mT
    diff = cov - old_cov
    active, f, a = interpolation_scale(inner(diff, diff), bound_or_value(cov_bound, cbv))
    a = a[..., None, None]
    # Inactive rows factor the old covariance instead (always PD), then are replaced.
    cov_t = torch.where(active[..., None, None], old_cov + a * diff, old_cov)
    chol_t = torch.linalg.cholesky(cov_t)
    return chol, prec_delta, diff, active, f, a, chol_t


def frob_full(mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv):
    """(rows, d, d) lower Cholesky factors (upper triangles are ignored)."""
    chol, prec_delta, _, active, _, _, chol_t = _frob_full_common(
        mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv)
    mean_t = mean_project(mean, old_mean, prec_delta, bound_or_value(mean_bound, mbv))
    return mean_t, torch.where(active[..., None, None], chol_t, chol)


def frob_full_backward(g_mean, g_factor, mean, factor, old_mean, old_factor, mean_bound,
                       cov_bound, mbv, cbv):
    chol, prec_delta, diff, active, f, a, chol_t = _frob_full_common(
        mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv)
    g_mean = mean_project_backward(g_mean, mean, old_mean, prec_delta, bound_or_value(mean_bound, mbv))
    g_cov_t = cholesky_backward(chol_t, g_factor)
    # S_t = S_o + a (S - S_o), a = sqrt(eps / f): dL/dS = a G - (a / f) <G, D> D
    g_cov = a * g_cov_t - (a / f[..., None, None]) * inner(g_cov_t, diff)[..., None, None] * diff
    g_chol = ((g_cov + g_cov.mT) @ chol).tril()
    return g_mean, torch.where(active[..., None, None], g_chol, g_factor.tril())


FROB_DIAG = ProjectionOp("project_frob_diag", 1, frob_diag, frob_diag_backward,
                         launch_frob_diag_fwd, launch_frob_diag_bwd)
FROB_FULL = ProjectionOp("project_frob_full", 2, frob_full, frob_full_backward)
