"""Frobenius projection operators (MATH.md "Frobenius covariance projection"):
``trpl::project_frob_diag`` (std vectors, Triton on CUDA) and ``trpl::project_frob_full``
(lower Cholesky factors, batched torch linear algebra on every device), each with its
``_backward`` op. Mean part: Mahalanobis distance w.r.t. the old covariance <= eps_mu."""

from __future__ import annotations

import torch

from ..kernels.frobenius import launch_frob_diag_bwd, launch_frob_diag_fwd
from ._common import ProjectionOp, to_float64
from ._linalg import cholesky_backward, inner, solve_lower, solve_lower_t
from ._torch_mean import bound_or_value, interpolation_direction, mean_project, mean_project_backward


def frob_diag(mean, std, old_mean, old_std, mean_bound, cov_bound, mbv, cbv):
    """(rows, d) std parametrization: ``v_t = v_o + a (v - v_o)``, ``a = sqrt(eps / f)``.

    Computed in float64 for float32 inputs: ``std^2`` overflows float32 past 1.8e19 (a
    silent NaN, issue 13.3) and underflows below 1e-19, and ``f`` overflows past 4e9; float64
    holds every float32 std's variance and ``f`` (by a scaled norm). Float64 inputs whose
    variances overflow are refused by the value checks."""
    dtype = mean.dtype
    mean, std, old_mean, old_std, mean_bound, cov_bound = to_float64(
        mean, std, old_mean, old_std, mean_bound, cov_bound
    )
    old_var = old_std * old_std
    mean_t = mean_project(mean, old_mean, (mean - old_mean) / old_var, bound_or_value(mean_bound, mbv))
    diff = std * std - old_var
    active, a, _ = interpolation_direction(diff, -1, bound_or_value(cov_bound, cbv))
    std_t = torch.sqrt(old_var + a * diff)
    return mean_t.to(dtype), torch.where(active.unsqueeze(-1), std_t, std).to(dtype)


def frob_diag_backward(g_mean, g_std, mean, std, old_mean, old_std, mean_bound, cov_bound, mbv, cbv):
    dtype = mean.dtype
    g_mean, g_std, mean, std, old_mean, old_std, mean_bound, cov_bound = to_float64(
        g_mean, g_std, mean, std, old_mean, old_std, mean_bound, cov_bound
    )
    old_var = old_std * old_std
    g_mean = mean_project_backward(g_mean, mean, old_mean, (mean - old_mean) / old_var, bound_or_value(mean_bound, mbv))
    diff = std * std - old_var
    active, a, unit = interpolation_direction(diff, -1, bound_or_value(cov_bound, cbv))
    g_var_t = g_std / (2.0 * torch.sqrt(old_var + a * diff))
    # dL/dv = a g - (a / f) <g, D> D = a (g - <g, u> u), u = D / ||D||
    g_var = a * (g_var_t - (g_var_t * unit).sum(-1, keepdim=True) * unit)
    return g_mean.to(dtype), torch.where(active.unsqueeze(-1), 2.0 * std * g_var, g_std).to(dtype)


def _frob_full_common(mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv):
    chol, old_chol = factor.tril(), old_factor.tril()
    delta = mean - old_mean
    prec_delta = solve_lower_t(old_chol, solve_lower(old_chol, delta))
    cov, old_cov = chol @ chol.mT, old_chol @ old_chol.mT
    diff = cov - old_cov
    active, a, unit = interpolation_direction(diff, (-2, -1), bound_or_value(cov_bound, cbv))
    # S_t = (1 - a) S_o + a S = B B^T with B = [sqrt(1 - a) C_o, sqrt(a) C]: its factor is
    # R^T of a QR of B^T, which cannot fail the way a Cholesky of the formed S_t does when
    # rounding makes it indefinite (float32, cond(C_o) >= 1e8: issue 13.2)
    b = torch.cat([torch.sqrt(1.0 - a) * old_chol, torch.sqrt(a) * chol], dim=-1)
    rr = torch.linalg.qr(b.mT, mode="r")[1]
    chol_t = rr.mT * torch.sign(rr.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)
    return chol, prec_delta, unit, active, a, chol_t


def frob_full(mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv):
    """(rows, d, d) lower Cholesky factors (upper triangles are ignored). Computed in
    float64 (float32 loses the positive definiteness of ill-conditioned covariances)."""
    dtype = mean.dtype
    mean, factor, old_mean, old_factor, mean_bound, cov_bound = to_float64(
        mean, factor, old_mean, old_factor, mean_bound, cov_bound
    )
    chol, prec_delta, _, active, _, chol_t = _frob_full_common(
        mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv
    )
    mean_t = mean_project(mean, old_mean, prec_delta, bound_or_value(mean_bound, mbv))
    return mean_t.to(dtype), torch.where(active[..., None, None], chol_t, chol).to(dtype)


def frob_full_backward(g_mean, g_factor, mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv):
    dtype = mean.dtype
    g_mean, g_factor, mean, factor, old_mean, old_factor, mean_bound, cov_bound = to_float64(
        g_mean, g_factor, mean, factor, old_mean, old_factor, mean_bound, cov_bound
    )
    chol, prec_delta, unit, active, a, chol_t = _frob_full_common(
        mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv
    )
    g_mean = mean_project_backward(g_mean, mean, old_mean, prec_delta, bound_or_value(mean_bound, mbv))
    g_cov_t = cholesky_backward(chol_t, g_factor)
    # S_t = S_o + a (S - S_o), a = sqrt(eps / f): dL/dS = a (G - <G, U> U), U = D / ||D||
    g_cov = a * (g_cov_t - inner(g_cov_t, unit)[..., None, None] * unit)
    g_chol = ((g_cov + g_cov.mT) @ chol).tril()
    return g_mean.to(dtype), torch.where(active[..., None, None], g_chol, g_factor.tril()).to(dtype)


FROB_DIAG = ProjectionOp(
    "project_frob_diag", 1, frob_diag, frob_diag_backward, launch_frob_diag_fwd, launch_frob_diag_bwd
)
FROB_FULL = ProjectionOp("project_frob_full", 2, frob_full, frob_full_backward)
