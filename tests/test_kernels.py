"""The Triton kernels themselves, called through their launchers, against the reference.

Without a GPU they run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set in conftest.py before triton is imported); on a CUDA machine on the GPU. Sizes stay
small: the interpreter is slow.
"""

from __future__ import annotations

import os

import pytest
import torch
from trpl_fast.kernels.frobenius import launch_frob_diag_bwd, launch_frob_diag_fwd
from trpl_fast.kernels.wasserstein import launch_w2_diag_bwd, launch_w2_diag_fwd

from trpl_fast import reference as R

from .helpers import F64, assert_close, make_case

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")

LAUNCHERS = {
    "frob": (launch_frob_diag_fwd, launch_frob_diag_bwd),
    "w2": (launch_w2_diag_fwd, launch_w2_diag_bwd),
}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("bounds", ["scalar", "per_state"])
@pytest.mark.parametrize("shape", [(41, 7), (64, 17), (3, 1), (5, 33)], ids=lambda s: f"rows={s[0]},d={s[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda v: f"dtype={v}")
@pytest.mark.parametrize("kind", ["frob", "w2"])
def test_diag_kernel_matches_reference(kind, dtype, shape, bounds):
    rows, d = shape
    mean, std, old_mean, old_std = make_case(kind, "diag", (rows,), d, seed=rows + d, conditioning="ill")
    gen = torch.Generator().manual_seed(1)
    if bounds == "per_state":
        mb = 0.1 * (0.2 + torch.rand(rows, generator=gen, dtype=F64))
        cb = 0.05 * (0.2 + torch.rand(rows, generator=gen, dtype=F64))
        args, kw = (mb.to(dtype).to(DEVICE), cb.to(dtype).to(DEVICE), 0.0, 0.0), dict(mean_bound=mb, cov_bound=cb)
    else:
        args, kw = (None, None, 0.1, 0.05), dict(mean_bound=0.1, cov_bound=0.05)
    fwd, bwd = LAUNCHERS[kind]
    dev = [t.to(dtype).to(DEVICE) for t in (mean, std, old_mean, old_std)]
    mean_t, std_t = fwd(*dev, *args)

    ref_in = [t.to(dtype).to(F64) for t in (mean, std, old_mean, old_std)]
    ref_in[0].requires_grad_(True)
    ref_in[1].requires_grad_(True)
    r_mean, r_std = R.project_diag(*ref_in, kind=kind, **kw)
    assert_close(mean_t, r_mean, TOL[dtype], "mean_t")
    assert_close(std_t, r_std, TOL[dtype], "std_t")

    g_mean = torch.randn(rows, d, generator=gen, dtype=F64).to(dtype)
    g_std = torch.randn(rows, d, generator=gen, dtype=F64).to(dtype)
    gm, gs = bwd(g_mean.to(DEVICE), g_std.to(DEVICE), *dev, *args)
    rgm, rgs = torch.autograd.grad((r_mean * g_mean.to(F64)).sum() + (r_std * g_std.to(F64)).sum(), ref_in[:2])
    floor = 10 * TOL[dtype]
    assert_close(gm, rgm, 10 * TOL[dtype], "grad mean", atol=floor)
    assert_close(gs, rgs, 10 * TOL[dtype], "grad std", atol=floor)


@pytest.mark.parametrize("kind", ["frob", "w2"])
def test_diag_kernel_half_inputs(kind):
    mean, std, old_mean, old_std = make_case(kind, "diag", (17,), 5, seed=2)
    fwd, _ = LAUNCHERS[kind]
    half = [t.to(torch.bfloat16).to(DEVICE) for t in (mean, std, old_mean, old_std)]
    mean_t, std_t = fwd(*half, None, None, 0.1, 0.05)
    assert mean_t.dtype == torch.bfloat16
    f32 = [t.to(torch.float32) for t in half]
    e_mean, e_std = fwd(*f32, None, None, 0.1, 0.05)
    # computed in float32, rounded once to bfloat16 (the interpreter truncates where the
    # GPU rounds to nearest: allow one bfloat16 ulp, 2^-7 relative)
    assert_close(mean_t, e_mean, 2.0**-7, "mean_t")
    assert_close(std_t, e_std, 2.0**-7, "std_t")


def test_float64_scalar_bounds_are_cached_for_eager_launches(monkeypatch):
    """float64 kernels take scalar bounds as (rows,) tensors: made once per (device, rows,
    value) for eager launches, afresh for tensors being traced; the cache is bounded."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from trpl_fast.kernels import _common

    monkeypatch.setattr(_common, "_BOUND_ROWS", {})
    like = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    a = _common.float64_bound_rows(0.1, 5, like)
    assert a is _common.float64_bound_rows(0.1, 5, like)
    assert a.dtype == torch.float64 and a.shape == (5,) and torch.all(a == 0.1)
    b = _common.float64_bound_rows(0.2, 5, like)
    assert b is not a and torch.all(b == 0.2)
    assert _common.float64_bound_rows(0.1, 7, like) is not a
    monkeypatch.setattr(_common, "MAX_CACHED_BOUND_ELEMENTS", 20)
    _common.float64_bound_rows(0.3, 9, like)  # 5 + 5 + 7 + 9 > 20: the cache starts again
    assert len(_common._BOUND_ROWS) == 1
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(like)
        rows = _common.float64_bound_rows(0.1, 5, fake)
        assert rows.shape == (5,)
    assert len(_common._BOUND_ROWS) == 1  # nothing traced was kept
    # and the launches read it: scalar bounds give what per-row tensors give
    mean, std, old_mean, old_std = (t.to(DEVICE) for t in make_case("frob", "diag", (6,), 3, seed=5))
    scalar = launch_frob_diag_fwd(mean, std, old_mean, old_std, None, None, 0.1, 0.05)
    per_row = launch_frob_diag_fwd(
        mean, std, old_mean, old_std, *(torch.full((6,), v, dtype=F64, device=DEVICE) for v in (0.1, 0.05)), 0.0, 0.0
    )
    for s, p in zip(scalar, per_row):
        assert torch.equal(s, p)
