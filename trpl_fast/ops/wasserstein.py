"""Wasserstein-2 projection operators, scaled by the old covariance (MATH.md
"Wasserstein-2 covariance projection"): ``trpl::project_w2_diag`` (std vectors, Triton on
CUDA) and ``trpl::project_w2_full`` (symmetric square roots ``Q``, ``S = Q Q``; batched
torch linear algebra on every device), each with its ``_backward`` op.

Full covariance: ``w = tr(I + Q_o^-1 S Q_o^-1 - 2 Q_o^-1 Q) = ||Q_o^-1 Q - I||_F^2`` for
symmetric ``Q``, ``Q_o``; the projection ``Q_t = Q_o + sqrt(eps / w) (Q - Q_o)`` is the
paper's commuting-case formula, applied as is (MATH.md)."""

from __future__ import annotations

import torch

from ..kernels.wasserstein import launch_w2_diag_bwd, launch_w2_diag_fwd
from ._common import ProjectionOp
from ._linalg import inner
from ._torch_mean import (
    bound_or_value,
    interpolation_direction,
    interpolation_scale,
    mean_project,
    mean_project_backward,
)


def w2_diag(mean, std, old_mean, old_std, mean_bound, cov_bound, mbv, cbv):
    """``w = ||sd / sd_o - 1||^2`` by a scaled norm (``w`` overflows float32 for std ratios
    past 1.8e19 and would give ``a = 0``: the old std, silently not the projection)."""
    mean_t = mean_project(mean, old_mean, (mean - old_mean) / (old_std * old_std), bound_or_value(mean_bound, mbv))
    rel = std / old_std - 1.0
    active, a, _ = interpolation_direction(rel, -1, bound_or_value(cov_bound, cbv))
    std_t = old_std + a * (std - old_std)
    return mean_t, torch.where(active.unsqueeze(-1), std_t, std)


def w2_diag_backward(g_mean, g_std, mean, std, old_mean, old_std, mean_bound, cov_bound, mbv, cbv):
    g_mean = mean_project_backward(
        g_mean, mean, old_mean, (mean - old_mean) / (old_std * old_std), bound_or_value(mean_bound, mbv)
    )
    rel = std / old_std - 1.0
    active, a, unit = interpolation_direction(rel, -1, bound_or_value(cov_bound, cbv))
    # sd_t = sd_o + a (sd - sd_o): dL/dsd = a g - (a / w) <g, sd - sd_o> rel / sd_o
    #                                     = a (g - <g sd_o, u> u / sd_o),  u = rel / ||rel||
    g = a * (g_std - (g_std * old_std * unit).sum(-1, keepdim=True) * unit / old_std)
    return g_mean, torch.where(active.unsqueeze(-1), g, g_std)


def _w2_full_common(mean, sqrt_cov, old_mean, old_sqrt_cov, cov_bound, cbv):
    old_root_chol = torch.linalg.cholesky(old_sqrt_cov)  # Q_o is SPD: solves by Cholesky
    delta = mean - old_mean
    # L_o delta = Q_o^-2 delta
    prec_delta = torch.cholesky_solve(torch.cholesky_solve(delta.unsqueeze(-1), old_root_chol), old_root_chol).squeeze(
        -1
    )
    eye = torch.eye(sqrt_cov.shape[-1], dtype=sqrt_cov.dtype, device=sqrt_cov.device)
    rel = torch.cholesky_solve(sqrt_cov, old_root_chol) - eye  # Q_o^-1 Q - I
    active, w, a = interpolation_scale(inner(rel, rel), bound_or_value(cov_bound, cbv))
    return old_root_chol, prec_delta, rel, active, w, a[..., None, None]


def w2_full(mean, sqrt_cov, old_mean, old_sqrt_cov, mean_bound, cov_bound, mbv, cbv):
    _, prec_delta, _, active, _, a = _w2_full_common(mean, sqrt_cov, old_mean, old_sqrt_cov, cov_bound, cbv)
    mean_t = mean_project(mean, old_mean, prec_delta, bound_or_value(mean_bound, mbv))
    q_t = old_sqrt_cov + a * (sqrt_cov - old_sqrt_cov)
    return mean_t, torch.where(active[..., None, None], q_t, sqrt_cov)


def w2_full_backward(g_mean, g_q, mean, sqrt_cov, old_mean, old_sqrt_cov, mean_bound, cov_bound, mbv, cbv):
    old_root_chol, prec_delta, rel, active, w, a = _w2_full_common(
        mean, sqrt_cov, old_mean, old_sqrt_cov, cov_bound, cbv
    )
    g_mean = mean_project_backward(g_mean, mean, old_mean, prec_delta, bound_or_value(mean_bound, mbv))
    # dw/dQ = 2 Q_o^-1 (Q_o^-1 Q - I); da/dQ = -(a / w) Q_o^-1 (Q_o^-1 Q - I)
    dw_dir = torch.cholesky_solve(rel, old_root_chol)
    g_dot = inner(g_q, sqrt_cov - old_sqrt_cov)[..., None, None]
    g = a * g_q - (a / w[..., None, None]) * g_dot * dw_dir
    return g_mean, torch.where(active[..., None, None], g, g_q)


W2_DIAG = ProjectionOp("project_w2_diag", 1, w2_diag, w2_diag_backward, launch_w2_diag_fwd, launch_w2_diag_bwd)
W2_FULL = ProjectionOp("project_w2_full", 2, w2_full, w2_full_backward)
