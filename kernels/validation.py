"""The value checks of a diagonal projection's inputs in one kernel (issue 12: value checks
that cost the host one launch, not one reduction per check).

One pass over ``mean, std, old_mean, old_std`` (and the per-row bounds when given) in their
storage dtype: for every check slot a program finds failing, it writes 0 into the (n,) int32
``ok`` vector (set to 1 before the launch; every writer writes the same 0, so no atomics are
needed). ``trpl_fast.ops.validation`` owns the messages and reads ``ok`` -- at once or
deferred -- exactly as it reads the torch checks' results. Slots (``CHECK_SLOTS``):

    0-3   mean, std, old_mean, old_std finite
    4-5   mean_bound, cov_bound finite and > 0 (when given as tensors)
    6-7   std, old_std > 0
    8-9   2 std^2, 2 old_std^2 finite in float64 (Frobenius on float64 inputs)
    10    std / old_std finite in the storage dtype (W2)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import load_tile, on_device, row_geometry, row_tile

CHECK_SLOTS = 11


@triton.jit
def _fail(ok_ptr, slot: tl.constexpr, bad):
    """Write 0 into ``ok[slot]`` if any element of the tile ``bad`` is set."""
    n_bad = tl.sum(tl.sum(bad.to(tl.int32), axis=1), axis=0)
    tl.store(ok_ptr + slot, 0, mask=n_bad > 0)


@triton.jit
def _non_finite(x):
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _check_diag_kernel(
    mean_ptr,
    std_ptr,
    old_mean_ptr,
    old_std_ptr,
    mean_bound_ptr,
    cov_bound_ptr,
    ok_ptr,
    n_rows,
    d,
    HAS_MEAN_BOUND: tl.constexpr,
    HAS_COV_BOUND: tl.constexpr,
    FROB_F64: tl.constexpr,
    W2: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, row_mask, mask, offs = row_tile(tl.program_id(0), n_rows, d, BLOCK_ROWS, BLOCK_D)
    # padded lanes: values that pass every check; half precision widened to float32 (which
    # keeps every value, NaN and inf included: the interpreter compares bfloat16 wrongly)
    mu = load_tile(mean_ptr, offs, mask, 0.0, F64)
    sd_raw = tl.load(std_ptr + offs, mask=mask, other=1.0)
    sd = sd_raw.to(tl.float64) if F64 else sd_raw.to(tl.float32)
    mu_o = load_tile(old_mean_ptr, offs, mask, 0.0, F64)
    sd_o = load_tile(old_std_ptr, offs, mask, 1.0, F64)
    _fail(ok_ptr, 0, _non_finite(mu))
    _fail(ok_ptr, 1, _non_finite(sd))
    _fail(ok_ptr, 2, _non_finite(mu_o))
    _fail(ok_ptr, 3, _non_finite(sd_o))
    if HAS_MEAN_BOUND:
        b = tl.load(mean_bound_ptr + rows, mask=row_mask, other=1.0).to(tl.float64)
        _fail(ok_ptr, 4, (_non_finite(b) | ((b > 0.0) == 0))[:, None])
    if HAS_COV_BOUND:
        b = tl.load(cov_bound_ptr + rows, mask=row_mask, other=1.0).to(tl.float64)
        _fail(ok_ptr, 5, (_non_finite(b) | ((b > 0.0) == 0))[:, None])
    # "not > 0": NaN fails it too, as in the torch checks ``(std > 0).all()``
    _fail(ok_ptr, 6, (sd > 0.0) == 0)
    _fail(ok_ptr, 7, (sd_o > 0.0) == 0)
    if FROB_F64:
        _fail(ok_ptr, 8, _non_finite(2.0 * (sd * sd)))
        _fail(ok_ptr, 9, _non_finite(2.0 * (sd_o * sd_o)))
    if W2:
        # the ratio rounded to the storage dtype, in which the torch check computes it;
        # float32 by div_rn (torch divides correctly rounded; Triton's float32 `/` may be
        # 2 ulp off), float64 by `/` (correctly rounded)
        if F64:
            _fail(ok_ptr, 10, _non_finite(sd / sd_o))
        else:
            _fail(ok_ptr, 10, _non_finite(tl.math.div_rn(sd, sd_o).to(sd_raw.dtype).to(tl.float32)))


def launch_check_diag(mean, std, old_mean, old_std, mean_bound, cov_bound, frob_f64: bool, w2: bool):
    """(rows, d) contiguous inputs in their storage dtype, (rows,) contiguous bounds or
    None -> ``ok``, (CHECK_SLOTS,) int32: 1 where the check passed or does not apply."""
    n_rows, d = mean.shape
    ok = torch.ones(CHECK_SLOTS, dtype=torch.int32, device=mean.device)
    if n_rows == 0:
        return ok
    block_rows, block_d, grid = row_geometry(n_rows, d)
    with on_device(mean):
        _check_diag_kernel[grid](
            mean,
            std,
            old_mean,
            old_std,
            mean if mean_bound is None else mean_bound,
            mean if cov_bound is None else cov_bound,
            ok,
            n_rows,
            d,
            HAS_MEAN_BOUND=mean_bound is not None,
            HAS_COV_BOUND=cov_bound is not None,
            FROB_F64=frob_f64,
            W2=w2,
            F64=mean.dtype == torch.float64,
            BLOCK_ROWS=block_rows,
            BLOCK_D=block_d,
        )
    return ok
