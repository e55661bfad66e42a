"""KL projection operators (MATH.md "KL covariance projection"):
``trpl::project_kl_diag`` (std vectors; one fused Triton kernel on CUDA; large CPU batches
compiled, the Newton solve unrolled over the columns) and ``trpl::project_kl_full`` (lower
Cholesky factors), each with an implicit ``_backward`` op. Mean part: ``0.5 maha <= eps_mu``.

Both forward ops return ``[mean_t, cov_t, t, converged, ...]``: the dual variable ``t`` per
state (``L_t = t L + (1 - t) L_o``; 1 for states inside the region) and whether its Newton
solve met the tolerance. The full op also returns the eigenvalues (..., d) (ascending) of
the whitened target precision ``M = C_o^T L C_o`` and a (..., d, d) matrix its backward
reuses, both float64, which depends on the path (:func:`uses_fused_kernel`,
:func:`uses_factor_path`; forward and backward choose by the same tests, so each backward
gets what its forward saved):

* CUDA, ``d <= MAX_D``: the fused kernel (``kernels/kl_full.py``) and the upper factor
  ``U`` of ``G = (1 - t) I + t M = U U^T``;
* CPU, ``d <= 32``: the same algorithm as one C pass per state (``kernels/kl_cpu.c``,
  :func:`uses_cpu_kernel`) and ``U^-1``; where it cannot be built, and for larger d, in
  batched torch (eigenvalues only, no eigenvectors), the same outputs;
* elsewhere (CUDA for larger d): whitening and ``eigh`` in batched torch, the Newton solve
  in Triton, and the eigenvectors of ``M``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..kernels.kl import MAX_ITER, TOL_F32, TOL_F64, launch_kl_diag_bwd, launch_kl_diag_fwd, launch_kl_newton
from ..kernels.kl_cpu import (
    DIAG_DTYPES,
    launch_kl_diag_cpu_bwd,
    launch_kl_diag_cpu_fwd,
    launch_kl_full_cpu_bwd,
    launch_kl_full_cpu_fwd,
)
from ..kernels.kl_cpu import MAX_D as CPU_KERNEL_MAX_D
from ..kernels.kl_cpu import available as cpu_kernel_available
from ..kernels.kl_full import MAX_D, launch_kl_full_bwd, launch_kl_full_fwd
from ._common import Aux, ProjectionOp, to_float64
from ._compiled_cpu import row_layout_options, run_compiled
from ._layout import rows_to_columns
from ._linalg import cholesky_backward, inner, solve_lower, solve_lower_t
from ._torch_mean import bound_or_value, mean_project, mean_project_backward

# Masked iterations of the torch Newton where it cannot stop early (traced by
# torch.compile, or on CUDA): the hardest tested rows (eigenvalue spread 1e8, eps_cov 10)
# needed 10; rows still open after these are flagged, never hidden.
UNROLLED_ITER = 16
# Masked iterations of the compiled CPU path for large batches (:func:`kl_diag_large`):
# ``bench.itpal_peer``'s rows converge within 5 (float64), training rows within 2-3; rows
# still open after these are solved again eagerly, with early exit.
LARGE_BATCH_ITER = 6
# ... and of its solve unrolled over the columns (:func:`kl_dual_newton_columns`, Halley in
# log t): bench.itpal_peer's rows settle within 3, random rows of bounds up to 0.5 within 4.
COLUMNS_ITER = 4
# Halley's factor (:func:`halley_factor`) is used where it lies in this range, else Newton.
HALLEY_FACTOR_RANGE = (0.5, 2.0)

# Early-exit solves of at most this many rows iterate on all rows (masked) instead of
# gathering the open ones: at the training loop's size (32 x 6) the gathers' dispatch
# cost more than the arithmetic they save.
SMALL_BATCH_ROWS = 4096

# phi(x) = log1p(x) - x / (1 + x): series coefficients of x^2 * P(x), highest first
_PHI_SERIES = (-8.0 / 9.0, 7.0 / 8.0, -6.0 / 7.0, 5.0 / 6.0, -4.0 / 5.0, 3.0 / 4.0, -2.0 / 3.0, 0.5)
# |x| below which phi(x) is taken from the series (float64, float32)
PHI_SERIES_CUT_F64, PHI_SERIES_CUT_F32 = 0.01, 0.05


def kl_phi(x: Tensor) -> Tensor:
    """``log1p(x) - x / (1 + x)`` without cancellation (the same scheme as the kernel)."""
    p = x * _PHI_SERIES[0] + _PHI_SERIES[1]
    for c in _PHI_SERIES[2:]:
        p = p * x + c
    cut = PHI_SERIES_CUT_F64 if x.dtype == torch.float64 else PHI_SERIES_CUT_F32
    return torch.where(x.abs() < cut, x * x * p, torch.log1p(x) - x / (1.0 + x))


def kl_at_one(r: Tensor, dim: int = -1) -> Tensor:
    """``KLc(1) = 0.5 sum_i phi(r_i)`` for rows of ``r`` (rows, d): the divergence of the
    target itself, which decides whether a row is projected. A ratio that rounded to
    ``r <= -1`` (``m`` below the dtype's resolution of 1) or overflowed to ``inf`` is
    infinitely far (``phi`` there is NaN in floating point), so the row is projected:
    a NaN here once let such rows through unprojected (issue 13). ``dim``: the dimension
    of ``r`` that holds a row's d ratios (0 for the transposed layout (d, rows))."""
    ok = (r > -1.0) & (r < float("inf"))
    return 0.5 * torch.where(ok, kl_phi(torch.where(ok, r, 0.0)), float("inf")).sum(dim)


def _newton_step(r, t, lo, hi, eps, tol, dim=-1):
    """One safeguarded Newton step on ``log KLc(t) - log eps`` for rows of ``r``; returns
    ``(t_next, lo, hi, converged)`` (``t_next = t`` on converged rows).

    Written in ``x = t r`` and ``x / g`` only: ``r^2`` overflows float32 for ``|r| > 2^64``
    (std ratios past 2^32) while ``x / g = x / (1 + x)`` stays below 1 on ``x > 0``.
    ``KLc'(t) = s2 / (2 t)`` with ``s2 = sum (x / g)^2``. ``dim`` as in :func:`kl_at_one`."""
    x = t.unsqueeze(dim) * r
    g = 1.0 + x
    kl = 0.5 * kl_phi(x).sum(dim)
    s2 = ((x / g) ** 2).sum(dim)
    pos = kl > 0  # KLc underflowed to 0 (t far too small): not a root, bisect
    h = torch.log(torch.where(pos, kl, eps) / eps)
    done = pos & (h.abs() <= tol)
    over = ~(kl <= eps)  # a NaN moves the upper end: lo keeps KLc(lo) <= eps
    hi = torch.where(over, t, hi)
    lo = torch.where(over, lo, t)
    t_new = t - 2.0 * t * h * kl / torch.where(s2 > 0, s2, 1.0)
    t_new = torch.where(pos & (t_new > lo) & (t_new < hi), t_new, 0.5 * (lo + hi))
    return torch.where(done, t, t_new), lo, hi, done


def _newton_start(r, eps, dim=-1, t_start=None):
    """``(r_safe, solvable, active, t0)``: rows with an overflowed ratio (``r = inf``) cannot
    be solved in this dtype; they get ``r_safe = 0`` and are flagged by the caller.
    ``t0 = min(1, 2 sqrt(eps) / ||r||)`` with the norm scaled by ``max |r|`` (no overflow).
    ``dim`` as in :func:`kl_at_one`."""
    active = kl_at_one(r, dim) > eps
    solvable = (r < float("inf")).all(dim)
    r = torch.where(solvable.unsqueeze(dim), r, 0.0)
    big = r.abs().amax(dim)
    big = torch.where(active & (big > 0), big, 1.0)
    norm = big * torch.sqrt(((r / big.unsqueeze(dim)) ** 2).sum(dim))
    root_eps = torch.sqrt(eps) if isinstance(eps, Tensor) else math.sqrt(eps)
    t = torch.clamp(2.0 * root_eps / torch.where(active & (norm > 0), norm, 1.0), max=1.0)
    if t_start is not None:
        t = torch.where((t_start > 0) & (t_start < 1), t_start.to(t.dtype), t)
    return r, solvable, active, torch.where(active, t, 1.0)


def _masked_newton(r, eps, tol, t, done, iterations: int, dim=-1, stop_when_done: bool = False):
    """Up to ``iterations`` safeguarded Newton steps (:func:`_newton_step`) on every row of
    ``r`` from ``t``, rows already ``done`` (or newly converged) staying put; returns
    ``(t, lo, done)``. ``stop_when_done``: a host check ends the loop once every row is
    done (real tensors only)."""
    lo, hi = torch.zeros_like(t), torch.ones_like(t)
    for _ in range(iterations):
        if stop_when_done and bool(done.all()):
            break
        t_next, lo, hi, newly = _newton_step(r, t, lo, hi, eps, tol, dim=dim)
        t = torch.where(done, t, t_next)  # rows done before (or inactive) stay put
        done = done | newly
    return t, lo, done


def kl_dual_newton(
    r: Tensor, eps, early_exit: bool = False, iterations: int | None = None, t_start: Tensor | None = None
):
    """Safeguarded Newton on ``h(t) = log KLc(t) - log eps`` for every row of ``r`` (rows, d)
    (whitened precision ratios minus one, ``r >= -1``). Returns ``(t, converged, active)``,
    (rows,) each.

    ``t_start`` (rows,), early exit only: a first guess per row (used where it lies in
    (0, 1); the compiled large-batch solve hands over the rows it left open this way).

    Guarantee (issue 13): a row is either converged (``|h| <= tol``, so ``KLc(t)`` is
    ``eps`` to the tolerance) or flagged, and a flagged row gets ``t`` = the lower end of its
    bracket, a point with ``KLc(t) <= eps``: its projection is inside the region (``t = 0``,
    the old policy, for rows whose ratios overflowed).

    With ``early_exit`` (real CPU tensors only) each iteration works on the rows still
    open (gathered by index) and the loop stops when none is, at most ``MAX_ITER``
    iterations; otherwise it runs ``min(MAX_ITER, UNROLLED_ITER)`` masked iterations over
    all rows with no host sync (traceable, and what the GPU would do without the kernel),
    or ``iterations`` of them where given.
    """
    tol = TOL_F64 if r.dtype == torch.float64 else TOL_F32
    shape = r.shape[:-1]
    if not early_exit:
        # rows innermost, (d, rows), a materialized copy even when compiled: the loop
        # over rows then vectorizes (see ``_layout``)
        r_t = rows_to_columns(r.reshape(-1, r.shape[-1]))
        eps_t = eps.reshape(-1) if isinstance(eps, Tensor) and eps.dim() > 0 else eps
        r_t, solvable, active, t = _newton_start(r_t, eps_t, dim=0)
        n_iter = min(MAX_ITER, UNROLLED_ITER if iterations is None else iterations)
        t, lo, done = _masked_newton(r_t, eps_t, tol, t, ~active, n_iter, dim=0)
    elif r.shape[0] <= SMALL_BATCH_ROWS:
        # few rows: every iteration on all of them, stopping when all are done (gathering
        # the open rows costs more dispatch than it saves arithmetic here)
        r, solvable, active, t = _newton_start(r, eps, t_start=t_start)
        t, lo, done = _masked_newton(r, eps, tol, t, ~active, MAX_ITER, stop_when_done=True)
    else:
        r, solvable, active, t = _newton_start(r, eps, t_start=t_start)
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        done = ~active
        per_row_eps = isinstance(eps, Tensor) and eps.dim() > 0
        open_rows = (~done).nonzero().squeeze(-1)
        for _ in range(MAX_ITER):
            if open_rows.numel() == 0:
                break
            e = eps[open_rows] if per_row_eps else eps
            t_o, lo_o, hi_o, newly = _newton_step(r[open_rows], t[open_rows], lo[open_rows], hi[open_rows], e, tol)
            t[open_rows], lo[open_rows], hi[open_rows] = t_o, lo_o, hi_o
            done[open_rows] = newly
            open_rows = open_rows[~newly]
    done = done & solvable
    t = torch.where(done, t, torch.where(solvable, lo, 0.0))
    return t.reshape(shape), done.reshape(shape), active.reshape(shape)


def _ratio_minus_one(std, old_std):
    """``r = v_o / v - 1`` as a product of two quotients: no ``std^2`` to overflow or
    underflow (float32 std past 1.8e19 or below 1e-19), and exact in the difference
    near ``std == old_std`` (Sterbenz). ``inf`` only where ``r`` itself overflows."""
    return ((old_std - std) / std) * ((old_std + std) / std)


# Device types on which the KL ops run the C kernels (``kernels/kl_cpu.c``: the diagonal
# op's eager solve, and the full op's factor path, one pass per state) for d <= their
# MAX_D; the tests empty it to exercise the torch paths.
CPU_KERNEL_DEVICE_TYPES = ("cpu",)


def _cpu_kernel_constants() -> dict:
    """The torch solve's constants handed to the C kernels, read at the call (one home
    each; the tests change ``MAX_ITER``)."""
    return dict(max_iter=MAX_ITER, tol=TOL_F64, phi_cut=PHI_SERIES_CUT_F64, phi_series=_PHI_SERIES)


def _real_tensors(*tensors) -> bool:
    """Every tensor given (None skipped) is one a C kernel can read: not traced
    (torch.compile, fake tensors, subclasses), no torch.func transform active, not batched
    by ``autograd.grad(is_grads_batched=True)`` (no storage), on the CPU. Callers pass the
    tensors that can differ in kind (the inputs; the incoming gradients)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    has_storage = torch._C._has_storage
    return all(
        t is None or (type(t) in (Tensor, nn.Parameter) and t.device.type == "cpu" and has_storage(t)) for t in tensors
    )


def uses_cpu_diag_kernel(mean: Tensor, *others) -> bool:
    """Whether the diagonal op's eager CPU solve (and its backward) runs the C kernel
    (``kernels/kl_cpu.c``: the same algorithm per row, float64 inside): (rows, d) float32 /
    float64 tensors (``mean`` and the call's ``others``) that the kernel can read, on a
    device of ``CPU_KERNEL_DEVICE_TYPES``, ``d <= CPU_KERNEL_MAX_D``, the kernel built.
    Large batches take the compiled path first (``kl_diag_large``)."""
    return (
        mean.device.type in CPU_KERNEL_DEVICE_TYPES
        and mean.dtype in DIAG_DTYPES
        and mean.dim() == 2
        and mean.shape[-1] <= CPU_KERNEL_MAX_D
        and _real_tensors(mean, *others)
        and cpu_kernel_available()
    )


def kl_diag(
    mean, std, old_mean, old_std, mean_bound, cov_bound, mbv, cbv, early_exit=False, iterations=None, t_start=None
):
    if early_exit and iterations is None and t_start is None and uses_cpu_diag_kernel(mean, std):
        return launch_kl_diag_cpu_fwd(
            mean, std, old_mean, old_std, mean_bound, cov_bound, mbv, cbv, _cpu_kernel_constants()
        )
    old_var = old_std * old_std
    mean_t = mean_project(mean, old_mean, (mean - old_mean) / old_var, 2.0 * bound_or_value(mean_bound, mbv))
    r = _ratio_minus_one(std, old_std)
    t, conv, active = kl_dual_newton(r, bound_or_value(cov_bound, cbv), early_exit, iterations, t_start)
    # unsolvable rows have t = 0: 0 * inf would be NaN, they return the old std
    x = t.unsqueeze(-1) * torch.where(r < float("inf"), r, 0.0)
    std_t = old_std / torch.sqrt(1.0 + x)
    return mean_t, torch.where(active.unsqueeze(-1), std_t, std), t, conv


def kl_diag_backward(
    g_mean, g_std, mean, std, old_mean, old_std, t, conv, mean_bound, cov_bound, mbv, cbv, *, active=None
):
    """Implicit gradient (MATH.md), elementwise: with ``q = sd_o / sd``, ``x = t r``,
    ``g = 1 + x``, ``sd_t = sd_o / sqrt(g)`` (the kernel's derivation, in terms that do not
    overflow where ``r^2`` would):

        dL/dsd = t q^3 g^-3/2 [G + c x / (sd_o sqrt(g))],
        c = -sum(sd_t G x / g) / sum((x / g)^2),   t q^3 = (t + x) q

    ``active`` (rows,): the rows the forward projected, when the caller knows them (else
    ``KLc(1) > eps`` is evaluated again). Real CPU tensors: the C kernel, the same formulas.
    """
    if active is None and uses_cpu_diag_kernel(mean, g_mean, g_std):
        return launch_kl_diag_cpu_bwd(
            g_mean, g_std, mean, std, old_mean, old_std, t, mean_bound, cov_bound, mbv, cbv, _cpu_kernel_constants()
        )
    old_var = old_std * old_std
    g_mean = mean_project_backward(
        g_mean, mean, old_mean, (mean - old_mean) / old_var, 2.0 * bound_or_value(mean_bound, mbv)
    )
    r = _ratio_minus_one(std, old_std)
    if active is None:  # the projected rows, as the forward decided them
        active = kl_at_one(r) > bound_or_value(cov_bound, cbv)
    t = t.to(r.dtype).unsqueeze(-1)
    x = t * torch.where(r < float("inf"), r, 0.0)  # unsolvable rows: t = 0, a constant output
    g = 1.0 + x
    root_g = torch.sqrt(g)
    xg = x / g
    s2 = (xg * xg).sum(-1, keepdim=True)
    c = -((old_std / root_g) * g_std * xg).sum(-1, keepdim=True) / torch.where(s2 > 0, s2, 1.0)
    g_sd = (t + x) * (old_std / std) / (g * root_g) * (g_std + c * x / (old_std * root_g))
    return g_mean, torch.where(active.unsqueeze(-1), g_sd, g_std)


def _per_row(bound, value, rows: Tensor) -> Tensor:
    """The bound as a (rows,) tensor (a float becomes one: no float enters a compiled graph)."""
    return bound if bound is not None else torch.full(rows.shape[:1], value, dtype=rows.dtype)


# -- large CPU batches: the Newton solve unrolled over the d columns (issue 12) -----------
# The compiled large-batch path evaluates KLc once per row and iteration with a single
# logarithm (of the product of the g_i) instead of one log1p per element, which made the
# masked solve transcendental-bound. Rows of more than this many dimensions keep the
# per-element formulation (the unrolled graph grows with d, one compiled graph per d, and
# the error bound of the product form stops certifying one-signed rows near d = 32).
MAX_UNROLLED_D = 32
# psi(z) = z - log1p(z) = z^2 / (2 + z) - 2 w^3 sum_k w^(2k) / (2k + 3), w = z / (2 + z):
# the series' coefficients, highest first; |z| < _PSI_SERIES_CUT gives w^2 < 0.021, and
# the 11 terms reach float64's resolution.
_PSI_SERIES = tuple(1.0 / (2 * k + 3) for k in range(10, -1, -1))
_PSI_SERIES_CUT = 0.25
# Above this p - 1 (p = prod g) the row's KLc is taken as 0.5 (log p - sum q): D and
# psi(e) below would both be of the size of e and cancel.
_LARGE_PRODUCT = 2.5


def _psi(e: Tensor, log_p: Tensor) -> Tensor:
    """``e - log1p(e)`` without cancellation for small ``|e|`` (``log_p = log1p(e)``,
    computed by the caller from the product itself where that is the more accurate)."""
    w = e / (2.0 + e)
    w2 = w * w
    s = w2 * _PSI_SERIES[0] + _PSI_SERIES[1]
    for c in _PSI_SERIES[2:]:
        s = s * w2 + c
    series = e * e / (2.0 + e) - 2.0 * w * w2 * s
    return torch.where(e.abs() < _PSI_SERIES_CUT, series, e - log_p)


def kl_of_columns(r_cols: list[Tensor], t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(KLc(t), s2, s3, certified)`` per row for a row's ratios given as d columns ``r_cols``
    ((rows,) each, float64) and ``t`` (rows,); ``s2 = sum q^2`` and ``s3 = sum q^3`` with
    ``q = x / g`` (``KLc' = s2 / (2 t)``; ``s3`` gives the second derivative, for Halley's
    method); ``certified``: ``KLc`` is known to a quarter of the solve's tolerance (below).

    With ``x = t r``, ``g = 1 + x``, ``q = x / g`` (MATH.md "KL covariance projection"):
    ``2 KLc = sum (log g - q) = log(p) - sum q`` with ``p = prod g``. Both terms are of the
    size of ``sum x`` and cancel to ``~sum x^2``, so where ``p`` is moderate the row tracks
    ``e = p - 1`` and the second-order ``D = e - sum q`` (``D += x q + e x`` per column, no
    cancellation) and ``2 KLc = D - psi(e)``; for large ``p`` the plain form is the
    accurate one. The recurrences lose digits when ``e`` swings (a few large ``x`` whose
    product later columns bring back near 1): each row carries a rounding-error estimate
    (``d u (|D| + 2 sum|e x|)``; large ``p``: ``d u (|log p| + sum|q|)``); a row whose estimate
    exceeds a quarter of the solve's tolerance is not ``certified`` (its value still steers
    Newton, but cannot end the solve), and a product that over- or underflows gives
    ``NaN``. Measured against 60-digit arithmetic on random rows (d <= 64, |x| from 1e-8 to
    100): relative error <= 2e-13. The bound is pessimistic for one-signed rows of many
    small ``x`` (their true error grows like ``d^2 u``). One log per row."""
    e = d2 = q_sum = s2 = s3 = ex_abs = None
    p = torch.ones_like(t)
    for r in r_cols:
        x = t * r
        g = 1.0 + x
        q = x / g
        xq = x * q
        q2 = q * q
        if e is None:
            e, d2, q_sum, s2, s3, ex_abs = x, xq, q, q2, q2 * q, torch.zeros_like(x)
        else:
            ex = e * x
            d2 = d2 + xq + ex
            e = e + x + ex
            q_sum = q_sum + q
            s2 = s2 + q2
            s3 = s3 + q2 * q
            ex_abs = ex_abs + ex.abs()
        p = p * g
    normal = (p >= torch.finfo(p.dtype).tiny) & (p < float("inf"))
    large = p > 1.0 + _LARGE_PRODUCT
    # the small branch takes log1p(e) (a certified e is accurate; p carries d roundings,
    # which psi(e) = e - log p, much smaller than log p, would not survive) except for
    # p <= 0.5, where e has lost p's digits; the large branch takes log(p)
    use_e = (p > 0.5) & ~large
    log_p = torch.where(use_e, torch.log1p(torch.where(use_e, e, 0.0)), torch.log(torch.where(normal, p, 1.0)))
    kl_small = 0.5 * (d2 - _psi(e, log_p))
    kl_large = 0.5 * (log_p - q_sum)
    # Rounding estimates, certified when below a quarter of the tolerance of 2 KLc. Small
    # branch: the terms D sums (sum |e x| + sum x q <= |D| + 2 sum |e x|), and e's own
    # rounding (u sum |e| over the columns) reaching D through the x that follow, at most
    # d u sum |e x| -- also what a swing of e makes large. Large branch: log p (d roundings
    # of p) and sum |q| <= sqrt(d s2).
    d = len(r_cols)
    unit = d * torch.finfo(p.dtype).eps
    err_small = unit * (d2.abs() + 2.0 * ex_abs)
    err_large = unit * (log_p.abs() + torch.sqrt(d * s2))
    certified = normal & torch.where(
        large, err_large <= (0.5 * TOL_F64) * kl_large, err_small <= (0.5 * TOL_F64) * kl_small
    )
    kl = torch.where(large, kl_large, kl_small)
    return torch.where(normal, kl, float("nan")), s2, s3, certified


def halley_factor(h: Tensor, kl: Tensor, s2: Tensor, s3: Tensor) -> Tensor:
    """``f`` of Halley's step ``-(h / h') / f`` on ``h(s) = log KLc(e^s) - log eps`` (the
    solve in ``s = log t``): ``f = 1 - h h'' / (2 h'^2)`` with ``h' = s2 / (2 KLc)`` and
    ``h'' = (s2 - s3) / KLc - h'^2`` (``dq/ds = q (1 - q)`` for ``q = x / g``), that is
    ``f = 1 + h / 2 - 2 h KLc (s2 - s3) / s2^2``. Outside ``HALLEY_FACTOR_RANGE`` (far from
    the root, where the cubic model is not to be trusted) it is 1: a Newton step."""
    s2_safe = torch.where(s2 > 0, s2, 1.0)
    f = 1.0 + 0.5 * h - 2.0 * h * kl * (s2 - s3) / (s2_safe * s2_safe)
    lo, hi = HALLEY_FACTOR_RANGE
    return torch.where((f > lo) & (f < hi), f, 1.0)  # NaN (KLc = 0) -> Newton


def kl_dual_newton_columns(r_cols: list[Tensor], eps: Tensor, iterations: int):
    """:func:`kl_dual_newton`'s masked solve (``iterations`` safeguarded Halley steps on
    ``log KLc(t) - log eps``, here in ``log t``, no host sync) on :func:`kl_of_columns`.
    ``r_cols``: d (rows,) float64 columns of finite ratios (``r >= -1``); ``eps`` (rows,).
    Returns ``(t, converged, active)``; a row whose ``KLc(1)`` is not certified (or whose
    product over- or underflows) counts as active, and only certified values end a row's
    solve: the rows left open are settled by the eager solve, started from this ``t``.

    Halley's step (cubic convergence; :func:`halley_factor`) costs one product and one sum
    per element over Newton's and settles rows one evaluation sooner: the 65,536 rows of
    ``bench.itpal_peer`` (bound 0.01) within 3 iterations (Newton: 4), random rows (d = 6
    to 32, bounds 0.001 to 0.5) within 4 (Newton: 4-6)."""
    tol = TOL_F64
    kl_one, _, _, certain = kl_of_columns(r_cols, torch.ones_like(eps))
    active = ~(kl_one <= eps) | ~certain  # an uncertain row is solved (and settled eagerly)
    big = r_cols[0].abs()
    for r in r_cols[1:]:
        big = torch.maximum(big, r.abs())
    inv_big = 1.0 / torch.where(big > 0, big, 1.0)
    norm = torch.sqrt(sum((r * inv_big) ** 2 for r in r_cols)) / inv_big
    t = torch.clamp(2.0 * torch.sqrt(eps) / norm, max=1.0)
    t = torch.where(active, t, 1.0)
    lo, hi = torch.zeros_like(t), torch.ones_like(t)
    done = ~active
    for _ in range(iterations):
        kl, s2, s3, certain = kl_of_columns(r_cols, t)
        pos = kl > 0  # KLc underflowed to 0 (t far too small): not a root, bisect
        h = torch.log(torch.where(pos, kl, eps) / eps)
        newly = pos & certain & (h.abs() <= tol)
        over = ~(kl <= eps)  # NaN: an overflowed product is above the bound
        hi = torch.where(over, t, hi)
        lo = torch.where(over, lo, t)
        # in log t: h(log t) is linear where KLc ~ t^2, so it settles a step sooner
        newton = -2.0 * h * kl / torch.where(s2 > 0, s2, 1.0)
        t_new = t * torch.exp(newton / halley_factor(h, kl, s2, s3))
        t_new = torch.where(pos & (t_new > lo) & (t_new < hi), t_new, 0.5 * (lo + hi))
        t = torch.where(done | newly, t, t_new)
        done = done | newly
    return t, done, active


def _kl_diag_columns(mean, std, old_mean, old_std, mean_bound, cov_bound):
    """:func:`kl_diag` for the compiled large-batch path: float64 inside (for float32
    inputs too: the product form needs its range), the Newton solve on the (d, rows)
    columns (contiguous: the loop over rows vectorizes), ``COLUMNS_ITER`` masked
    iterations. Rows it leaves open are not converged; the caller solves them again."""
    dtype = mean.dtype
    # rows whose ratio overflows the input's dtype are flagged, as the eager solve flags
    # them (their t would not survive the round to that dtype)
    solvable = None if dtype == torch.float64 else (_ratio_minus_one(std, old_std) < float("inf")).all(-1)
    mean, std, old_mean, old_std, mean_bound, cov_bound = to_float64(
        mean, std, old_mean, old_std, mean_bound, cov_bound
    )
    old_var = old_std * old_std
    mean_t = mean_project(mean, old_mean, (mean - old_mean) / old_var, 2.0 * mean_bound)
    r = _ratio_minus_one(std, old_std)
    finite = (r < float("inf")).all(-1)
    solvable = finite if solvable is None else solvable & finite
    r = torch.where(solvable.unsqueeze(-1), r, 0.0)
    r_t = rows_to_columns(r)
    t, conv, active = kl_dual_newton_columns([r_t[i] for i in range(r.shape[-1])], cov_bound, COLUMNS_ITER)
    active = active | ~solvable
    t = torch.where(solvable, t, 0.0)  # the old std, flagged (as kl_dual_newton does)
    std_t = torch.where(active.unsqueeze(-1), old_std / torch.sqrt(1.0 + t.unsqueeze(-1) * r), std)
    return mean_t.to(dtype), std_t.to(dtype), t.to(dtype), conv & solvable


def _kl_diag_backward_columns(g_mean, g_std, mean, std, old_mean, old_std, t, mean_bound, cov_bound):
    """:func:`kl_diag_backward` for the compiled large-batch path on float64 rows, with
    the active rows read off the forward's ``t`` (``t < 1``; inactive rows have ``t = 1``
    exactly) instead of evaluating ``KLc(1)`` again, a log per element. One difference
    from the eager backward: a row with ``KLc(1)`` within the solve's tolerance above the
    bound may converge at ``t = 1`` exactly; its output is its input, and it gets the
    identity gradient here, the implicit one there (one-sided derivatives at the kink)."""
    return kl_diag_backward(
        g_mean, g_std, mean, std, old_mean, old_std, t, None, mean_bound, cov_bound, 0.0, 0.0, active=t < 1.0
    )


def _kl_diag_masked(mean, std, old_mean, old_std, mean_bound, cov_bound):
    return kl_diag(mean, std, old_mean, old_std, mean_bound, cov_bound, 0.0, 0.0, iterations=LARGE_BATCH_ITER)


def _kl_diag_backward_rows(g_mean, g_std, mean, std, old_mean, old_std, t, mean_bound, cov_bound):
    return kl_diag_backward(g_mean, g_std, mean, std, old_mean, old_std, t, None, mean_bound, cov_bound, 0.0, 0.0)


def kl_diag_large(mean, std, old_mean, old_std, mean_bound, cov_bound, mbv, cbv, early_exit=True):
    """:func:`kl_diag` for large batches of real CPU tensors (``_compiled_cpu``): the
    masked solve compiled (unrolled over the columns, :func:`_kl_diag_columns`, for
    ``d <= MAX_UNROLLED_D``; per element, ``LARGE_BATCH_ITER`` iterations, beyond), then the rows it left open
    (not converged, or flagged) solved again by the eager early-exit solve and written
    back -- every row ends as the eager path would leave it: converged, or flagged."""
    mb, cb = _per_row(mean_bound, mbv, mean), _per_row(cov_bound, cbv, mean)
    masked = _kl_diag_columns if mean.shape[-1] <= MAX_UNROLLED_D else _kl_diag_masked
    # the unrolled graph is specialized to d: one compiled function per d (a shared one
    # would hit dynamo's recompile limit and fall back to eager after a few d)
    key = mean.shape[-1] if masked is _kl_diag_columns else None
    out = run_compiled(masked, mean, std, old_mean, old_std, mb, cb, key=key)
    if out is None:
        return kl_diag(mean, std, old_mean, old_std, mean_bound, cov_bound, mbv, cbv, early_exit)
    open_rows = (~out[3]).nonzero().squeeze(-1)
    if open_rows.numel():
        rows = (x[open_rows] for x in (mean, std, old_mean, old_std, mb, cb))
        # float64: started where the masked solve stopped, so its uncertified rows are
        # settled in one exact evaluation (float32: its t is rounded, start afresh as the
        # eager solve would)
        t_start = out[2][open_rows] if mean.dtype == torch.float64 else None
        again = kl_diag(*rows, 0.0, 0.0, early_exit=True, t_start=t_start)
        for o, a in zip(out, again):
            o[open_rows] = a
    return out


def kl_diag_backward_large(g_mean, g_std, mean, std, old_mean, old_std, t, conv, mean_bound, cov_bound, mbv, cbv):
    """:func:`kl_diag_backward` compiled, for large batches of real CPU tensors (float64:
    the active rows from ``t``, :func:`_kl_diag_backward_columns`; float32 ``t`` may have
    rounded to 1 on active rows, so there ``KLc(1)`` is evaluated again)."""
    mb, cb = _per_row(mean_bound, mbv, mean), _per_row(cov_bound, cbv, mean)
    fn = _kl_diag_backward_columns if t.dtype == torch.float64 else _kl_diag_backward_rows
    out = run_compiled(fn, g_mean, g_std, mean, std, old_mean, old_std, t, mb, cb, options=row_layout_options())
    if out is None:
        return kl_diag_backward(g_mean, g_std, mean, std, old_mean, old_std, t, conv, mean_bound, cov_bound, mbv, cbv)
    return out


def _solve_newton(r, cov_bound, cbv, early_exit):
    """The Newton solve for the full case: the Triton kernel on CUDA, torch elsewhere."""
    if r.device.type == "cuda":
        t, conv = launch_kl_newton(r.contiguous(), cov_bound, cbv)
        active = kl_at_one(r) > bound_or_value(cov_bound, cbv)
        return t, conv, active
    return kl_dual_newton(r, bound_or_value(cov_bound, cbv), early_exit)


def _whiten(factor, old_factor):
    """``C``, ``C_o``, eigenvalues ``m`` and eigenvectors ``U`` of ``M = C_o^T L C_o``."""
    chol, old_chol = factor.tril(), old_factor.tril()
    a = torch.linalg.solve_triangular(chol, old_chol, upper=False)  # C^-1 C_o, M = A^T A
    m, u = torch.linalg.eigh(a.mT @ a)
    return chol, old_chol, m, u


def _assemble(old_chol, u, g, active):
    """Projected covariance ``S_t = W diag(1/g) W^T`` (``W = C_o U``) and its factor;
    inactive rows factor ``S_o`` instead (always PD) and are replaced by the caller."""
    w = old_chol @ u
    cov_t = (w / g.unsqueeze(-2)) @ w.mT
    cov_t = 0.5 * (cov_t + cov_t.mT)
    cov_t = torch.where(active[..., None, None], cov_t, old_chol @ old_chol.mT)
    return w, torch.linalg.cholesky(cov_t)


def _float64(*tensors):
    """The full-covariance KL works in float64: a float32 eigen-decomposition of the
    whitened precision cannot resolve eigenvalue spreads of 1e8 (measured: 1.5e-3 relative
    error of the projected covariance at spread 1e4..1e-4 in float32, 1e-13 in float64)."""
    return to_float64(*tensors)


def _whitened_r(m):
    """``r = m - 1`` for the eigenvalues ``m`` of ``C_o^T L C_o``. An eigenvalue below the
    eigen-solver's resolution (``m_max`` times the unit roundoff) may come out <= 0; its
    direction is then infinitely wider than the old one as far as float64 can tell, and
    ``r = -1`` (``g = 1 - t``) is what the projection uses for it."""
    return torch.clamp(m - 1.0, min=-1.0)


# Device types on which the full op runs the fused kernel (the tests add "cpu" to run it
# under TRITON_INTERPRET through the op itself).
FUSED_DEVICE_TYPES = ("cuda",)


def uses_fused_kernel(mean: Tensor) -> bool:
    """Whether the full op runs the fused Triton kernel for these (rows, d) means: on CUDA
    for ``d <= MAX_D``, on real tensors (fake ones, traced by ``torch.compile``, take the
    torch path, whose outputs have the same shapes and dtypes)."""
    from torch._subclasses.fake_tensor import is_fake

    return mean.device.type in FUSED_DEVICE_TYPES and mean.shape[-1] <= MAX_D and not is_fake(mean)


def uses_cpu_kernel(mean: Tensor, *others) -> bool:
    """Whether the full op runs the C kernel for these (rows, d) means (and the call's
    ``others``): tensors the kernel can read on a device of ``CPU_KERNEL_DEVICE_TYPES``,
    ``d <= CPU_KERNEL_MAX_D``, and the kernel built (else the torch factor path, same outputs
    in the same aux slots, so forward and backward may each take either)."""
    return (
        mean.device.type in CPU_KERNEL_DEVICE_TYPES
        and mean.shape[-1] <= CPU_KERNEL_MAX_D
        and _real_tensors(mean, *others)
        and cpu_kernel_available()
    )


# Device types on which the full op's torch path runs without eigenvectors (the factor
# path below); elsewhere (CUDA for d > MAX_D) it keeps the eigen-decomposition. The tests
# empty it to exercise the eigenvector path on CPU.
FACTOR_PATH_DEVICE_TYPES = ("cpu",)


def uses_factor_path(mean: Tensor) -> bool:
    """Whether the full op's torch path (not the fused kernel) runs the factor path for
    these (rows, d) means; forward and backward decide by this same test."""
    return not uses_fused_kernel(mean) and mean.device.type in FACTOR_PATH_DEVICE_TYPES


def _reverse_cholesky(g: Tensor) -> tuple[Tensor, Tensor]:
    """``(U, info)``: the upper factor of SPD ``g = U U^T`` (the lower factor of the
    matrix with rows and columns reversed, reversed back) and LAPACK's per-matrix info."""
    k, info = torch.linalg.cholesky_ex(g.flip(-2, -1))
    return k.flip(-2, -1), info


def _kl_full_factor(mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv, early_exit):
    """The full-covariance KL projection without eigenvectors (the fused kernel's algorithm,
    ``kernels/kl_full.py``, in batched torch; float64 rows): eigenvalues only
    (``eigvalsh``, half the cost of ``eigh``), then ``G = I + t (M - I) = U U^T`` and
    ``chol(S_t) = C_o U^-T``. Returns the op's outputs with ``U^-1`` in the eigvecs slot.
    A row whose ``G`` fails to factor (cond(G) beyond float64; not seen for bounds <= 10)
    is returned as the old policy (``t = 0``) and flagged, never wrong."""
    chol, old_chol = factor.tril(), old_factor.tril()
    a = torch.linalg.solve_triangular(chol, old_chol, upper=False)  # C^-1 C_o
    m_mat = a.mT @ a
    m_mat = 0.5 * (m_mat + m_mat.mT)
    m = torch.linalg.eigvalsh(m_mat)
    prec_delta = solve_lower_t(old_chol, solve_lower(old_chol, mean - old_mean))
    mean_t = mean_project(mean, old_mean, prec_delta, 2.0 * bound_or_value(mean_bound, mbv))
    r = _whitened_r(m)
    t, conv, active = _solve_newton(r, cov_bound, cbv, early_exit)
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    g = eye + t[..., None, None] * (m_mat - eye)
    u, info = _reverse_cholesky(torch.where(active[..., None, None], g, eye))
    failed = info != 0
    t = torch.where(failed, 0.0, t)
    # U^-1 by a left solve and a product: a right-hand solve (X U^T = C_o) costs 3x as much
    u_inv = torch.linalg.solve_triangular(torch.where(failed[..., None, None], eye, u), eye, upper=True)
    x = old_chol @ u_inv.mT  # C_o U^-T
    return mean_t, torch.where(active[..., None, None], x, chol), t, conv & ~failed, m, u_inv


def _kl_full_factor_backward(
    g_mean, g_factor, mean, factor, old_mean, old_factor, t, m, u_inv, mean_bound, cov_bound, mbv, cbv
):
    """Implicit gradient of :func:`_kl_full_factor` (``kernels/kl_full.py``'s derivation:
    ``Z = U^-1 (G - I) U^-T = I - U^-1 U^-T``, ``Htil = sym(Phi(X^T Xbar))``,
    ``W = (<Htil, Z> / <Z, Z>) Z - Htil``, ``Cbar = tril(-2 t C^-T V W V^T)``,
    ``V = A U^-T``); float64 rows."""
    chol, old_chol = factor.tril(), old_factor.tril()
    prec_delta = solve_lower_t(old_chol, solve_lower(old_chol, mean - old_mean))
    g_mean = mean_project_backward(g_mean, mean, old_mean, prec_delta, 2.0 * bound_or_value(mean_bound, mbv))
    active = kl_at_one(_whitened_r(m)) > bound_or_value(cov_bound, cbv)
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    x = old_chol @ u_inv.mT  # C_o U^-T
    phi = x.mT @ g_factor.tril()
    phi = phi.tril() - 0.5 * torch.diag_embed(phi.diagonal(dim1=-2, dim2=-1))
    h = 0.5 * (phi + phi.mT)
    z = eye - u_inv @ u_inv.mT
    zz = inner(z, z)
    w = (inner(h, z) / torch.where(zz > 0, zz, 1.0))[..., None, None] * z - h
    v = torch.linalg.solve_triangular(chol, x, upper=False)  # A U^-T = C^-1 C_o U^-T
    c_bar = torch.linalg.solve_triangular(chol.mT, v @ w @ v.mT, upper=True)  # C^-T V W V^T
    g_chol = (-2.0 * t[..., None, None] * c_bar).tril()
    return g_mean, torch.where(active[..., None, None], g_chol, g_factor.tril())


def kl_full(mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv, early_exit=False):
    if uses_fused_kernel(mean):
        return launch_kl_full_fwd(mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv)
    dtype = mean.dtype
    mean, factor, old_mean, old_factor, mean_bound, cov_bound = _float64(
        mean, factor, old_mean, old_factor, mean_bound, cov_bound
    )
    if uses_cpu_kernel(mean, factor):
        out = launch_kl_full_cpu_fwd(
            mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv, _cpu_kernel_constants()
        )
        return (out[0].to(dtype), out[1].to(dtype), *out[2:])
    if uses_factor_path(mean):
        out = _kl_full_factor(mean, factor, old_mean, old_factor, mean_bound, cov_bound, mbv, cbv, early_exit)
        return (out[0].to(dtype), out[1].to(dtype), *out[2:])
    chol, old_chol, m, u = _whiten(factor, old_factor)
    prec_delta = solve_lower_t(old_chol, solve_lower(old_chol, mean - old_mean))
    mean_t = mean_project(mean, old_mean, prec_delta, 2.0 * bound_or_value(mean_bound, mbv))
    r = _whitened_r(m)
    t, conv, active = _solve_newton(r, cov_bound, cbv, early_exit)
    _, chol_t = _assemble(old_chol, u, 1.0 + t.unsqueeze(-1) * torch.where(r < float("inf"), r, 0.0), active)
    # the eigen-decomposition is returned (and saved for the backward, which then needs no
    # second eigh: the forward's dominant cost)
    return mean_t.to(dtype), torch.where(active[..., None, None], chol_t, chol).to(dtype), t, conv, m, u


def kl_full_backward(
    g_mean, g_factor, mean, factor, old_mean, old_factor, t, conv, m, u, mean_bound, cov_bound, mbv, cbv
):
    """Implicit gradient in the whitened eigenbasis. With ``P = C_o^-T U`` (so that
    ``L = P diag(m) P^T``, ``L_o = P P^T``), ``H = W^T dL/dS_t W`` and ``D = diag(m / g)``:

        dL/dS = t P [D H D + 0.5 c diag(m^2 k)] P^T,  k = t r / g^2,
        c = <G, L - L_o> / <K, L - L_o> = (-sum r diag(H) / g^2) / (0.5 sum k r)

    (On the fused path ``u`` is the factor ``U`` of the kernel's forward; see the module.)
    """
    if uses_fused_kernel(mean):
        return launch_kl_full_bwd(
            g_mean, g_factor, mean, factor, old_mean, old_factor, t, m, u, mean_bound, cov_bound, mbv, cbv
        )
    dtype = mean.dtype
    g_mean, g_factor, mean, factor, old_mean, old_factor, t, mean_bound, cov_bound = _float64(
        g_mean, g_factor, mean, factor, old_mean, old_factor, t, mean_bound, cov_bound
    )
    if uses_cpu_kernel(mean, g_mean, g_factor):
        out = launch_kl_full_cpu_bwd(
            g_mean,
            g_factor,
            mean,
            factor,
            old_mean,
            old_factor,
            t,
            m,
            u,
            mean_bound,
            cov_bound,
            mbv,
            cbv,
            _cpu_kernel_constants(),
        )
        return out[0].to(dtype), out[1].to(dtype)
    if uses_factor_path(mean):
        out = _kl_full_factor_backward(
            g_mean, g_factor, mean, factor, old_mean, old_factor, t, m, u, mean_bound, cov_bound, mbv, cbv
        )
        return out[0].to(dtype), out[1].to(dtype)
    chol, old_chol = factor.tril(), old_factor.tril()
    prec_delta = solve_lower_t(old_chol, solve_lower(old_chol, mean - old_mean))
    g_mean = mean_project_backward(g_mean, mean, old_mean, prec_delta, 2.0 * bound_or_value(mean_bound, mbv))
    r = _whitened_r(m)
    active = kl_at_one(r) > bound_or_value(cov_bound, cbv)
    t = t.to(r.dtype)
    tt = t.unsqueeze(-1)
    x = tt * torch.where(r < float("inf"), r, 0.0)  # unsolvable rows: t = 0
    g = 1.0 + x
    w, chol_t = _assemble(old_chol, u, g, active)
    h = w.mT @ cholesky_backward(chol_t, g_factor) @ w
    # c = <G, L - L_o> / <K, L - L_o> in x = t r (t k r = (x / g)^2: no r^2 to overflow)
    xg2 = ((x / g) ** 2).sum(-1, keepdim=True)
    c = (
        -2.0
        * (x * h.diagonal(dim1=-2, dim2=-1) / (g * g)).sum(-1, keepdim=True)
        / torch.where(active.unsqueeze(-1) & (xg2 > 0), xg2, 1.0)
    )
    dm = m.clamp_min(0.0) / g
    # 0.5 c m^2 k with m^2 k = (m / g)^2 x
    y = dm.unsqueeze(-1) * h * dm.unsqueeze(-2) + torch.diag_embed(0.5 * c * dm * dm * x)
    p = torch.linalg.solve_triangular(old_chol.mT, u, upper=True)  # C_o^-T U
    pt_c = u.mT @ torch.linalg.solve_triangular(old_chol, chol, upper=False)  # U^T C_o^-1 C
    g_chol = (2.0 * tt.unsqueeze(-1) * (p @ y @ pt_c)).tril()
    return g_mean.to(dtype), torch.where(active[..., None, None], g_chol, g_factor.tril()).to(dtype)


def _launch_kl_diag_bwd(g_mean, g_std, mean, std, old_mean, old_std, t, conv, mean_bound, cov_bound, mbv, cbv):
    return launch_kl_diag_bwd(g_mean, g_std, mean, std, old_mean, old_std, t, mean_bound, cov_bound, mbv, cbv)


KL_DIAG = ProjectionOp(
    "project_kl_diag",
    1,
    kl_diag,
    kl_diag_backward,
    launch_kl_diag_fwd,
    _launch_kl_diag_bwd,
    aux=(Aux("t", 0, "compute"), Aux("converged", 0, torch.bool)),
    large_batch=(kl_diag_large, kl_diag_backward_large),
)


def _launch_kl_full_bwd(
    g_mean, g_factor, mean, factor, old_mean, old_factor, t, conv, m, u, mean_bound, cov_bound, mbv, cbv
):
    return launch_kl_full_bwd(
        g_mean, g_factor, mean, factor, old_mean, old_factor, t, m, u, mean_bound, cov_bound, mbv, cbv
    )


def _fused_fast_path(mean: Tensor) -> bool:
    """The eager fast path's test for the full op's fused kernel (float32 / float64
    inputs)."""
    return mean.dtype in (torch.float32, torch.float64) and uses_fused_kernel(mean)


# full covariance: computed in float64 inside (module docstring), its aux outputs too
KL_FULL = ProjectionOp(
    "project_kl_full",
    2,
    kl_full,
    kl_full_backward,
    eager=((launch_kl_full_fwd, _launch_kl_full_bwd, _fused_fast_path),),
    aux=(
        Aux("t", 0, torch.float64),
        Aux("converged", 0, torch.bool),
        Aux("eigvals", 1, torch.float64),
        Aux("eigvecs", 2, torch.float64),
    ),
)
