"""Fused Wasserstein-2 projection (scaled by the old covariance) for diagonal covariances
(MATH.md "Wasserstein-2 covariance projection" + "Mean projection").

``w = sum((sigma / sigma_o - 1)^2)``; where ``w > eps``:
``sigma_t = sigma_o + sqrt(eps / w) (sigma - sigma_o)``.
"""

import torch
import triton
import triton.language as tl

from ._common import launch_rows, load_projection_inputs, load_tile, row_norm, row_tile
from .mean import mean_project_bwd, mean_project_fwd


@triton.jit
def _w2_diag_fwd_kernel(
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

    tl.store(mean_out_ptr + offs, mean_project_fwd(mu, mu_o, sd_o * sd_o, eps_mu), mask=mask)

    # w = ||rel||^2 by a scaled norm: it overflows float32 for ratios past 1.8e19 (a = 0
    # would return the old std, silently not the projection)
    rel = sd / sd_o - 1.0
    root_eps = tl.sqrt(eps_cov)
    norm = row_norm(rel)
    active = norm > root_eps
    scale = root_eps / tl.where(active, norm, root_eps)
    sd_t = sd_o + scale[:, None] * (sd - sd_o)
    tl.store(std_out_ptr + offs, tl.where(active[:, None], sd_t, sd), mask=mask)


@triton.jit
def _w2_diag_bwd_kernel(
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

    tl.store(grad_mean_out_ptr + offs, mean_project_bwd(g_mu, mu, mu_o, sd_o * sd_o, eps_mu), mask=mask)

    # sigma_t = sigma_o + a (sigma - sigma_o), a = sqrt(eps / w), dw/dsigma = 2 rel / sigma_o.
    # = a (g - <g sd_o, u> u / sd_o), u = rel / ||rel|| (nothing squared to overflow)
    rel = sd / sd_o - 1.0
    root_eps = tl.sqrt(eps_cov)
    norm = row_norm(rel)
    active = norm > root_eps
    norm_safe = tl.where(active, norm, root_eps)
    scale = root_eps / norm_safe
    unit = rel / norm_safe[:, None]
    g_dot = tl.sum(g_sd * sd_o * unit, axis=1)
    g = scale[:, None] * (g_sd - g_dot[:, None] * unit / sd_o)
    tl.store(grad_std_out_ptr + offs, tl.where(active[:, None], g, g_sd), mask=mask)


def launch_w2_diag_fwd(
    mean, std, old_mean, old_std, mean_bound, cov_bound, mean_bound_value: float, cov_bound_value: float
):
    """(rows, d) contiguous inputs, (rows,) bounds or None -> (mean_t, std_t)."""
    outs = [torch.empty_like(mean), torch.empty_like(std)]
    return tuple(
        launch_rows(
            _w2_diag_fwd_kernel,
            [mean, std, old_mean, old_std],
            outs,
            mean_bound,
            cov_bound,
            mean_bound_value,
            cov_bound_value,
        )
    )


def launch_w2_diag_bwd(
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
            _w2_diag_bwd_kernel,
            [grad_mean, grad_std, mean, std, old_mean, old_std],
            outs,
            mean_bound,
            cov_bound,
            mean_bound_value,
            cov_bound_value,
        )
    )
