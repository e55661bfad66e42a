"""KL projection (MATH.md "KL covariance projection"): a batched, safeguarded Newton solve
of the 1-D dual for every row at once, fused with the mean projection for diagonal
covariances, and its implicit backward.

Per row, with whitened precision ratios ``r_i = m_i - 1`` (diagonal: ``m_i = v_o_i / v_i``)
and ``x_i = t r_i``, ``g_i = 1 + x_i``:

    KLc(t)  = 0.5 sum_i phi(x_i),      phi(x) = log1p(x) - x / (1 + x)
    KLc'(t) = 0.5 sum_i t r_i^2 / g_i^2

Newton runs on ``h(t) = log KLc(t) - log eps`` from ``t0 = min(1, 2 sqrt(eps / sum r^2))``
inside the bracket (0, 1), bisecting when a step leaves it; a row stops when
``|h| <= tol`` (its ``converged`` flag); a block stops when all its rows have, or after
``MAX_ITER`` iterations. ``phi`` is evaluated without cancellation: a series for small
``|x|``, ``log1p`` by Goldberg's ``log(u) x / (u - 1)`` otherwise.
"""

import torch
import triton
import triton.language as tl

from ._common import launch_rows, load_projection_inputs, load_row_bound, load_tile, row_tile
from .mean import mean_project_bwd, mean_project_fwd

MAX_ITER = 50
# tile and warps: the Newton loop runs fastest on small tiles (bench/tune_rows.py on an H100)
KL_GEOMETRY = dict(tile=512, warps=8)
# |log(KLc / eps)| at which a row counts as converged
TOL_F64 = 1e-12
TOL_F32 = 1e-5


@triton.jit
def kl_phi(x, F64: tl.constexpr):
    """``log1p(x) - x / (1 + x)`` for ``x > -1``, accurate for small ``|x|``."""
    u = 1.0 + x
    log1p = tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))
    large = log1p - x / u
    # sum_{k>=2} (-1)^k (k-1)/k x^k, 8 terms (Horner in x, times x^2)
    p = -8.0 / 9.0
    p = p * x + 7.0 / 8.0
    p = p * x - 6.0 / 7.0
    p = p * x + 5.0 / 6.0
    p = p * x - 4.0 / 5.0
    p = p * x + 3.0 / 4.0
    p = p * x - 2.0 / 3.0
    p = p * x + 0.5
    small = x * x * p
    if F64:
        cut = 0.01
    else:
        cut = 0.05
    return tl.where(tl.abs(x) < cut, small, large)


@triton.jit
def kl_at_one(r, F64: tl.constexpr):
    """``KLc(1)`` per row of the tile ``r``: ratios that rounded to ``r <= -1`` or overflowed
    to ``inf`` count as infinitely far (``phi`` is NaN there), so such rows are projected
    (the torch path's ``kl_at_one``)."""
    ok = (r > -1.0) & (r < float("inf"))
    return 0.5 * tl.sum(tl.where(ok, kl_phi(tl.where(ok, r, 0.0), F64), float("inf")), axis=1)


@triton.jit
def kl_dual_solve(r, eps, MAX_ITERS: tl.constexpr, F64: tl.constexpr):
    """Solve ``KLc(t) = eps`` per row of the (BLOCK_ROWS, BLOCK_D) tile ``r`` (padded
    lanes 0). Returns ``(t, converged, active)``; inactive rows (``KLc(1) <= eps``) get
    ``t = 1`` and count as converged. The same scheme as the torch path
    (``trpl_fast.ops.kl.kl_dual_newton``): the step in ``x = t r`` and ``x / g`` (no ``r^2``
    to overflow), a start scaled by ``max |r|``, rows with an overflowed ratio flagged with
    ``t = 0`` and unconverged rows returned at the inside end ``lo`` of their bracket."""
    if F64:
        tol = 1e-12
    else:
        tol = 1e-5
    active = kl_at_one(r, F64) > eps
    solvable = tl.sum((r == float("inf")).to(tl.int32), axis=1) == 0
    r = tl.where(solvable[:, None], r, 0.0)
    big = tl.max(tl.abs(r), axis=1)
    big = tl.where(active & (big > 0.0), big, 1.0)
    rs = r / big[:, None]
    norm = big * tl.sqrt(tl.sum(rs * rs, axis=1))
    t = tl.minimum(2.0 * tl.sqrt(eps) / tl.where(active & (norm > 0.0), norm, 1.0), 1.0)
    t = tl.where(active, t, 1.0)
    lo = tl.zeros_like(t)
    hi = tl.zeros_like(t) + 1.0
    done = active == 0
    n_open = tl.sum(active.to(tl.int32), axis=0)
    it = 0
    while (it < MAX_ITERS) & (n_open > 0):
        x = t[:, None] * r
        g = 1.0 + x
        kl = 0.5 * tl.sum(kl_phi(x, F64), axis=1)
        xg = x / g
        s2 = tl.sum(xg * xg, axis=1)
        pos = kl > 0.0
        h = tl.log(tl.where(pos, kl, eps) / eps)
        done = done | (pos & (tl.abs(h) <= tol))
        over = (kl <= eps) == 0
        hi = tl.where(over, t, hi)
        lo = tl.where(over, lo, t)
        t_new = t - 2.0 * t * h * kl / tl.where(s2 > 0.0, s2, 1.0)
        inside = pos & (t_new > lo) & (t_new < hi)
        t_new = tl.where(inside, t_new, 0.5 * (lo + hi))
        t = tl.where(done, t, t_new)
        n_open = tl.sum((done == 0).to(tl.int32), axis=0)
        it += 1
    done = done & solvable
    t = tl.where(done, t, tl.where(solvable, lo, 0.0))
    return t, done, active


@triton.jit
def _precision_ratio_minus_one(sd, sd_o):
    """``r = v_o / v - 1`` as two quotients (no ``sd^2`` to overflow; exact difference
    near ``sd == sd_o``), as ``trpl_fast.ops.kl._ratio_minus_one``."""
    return ((sd_o - sd) / sd) * ((sd_o + sd) / sd)


@triton.jit
def _kl_diag_fwd_kernel(
    mean_ptr,
    std_ptr,
    old_mean_ptr,
    old_std_ptr,
    mean_bound_ptr,
    cov_bound_ptr,
    mean_out_ptr,
    std_out_ptr,
    t_out_ptr,
    conv_out_ptr,
    n_rows,
    d,
    mean_bound_value,
    cov_bound_value,
    MAX_ITERS: tl.constexpr,
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

    # the KL mean part is 0.5 maha <= eps_mu
    tl.store(mean_out_ptr + offs, mean_project_fwd(mu, mu_o, sd_o * sd_o, 2.0 * eps_mu), mask=mask)

    r = _precision_ratio_minus_one(sd, sd_o)
    t, conv, active = kl_dual_solve(r, eps_cov, MAX_ITERS, F64)
    # v_t = v_o / (1 + t r); unsolvable rows have t = 0 (and 0 * inf would be NaN)
    sd_t = sd_o / tl.sqrt(1.0 + t[:, None] * tl.where(r < float("inf"), r, 0.0))
    tl.store(std_out_ptr + offs, tl.where(active[:, None], sd_t, sd), mask=mask)
    tl.store(t_out_ptr + rows, t, mask=row_mask)
    tl.store(conv_out_ptr + rows, conv.to(tl.int8), mask=row_mask)


@triton.jit
def _kl_diag_bwd_kernel(
    grad_mean_ptr,
    grad_std_ptr,
    mean_ptr,
    std_ptr,
    old_mean_ptr,
    old_std_ptr,
    t_ptr,
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
    t = load_tile(t_ptr, rows, row_mask, 1.0, F64)

    var_o = sd_o * sd_o
    tl.store(grad_mean_out_ptr + offs, mean_project_bwd(g_mu, mu, mu_o, var_o, 2.0 * eps_mu), mask=mask)

    # Implicit gradient (MATH.md), elementwise in the diagonal case with lam = 1 / v:
    #   K_i = 0.5 v_t (g - 1) / g,  G_i = dL/dlam_t = -v_t^2 dL/dv_t,  lam - lam_o = lam_o r
    #   dL/dlam = t G - t K <G, lam - lam_o> / <K, lam - lam_o>;  dL/dsd = -2 sd lam^2 dL/dlam
    # which, with q = sd_o / sd, x = t r, g = 1 + x, sd_t = sd_o / sqrt(g), is
    #   dL/dsd = (t + x) q g^-3/2 [dL/dsd_t + c x / (sd_o sqrt(g))],
    #   c = -sum(sd_t dL/dsd_t x / g) / sum((x / g)^2)
    # (no r^2 or lam^2 to overflow; the torch path's kl_diag_backward)
    r = _precision_ratio_minus_one(sd, sd_o)
    active = kl_at_one(r, F64) > eps_cov
    x = t[:, None] * tl.where(r < float("inf"), r, 0.0)
    g = 1.0 + x
    root_g = tl.sqrt(g)
    xg = x / g
    s2 = tl.sum(xg * xg, axis=1)
    c = -tl.sum((sd_o / root_g) * g_sd * xg, axis=1) / tl.where(s2 > 0.0, s2, 1.0)
    g_std = (t[:, None] + x) * (sd_o / sd) / (g * root_g) * (g_sd + c[:, None] * x / (sd_o * root_g))
    tl.store(grad_std_out_ptr + offs, tl.where(active[:, None], g_std, g_sd), mask=mask)


@triton.jit
def _kl_newton_kernel(
    r_ptr,
    bound_ptr,
    unused_ptr,
    t_out_ptr,
    conv_out_ptr,
    n_rows,
    d,
    bound_value,
    unused_value,
    MAX_ITERS: tl.constexpr,
    HAS_MEAN_BOUND: tl.constexpr,
    HAS_COV_BOUND: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, row_mask, mask, offs = row_tile(tl.program_id(0), n_rows, d, BLOCK_ROWS, BLOCK_D)
    r = load_tile(r_ptr, offs, mask, 0.0, F64)
    eps = load_row_bound(bound_ptr, rows, row_mask, bound_value, HAS_MEAN_BOUND, F64, BLOCK_ROWS)
    t, conv, active = kl_dual_solve(r, eps, MAX_ITERS, F64)
    tl.store(t_out_ptr + rows, t, mask=row_mask)
    tl.store(conv_out_ptr + rows, conv.to(tl.int8), mask=row_mask)


def launch_kl_diag_fwd(
    mean, std, old_mean, old_std, mean_bound, cov_bound, mean_bound_value: float, cov_bound_value: float
):
    """(rows, d) inputs -> (mean_t, std_t, t, converged); ``t`` in the compute dtype,
    ``converged`` bool, both (rows,)."""
    n = mean.shape[0]
    cdt = torch.float64 if mean.dtype == torch.float64 else torch.float32
    outs = [
        torch.empty_like(mean),
        torch.empty_like(std),
        torch.empty(n, dtype=cdt, device=mean.device),
        torch.empty(n, dtype=torch.int8, device=mean.device),
    ]
    launch_rows(
        _kl_diag_fwd_kernel,
        [mean, std, old_mean, old_std],
        outs,
        mean_bound,
        cov_bound,
        mean_bound_value,
        cov_bound_value,
        MAX_ITERS=MAX_ITER,
        **KL_GEOMETRY,
    )
    return outs[0], outs[1], outs[2], outs[3].view(torch.bool)


def launch_kl_diag_bwd(
    grad_mean,
    grad_std,
    mean,
    std,
    old_mean,
    old_std,
    t,
    mean_bound,
    cov_bound,
    mean_bound_value: float,
    cov_bound_value: float,
):
    """Upstream grads, forward inputs and the solved ``t`` -> (grad_mean, grad_std)."""
    outs = [torch.empty_like(mean), torch.empty_like(std)]
    launch_rows(
        _kl_diag_bwd_kernel,
        [grad_mean, grad_std, mean, std, old_mean, old_std, t],
        outs,
        mean_bound,
        cov_bound,
        mean_bound_value,
        cov_bound_value,
        **KL_GEOMETRY,
    )
    return outs[0], outs[1]


def launch_kl_newton(r, bound, bound_value: float):
    """Solve the KL dual for (rows, d) whitened ``r = m - 1`` (float32 / float64) ->
    (t, converged), (rows,) each."""
    n = r.shape[0]
    outs = [torch.empty(n, dtype=r.dtype, device=r.device), torch.empty(n, dtype=torch.int8, device=r.device)]
    # the bound travels in the "mean bound" slot of the common launcher
    launch_rows(_kl_newton_kernel, [r], outs, bound, None, bound_value, 0.0, MAX_ITERS=MAX_ITER, **KL_GEOMETRY)
    return outs[0], outs[1].view(torch.bool)
