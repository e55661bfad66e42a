"""Fused Frobenius projection for diagonal covariances (MATH.md "Frobenius covariance
projection" + "Mean projection").

Forward reads ``mean, std, old_mean, old_std`` once and writes ``mean_t, std_t`` once:
``f = sum((v - v_o)^2)``; where ``f > eps``: ``v_t = v_o + sqrt(eps / f) (v - v_o)``.
Backward recomputes the row sums from the inputs instead of saving them.

Both compute in float64 whatever the storage dtype (the torch path's ``frob_diag``):
``std^2`` overflows float32 past 1.8e19 and ``f`` past 4e9 (issue 13.3); loads and stores
keep the input dtype, so the traffic is unchanged. ``f`` is a scaled norm (``row_norm``).
"""

import torch
import triton
import triton.language as tl

from ._common import launch_rows, load_projection_inputs, load_tile, narrow, row_norm, row_tile, wide
from .mean import mean_project_bwd, mean_project_fwd


@triton.jit
def _frob_diag_fwd_kernel(
    mean_ptr,
    std_ptr,
    old_mean_ptr,
    old_std_ptr,
    mean_bound_ptr,
    cov_bound_ptr,
    mean_out_ptr,
    std_out_ptr,
    n_rows,
    d,
    mean_bound_value,
    cov_bound_value,
    HAS_MEAN_BOUND: tl.constexpr,
    HAS_COV_BOUND: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, row_mask, mask, offs = row_tile(tl.program_id(0), n_rows, d, BLOCK_ROWS, BLOCK_D)
    mu, sd, mu_o, sd_o, eps_mu, eps_cov = load_projection_inputs(
        mean_ptr,
        std_ptr,
        old_mean_ptr,
        old_std_ptr,
        mean_bound_ptr,
        cov_bound_ptr,
        rows,
        row_mask,
        mask,
        offs,
        mean_bound_value,
        cov_bound_value,
        HAS_MEAN_BOUND,
        HAS_COV_BOUND,
        F64,
        BLOCK_ROWS,
    )

    mu, sd, mu_o, sd_o, eps_mu, eps_cov = wide(mu), wide(sd), wide(mu_o), wide(sd_o), wide(eps_mu), wide(eps_cov)
    var_o = sd_o * sd_o
    mean_t = mean_project_fwd(mu, mu_o, var_o, eps_mu)
    tl.store(mean_out_ptr + offs, narrow(mean_t, F64), mask=mask)

    diff = sd * sd - var_o
    root_eps = tl.sqrt(eps_cov)
    norm = row_norm(diff)
    active = norm > root_eps
    scale = root_eps / tl.where(active, norm, root_eps)
    sd_t = tl.sqrt(var_o + scale[:, None] * diff)
    tl.store(std_out_ptr + offs, narrow(tl.where(active[:, None], sd_t, sd), F64), mask=mask)


@triton.jit
def _frob_diag_bwd_kernel(
    grad_mean_ptr,
    grad_std_ptr,
    mean_ptr,
    std_ptr,
    old_mean_ptr,
    old_std_ptr,
    mean_bound_ptr,
    cov_bound_ptr,
    grad_mean_out_ptr,
    grad_std_out_ptr,
    n_rows,
    d,
    mean_bound_value,
    cov_bound_value,
    HAS_MEAN_BOUND: tl.constexpr,
    HAS_COV_BOUND: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, row_mask, mask, offs = row_tile(tl.program_id(0), n_rows, d, BLOCK_ROWS, BLOCK_D)
    g_mu = load_tile(grad_mean_ptr, offs, mask, 0.0, F64)
    g_sd = load_tile(grad_std_ptr, offs, mask, 0.0, F64)
    mu, sd, mu_o, sd_o, eps_mu, eps_cov = load_projection_inputs(
        mean_ptr,
        std_ptr,
        old_mean_ptr,
        old_std_ptr,
        mean_bound_ptr,
        cov_bound_ptr,
        rows,
        row_mask,
        mask,
        offs,
        mean_bound_value,
        cov_bound_value,
        HAS_MEAN_BOUND,
        HAS_COV_BOUND,
        F64,
        BLOCK_ROWS,
    )

    g_mu, g_sd = wide(g_mu), wide(g_sd)
    mu, sd, mu_o, sd_o, eps_mu, eps_cov = wide(mu), wide(sd), wide(mu_o), wide(sd_o), wide(eps_mu), wide(eps_cov)
    var_o = sd_o * sd_o
    g_mean = mean_project_bwd(g_mu, mu, mu_o, var_o, eps_mu)
    tl.store(grad_mean_out_ptr + offs, narrow(g_mean, F64), mask=mask)

    # v_t = v_o + a (v - v_o), a = sqrt(eps / f): dL/dv = a g_v - (a / f) <g_v, D> D
    #                                                   = a (g_v - <g_v, u> u),  u = D / ||D||
    diff = sd * sd - var_o
    root_eps = tl.sqrt(eps_cov)
    norm = row_norm(diff)
    active = norm > root_eps
    norm_safe = tl.where(active, norm, root_eps)
    scale = root_eps / norm_safe
    unit = diff / norm_safe[:, None]
    sd_t = tl.sqrt(var_o + scale[:, None] * diff)
    g_var_t = g_sd / (2.0 * sd_t)
    g_dot = tl.sum(g_var_t * unit, axis=1)
    g_var = scale[:, None] * (g_var_t - g_dot[:, None] * unit)
    g_std = tl.where(active[:, None], 2.0 * sd * g_var, g_sd)
    tl.store(grad_std_out_ptr + offs, narrow(g_std, F64), mask=mask)


def launch_frob_diag_fwd(
    mean, std, old_mean, old_std, mean_bound, cov_bound, mean_bound_value: float, cov_bound_value: float
):
    """(rows, d) contiguous inputs, (rows,) bounds or None -> (mean_t, std_t)."""
    outs = [torch.empty_like(mean), torch.empty_like(std)]
    return tuple(
        launch_rows(
            _frob_diag_fwd_kernel,
            [mean, std, old_mean, old_std],
            outs,
            mean_bound,
            cov_bound,
            mean_bound_value,
            cov_bound_value,
        )
    )


def launch_frob_diag_bwd(
    grad_mean,
    grad_std,
    mean,
    std,
    old_mean,
    old_std,
    mean_bound,
    cov_bound,
    mean_bound_value: float,
    cov_bound_value: float,
):
    """Upstream grads and forward inputs -> (grad_mean, grad_std)."""
    outs = [torch.empty_like(mean), torch.empty_like(std)]
    return tuple(
        launch_rows(
            _frob_diag_bwd_kernel,
            [grad_mean, grad_std, mean, std, old_mean, old_std],
            outs,
            mean_bound,
            cov_bound,
            mean_bound_value,
            cov_bound_value,
        )
    )
