"""KL projection: accuracy against the exact (bisection) reference on hard cases, the
constraint on every projected row, convergence reporting, and the Triton kernels."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from trpl_fast.kernels.kl import TOL_F64

import trpl_fast
from trpl_fast import reference as R
from trpl_fast.ops import kl as kl_ops

from .helpers import F64, assert_close, random_rotation

EPS_COV = [1e-6, 1e-3, 0.1, 10.0]


def whitened_case(form, n, d, spread, seed, scenario="random"):
    """(mean, cov, old_mean, old_cov) with whitened precision eigenvalues ``m`` chosen per
    scenario, in float64:

    * ``random``: ``log m`` uniform in ``[-log spread, log spread]``
    * ``one_far``: every ``m_i = 1`` but one, which is ``spread`` (or ``1/spread``)
    * ``equal``: the target equals the old policy
    """
    gen = torch.Generator().manual_seed(seed)
    if scenario == "random":
        log_m = (2 * torch.rand(n, d, generator=gen, dtype=F64) - 1) * math.log(spread)
    elif scenario == "one_far":
        log_m = torch.zeros(n, d, dtype=F64)
        log_m[:, 0] = math.log(spread) * torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, -1.0).to(F64)
    else:
        log_m = torch.zeros(n, d, dtype=F64)
    m = torch.exp(log_m)
    old_mean = torch.randn(n, d, generator=gen, dtype=F64)
    mean = old_mean.clone()
    if form == "diag":
        old_std = torch.exp(torch.randn(n, d, generator=gen, dtype=F64))
        return mean, old_std / torch.sqrt(m), old_mean, old_std
    a = torch.randn(n, d, d, generator=gen, dtype=F64) / math.sqrt(d) + 2 * torch.eye(d, dtype=F64)
    old_chol = torch.linalg.cholesky(a @ a.mT)
    u = random_rotation((n,), d, gen)
    w = old_chol @ u
    cov = (w / m.unsqueeze(-2)) @ w.mT  # whitened precision C_o^T L C_o = U diag(m) U^T
    cov = 0.5 * (cov + cov.mT)
    return mean, torch.linalg.cholesky(cov), old_mean, old_chol


def dense(form, p):
    return torch.diag_embed(p * p) if form == "diag" else p @ p.mT


def project(form, case, eps, dtype=F64):
    """(mean_t, cov_t, t, converged, ...) through the functional API."""
    return trpl_fast.functional.project(
        form, *[t.to(dtype) for t in case], kind="kl", mean_bound=1.0, cov_bound=eps, return_aux=True
    )


def check_against_reference(form, case, eps, dtype, rtol, kl_tol):
    mean_t, cov_t, t, conv = project(form, case, eps, dtype)[:4]
    ref_case = [x.to(dtype).to(F64) for x in case]
    ref = R.project_diag if form == "diag" else R.project_full
    _, r_cov = ref(*ref_case, kind="kl", mean_bound=1.0, cov_bound=eps)
    s_t, r_s = dense(form, cov_t.to(F64)), dense(form, r_cov)
    if form == "diag":  # elementwise relative error of the variances
        rel = (cov_t.to(F64) ** 2 / r_cov**2 - 1.0).abs()
        assert rel.max() < rtol, f"max variance rel. error {rel.max():.3e} at {divmod(int(rel.argmax()), rel.shape[1])}"
    else:
        assert_close(s_t, r_s, rtol, "projected covariance")
    old_s = dense(form, ref_case[3])
    kl_before = R.kl_cov(dense(form, ref_case[1]), old_s)
    kl_after = R.kl_cov(s_t, old_s)
    active = kl_before > eps
    assert conv.all(), f"{int((~conv).sum())} rows did not converge"
    err = (kl_after[active] - eps).abs() / eps
    if active.any():
        assert err.max() <= kl_tol, f"|KL - eps| / eps = {err.max():.3e} > {kl_tol}"
    assert torch.equal(cov_t[~active], case[1].to(dtype)[~active])
    return active


@pytest.mark.parametrize("eps", EPS_COV, ids=lambda e: f"eps={e:g}")
@pytest.mark.parametrize("scenario,spread", [("random", 1e4), ("random", 3.0), ("one_far", 1e4), ("one_far", 1.5)])
@pytest.mark.parametrize("d", [1, 7, 17, 64], ids=lambda d: f"d={d}")
@pytest.mark.parametrize("form", ["diag", "full"])
def test_hard_cases_float64(form, d, scenario, spread, eps):
    n = 8 if (form == "full" and d == 64) else 24
    case = whitened_case(form, n, d, spread, seed=d, scenario=scenario)
    check_against_reference(form, case, eps, F64, rtol=1e-9, kl_tol=1e-6)


@pytest.mark.parametrize("eps", EPS_COV, ids=lambda e: f"eps={e:g}")
@pytest.mark.parametrize("scenario,spread", [("random", 1e4), ("random", 3.0), ("one_far", 1e4)])
@pytest.mark.parametrize("d", [1, 7, 17], ids=lambda d: f"d={d}")
@pytest.mark.parametrize("form", ["diag", "full"])
def test_hard_cases_float32(form, d, scenario, spread, eps):
    case = whitened_case(form, 24, d, spread, seed=d + 1, scenario=scenario)
    check_against_reference(form, case, eps, torch.float32, rtol=1e-4, kl_tol=1e-3)


def _full_forward_backward(case, eps, seed=5):
    """Outputs (mean_t, factor_t, t, converged) and the gradients of mean and factor of
    the full KL op (per-state bounds, upstream gradients that are not ones)."""
    n, d = case[0].shape
    gen = torch.Generator().manual_seed(seed)
    mean, factor = (x.clone().requires_grad_(True) for x in case[:2])
    mean_bound = 0.05 * (0.5 + torch.rand(n, generator=gen, dtype=F64))
    out = trpl_fast.functional.project(
        "full", mean, factor, *case[2:], kind="kl", mean_bound=mean_bound, cov_bound=eps, return_aux=True
    )
    g_mean = torch.randn(n, d, generator=gen, dtype=F64)
    g_factor = torch.randn(n, d, d, generator=gen, dtype=F64)
    grads = torch.autograd.grad((out[0] * g_mean).sum() + (out[1] * g_factor).sum(), (mean, factor))
    return [o.detach() for o in out[:4]], grads


@pytest.mark.parametrize("eps", [1e-3, 0.1, 10.0], ids=lambda e: f"eps={e:g}")
@pytest.mark.parametrize("scenario,spread", [("random", 1e4), ("one_far", 1e4), ("random", 3.0)])
@pytest.mark.parametrize("d", [1, 7, 17, 40], ids=lambda d: f"d={d}")
def test_full_factor_path_equals_the_eigenvector_path(d, scenario, spread, eps, monkeypatch):
    """The full op's CPU path without eigenvectors (eigenvalues, then ``G = U U^T``,
    ``chol(S_t) = C_o U^-T``, the implicit backward in ``U``) against the eigenvector
    path it replaced on the CPU (still CUDA's for d > MAX_D): values, flags and both
    gradients, on rows far outside (spread 1e4, bound 10) and near the region."""
    case = list(whitened_case("full", 12, d, spread, seed=d + 7, scenario=scenario))
    gen = torch.Generator().manual_seed(d)
    case[0] = case[2] + 0.3 * torch.randn(12, d, generator=gen, dtype=F64)
    case[1][3] = case[3][3]  # inside the region: the identity
    monkeypatch.setattr(kl_ops, "CPU_KERNEL_DEVICE_TYPES", ())  # the torch factor path
    assert kl_ops.uses_factor_path(case[0])
    got, got_grads = _full_forward_backward(case, eps)
    monkeypatch.setattr(kl_ops, "FACTOR_PATH_DEVICE_TYPES", ())
    assert not kl_ops.uses_factor_path(case[0])
    want, want_grads = _full_forward_backward(case, eps)
    assert torch.equal(got[3], want[3]) and got[3].all()
    for name, a, b in zip(("mean_t", "factor_t", "t"), got[:3], want[:3]):
        assert_close(a, b, 1e-9, name, atol=1e-12)
    assert_close(got_grads[0], want_grads[0], 1e-8, "grad mean", atol=1e-10)
    assert_close(got_grads[1], want_grads[1], 1e-7, "grad factor", atol=1e-8 * float(want_grads[1].abs().max()))


def test_full_factor_path_flags_rows_whose_g_fails_to_factor(monkeypatch):
    """A row whose ``G = I + t (M - I)`` does not factor (forced here) comes back as the
    old policy (``t = 0``), flagged, with a zero gradient through its factor."""
    case = whitened_case("full", 6, 5, 1e3, seed=3)
    real = kl_ops._reverse_cholesky

    def fails_on_row_2(g):
        u, info = real(g)
        return u, torch.where(torch.arange(len(info)) == 2, 1, info)

    monkeypatch.setattr(kl_ops, "_reverse_cholesky", fails_on_row_2)
    monkeypatch.setattr(kl_ops, "CPU_KERNEL_DEVICE_TYPES", ())  # the torch factor path
    (mean_t, factor_t, t, conv), (_, g_factor) = _full_forward_backward(list(case), 0.01)
    assert not conv[2] and conv[[0, 1, 3, 4, 5]].all()
    assert t[2] == 0 and torch.allclose(factor_t[2], case[3][2], rtol=1e-14, atol=0)
    assert torch.equal(g_factor[2], torch.zeros_like(g_factor[2]))


@pytest.mark.parametrize("eps", [1e-3, 0.1, 10.0], ids=lambda e: f"eps={e:g}")
@pytest.mark.parametrize("scenario,spread", [("random", 1e4), ("one_far", 1e4), ("random", 3.0)])
@pytest.mark.parametrize("layout", ["row_major", "column_major"])
@pytest.mark.parametrize("d", [1, 2, 7, 17, 32], ids=lambda d: f"d={d}")
def test_full_cpu_kernel_equals_the_factor_path(d, layout, scenario, spread, eps, monkeypatch):
    """The full op's C kernel (``kernels/kl_cpu.c``, the CPU default for d <= 32)
    against the torch factor path it runs the algorithm of: values, flags, eigenvalues,
    ``t`` and both gradients, on rows far outside, near and inside the region, with factors
    stored row- or column-major (the kernel reads them in place)."""
    case = list(whitened_case("full", 70, d, spread, seed=d + 11, scenario=scenario))
    gen = torch.Generator().manual_seed(d)
    case[0] = case[2] + 0.3 * torch.randn(70, d, generator=gen, dtype=F64)
    case[1][3] = case[3][3]  # inside the region: the identity
    if layout == "column_major":
        case[1], case[3] = (x.mT.contiguous().mT for x in (case[1], case[3]))
        assert d == 1 or not case[1].is_contiguous()
    assert kl_ops.uses_cpu_kernel(case[0])
    calls = []
    launch = kl_ops.launch_kl_full_cpu_fwd
    monkeypatch.setattr(kl_ops, "launch_kl_full_cpu_fwd", lambda *a: calls.append(1) or launch(*a))
    got, got_grads = _full_forward_backward(case, eps)
    assert calls, "the C kernel did not run"
    monkeypatch.setattr(kl_ops, "CPU_KERNEL_DEVICE_TYPES", ())
    want, want_grads = _full_forward_backward(case, eps)
    assert torch.equal(got[3], want[3])
    for name, a, b in zip(("mean_t", "factor_t", "t"), got[:3], want[:3]):
        assert_close(a, b, 1e-10, name, atol=1e-13)
    assert_close(got_grads[0], want_grads[0], 1e-9, "grad mean", atol=1e-12)
    assert_close(got_grads[1], want_grads[1], 1e-8, "grad factor", atol=1e-9 * float(want_grads[1].abs().max()))


def test_full_cpu_kernel_threads_do_not_change_results():
    """Rows are independent: a batch split across threads gives the one-thread result
    bit for bit (forward outputs and both gradients)."""
    case = list(whitened_case("full", 200, 9, 30.0, seed=4))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_grads = _full_forward_backward(case, 0.05)
        torch.set_num_threads(max(2, before))
        many, many_grads = _full_forward_backward(case, 0.05)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one + list(one_grads), many + list(many_grads)):
        assert torch.equal(a, b)


def test_cpu_kernel_unavailable_falls_back_to_torch(monkeypatch, tmp_path):
    """Where the C kernels cannot be built (here: no compiler) the first call warns once and
    the full op runs the torch factor path, the diagonal op the torch solve, with the same
    results."""
    from trpl_fast.kernels import kl_cpu

    case = list(whitened_case("full", 8, 5, 30.0, seed=2))
    diag_case = list(whitened_case("diag", 8, 5, 30.0, seed=2))
    want, want_grads = _full_forward_backward(case, 0.05)
    want_diag, want_diag_grads = _diag_kernel_forward_backward(diag_case, 0.05, F64)
    monkeypatch.setattr(kl_cpu, "_lib", None)
    monkeypatch.setattr(kl_cpu, "_failed", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TRPL_FAST_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="building the CPU KL kernel failed"):
        assert not kl_ops.uses_cpu_kernel(case[0])
    assert not kl_ops.uses_cpu_diag_kernel(diag_case[0])
    got, got_grads = _full_forward_backward(case, 0.05)
    got_diag, got_diag_grads = _diag_kernel_forward_backward(diag_case, 0.05, F64)
    for a, b in zip(got[:3] + got_diag[:3], want[:3] + want_diag[:3]):
        assert_close(a, b, 1e-10, "output", atol=1e-13)
    for a, b in zip(got_grads + got_diag_grads, want_grads + want_diag_grads):
        assert_close(a, b, 1e-8, "gradient", atol=1e-10)


def _diag_kernel_forward_backward(case, eps, dtype, cov_bound=None):
    """(mean_t, std_t, t, converged) and both gradients (upstream gradients not ones) of the
    diagonal op on ``case`` in ``dtype``, cov bound ``eps`` or the tensor ``cov_bound``."""
    gen = torch.Generator().manual_seed(1)
    mean, std, old_mean, old_std = (x.to(dtype) for x in case)
    mean, std = mean.clone().requires_grad_(True), std.clone().requires_grad_(True)
    out = trpl_fast.functional.project(
        "diag",
        mean,
        std,
        old_mean,
        old_std,
        kind="kl",
        mean_bound=0.05,
        cov_bound=eps if cov_bound is None else cov_bound,
        return_aux=True,
    )
    g = [torch.randn(mean.shape, generator=gen, dtype=F64).to(dtype) for _ in range(2)]
    grads = torch.autograd.grad((out[0] * g[0]).sum() + (out[1] * g[1]).sum(), (mean, std))
    return [o.detach() for o in out], grads


@pytest.mark.parametrize("eps", [1e-3, 0.1, 10.0], ids=lambda e: f"eps={e:g}")
@pytest.mark.parametrize("scenario,spread", [("random", 1e4), ("one_far", 1e4), ("random", 3.0)])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("d", [1, 6, 17, 32], ids=lambda d: f"d={d}")
def test_diag_cpu_kernel_equals_the_torch_path(d, dtype, scenario, spread, eps, monkeypatch):
    """The diagonal op's C kernel (``kernels/kl_cpu.c``, the eager CPU default for d <= 32
    below the compiled large-batch sizes) against the torch solve it runs the algorithm of:
    values, ``t``, flags and both gradients, on rows far outside, near and inside the
    region, with a per-state bound on some cases. float32 storage is computed in float64
    by the kernel, in float32 by torch: compared to float32's resolution."""
    case = list(whitened_case("diag", 70, d, spread, seed=d + 13, scenario=scenario))
    gen = torch.Generator().manual_seed(d)
    case[0] = case[2] + 0.3 * torch.randn(70, d, generator=gen, dtype=F64) * case[3]
    case[1][3] = case[3][3]  # inside the region: the identity
    bound = eps * (0.5 + torch.rand(70, generator=gen, dtype=F64)).to(dtype) if scenario == "one_far" else None
    assert kl_ops.uses_cpu_diag_kernel(case[0].to(dtype))
    calls = []
    launch = kl_ops.launch_kl_diag_cpu_fwd
    monkeypatch.setattr(kl_ops, "launch_kl_diag_cpu_fwd", lambda *a: calls.append(1) or launch(*a))
    got, got_grads = _diag_kernel_forward_backward(case, eps, dtype, bound)
    assert calls, "the C kernel did not run"
    monkeypatch.setattr(kl_ops, "CPU_KERNEL_DEVICE_TYPES", ())
    want, want_grads = _diag_kernel_forward_backward(case, eps, dtype, bound)
    assert len(calls) == 1
    assert torch.equal(got[3], want[3]) and got[3].all()
    assert all(a.dtype == b.dtype for a, b in zip(got, want))
    tol = 1e-12 if dtype == F64 else 2e-5
    for name, a, b in zip(("mean_t", "std_t", "t"), got[:3], want[:3]):
        assert_close(a, b, tol, name)
    assert_close(got_grads[0], want_grads[0], tol, "grad mean", atol=tol)
    assert_close(got_grads[1], want_grads[1], 50 * tol, "grad std", atol=50 * tol)


def test_diag_cpu_kernel_reports_float32_overflow_as_torch_does():
    """float32 storage: a row whose precision ratio overflows float32 (old_std / std past
    ~1.8e19) is reported with the old std and t = 0 -- as the float32 torch solve does --
    though the kernel's float64 could solve it; its neighbours are solved."""
    case = [x.to(torch.float32) for x in whitened_case("diag", 4, 3, 10.0, seed=2)]
    case[0] = case[2] + 0.1
    case[1] = case[1].clone()
    case[1][1, 2] = case[3][1, 2] * 1e-20
    got, _ = _diag_kernel_forward_backward(case, 0.01, torch.float32)
    assert got[3].tolist() == [True, False, True, True]
    assert got[2][1] == 0 and torch.equal(got[1][1], case[3][1])


def test_diag_cpu_kernel_threads_do_not_change_results():
    case = list(whitened_case("diag", 3000, 7, 30.0, seed=4))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_grads = _diag_kernel_forward_backward(case, 0.05, F64)
        torch.set_num_threads(max(2, before))
        many, many_grads = _diag_kernel_forward_backward(case, 0.05, F64)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one + list(one_grads), many + list(many_grads)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("form", ["diag", "full"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_barely_and_far_outside(form, dtype):
    """Scale one target so that KLc(target || old) = eps * (1 + 1e-6) (barely outside),
    another to 1e6 * eps (far outside)."""
    d, eps = 5, 0.01
    base = whitened_case(form, 2, d, 4.0, seed=5)
    # KLc along the path L(s) = L_o + s (L - L_o) is monotone in s: pick s by bisection on
    # the reference so that KLc hits the wanted values, and build the targets from it.
    old_s = dense(form, base[3])
    prec, old_prec = torch.linalg.inv(dense(form, base[1])), torch.linalg.inv(old_s)
    targets = []
    for i, want in enumerate([eps * (1 + 1e-6), eps * 1e6]):
        lo, hi = 0.0, 1.0
        while R.kl_cov(torch.linalg.inv(old_prec[i] + hi * (prec[i] - old_prec[i])), old_s[i]) < want:
            hi *= 2.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            k = R.kl_cov(torch.linalg.inv(old_prec[i] + mid * (prec[i] - old_prec[i])), old_s[i])
            lo, hi = (mid, hi) if k < want else (lo, mid)
        targets.append(torch.linalg.inv(old_prec[i] + hi * (prec[i] - old_prec[i])))
    target = torch.stack(targets)
    target = 0.5 * (target + target.mT)
    cov = target.diagonal(dim1=-2, dim2=-1).sqrt() if form == "diag" else torch.linalg.cholesky(target)
    case = (base[0], cov, base[2], base[3])
    active = check_against_reference(
        form, case, eps, dtype, rtol=1e-9 if dtype == F64 else 1e-4, kl_tol=1e-6 if dtype == F64 else 1e-3
    )
    assert active.all()


@pytest.mark.parametrize("form", ["diag", "full"])
def test_target_equal_to_old_is_identity(form):
    case = whitened_case(form, 4, 6, 1.0, seed=0, scenario="equal")
    mean = case[0].clone().requires_grad_(True)
    cov = case[1].clone().requires_grad_(True)
    mean_t, cov_t, t, conv = trpl_fast.functional.project(
        form, mean, cov, case[2], case[3], kind="kl", mean_bound=0.1, cov_bound=1e-6, return_aux=True
    )[:4]
    assert torch.equal(cov_t, cov) and torch.equal(mean_t, mean)
    assert conv.all() and (t == 1).all()
    g = torch.randn_like(cov)
    (g_cov,) = torch.autograd.grad((cov_t * g).sum(), cov)
    assert torch.equal(g_cov, g if form == "diag" else g.tril())


def test_nonconverged_rows_are_flagged_and_reported(monkeypatch):
    case = whitened_case("diag", 16, 7, 1e4, seed=1)
    monkeypatch.setattr(kl_ops, "MAX_ITER", 1)
    layer = trpl_fast.TrustRegionProjection("kl", 1.0, 1e-3)
    mean_t, std_t = layer(*case)
    assert layer.last_converged is not None and not layer.last_converged.all()
    with pytest.warns(RuntimeWarning, match="did not converge"):
        m = layer.metrics(mean_t, std_t, case[2], case[3])
    assert m["nonconverged_states"] == float((~layer.last_converged).sum())
    monkeypatch.setattr(kl_ops, "MAX_ITER", 50)
    mean_t, std_t = layer(*case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer.metrics(mean_t, std_t, case[2], case[3])["nonconverged_states"] == 0.0


def test_newton_needs_few_iterations():
    """Newton on log KLc from t0 = 2 sqrt(eps / sum r^2) (MATH.md): measured here by
    counting iterations of the early-exit CPU path on 4096 random rows."""
    gen = torch.Generator().manual_seed(0)
    r = torch.exp(0.5 * torch.randn(4096, 17, generator=gen, dtype=F64)) - 1.0
    iters = []
    for k in range(1, 12):
        old = kl_ops.MAX_ITER
        try:
            kl_ops.MAX_ITER = k
            _, conv, _ = kl_ops.kl_dual_newton(r, 0.01)
        finally:
            kl_ops.MAX_ITER = old
        iters.append(conv.double().mean().item())
    assert iters[7] == 1.0, iters  # every row within 8 iterations


@pytest.mark.parametrize("early_exit", ["all_rows", "open_rows"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_masked_newton_equals_the_early_exit_one(dtype, early_exit, monkeypatch):
    """The traced / GPU-shaped solve (a fixed number of masked iterations over all rows)
    against the early-exit CPU one, both of its forms (few rows: all rows per iteration;
    many: the open rows gathered): hard spreads, ratios at -1 and past overflow, rows
    inside the region, per-row bounds, leading batch dimensions."""
    if early_exit == "open_rows":
        monkeypatch.setattr(kl_ops, "SMALL_BATCH_ROWS", 0)
    gen = torch.Generator().manual_seed(5)
    big = 2.0**120 if dtype == F64 else 2.0**100
    r = torch.exp(3 * torch.randn(4, 10, 7, generator=gen, dtype=F64)) - 1.0
    r[0, 0] = torch.tensor([-1.0, -1.0, 0, 0, 0, 0, 0])
    r[0, 1, 0] = big
    r[0, 2] = 1e-4 * torch.randn(7, generator=gen, dtype=F64)  # inside the region
    r = r.to(dtype)
    eps = (0.01 * (0.2 + torch.rand(4, 10, generator=gen, dtype=F64))).to(dtype)
    for e, e_flat in ((eps, eps.reshape(-1)), (0.01, 0.01)):
        t_m, conv_m, active_m = kl_ops.kl_dual_newton(r, e)
        t_e, conv_e, active_e = kl_ops.kl_dual_newton(r.reshape(-1, 7), e_flat, early_exit=True)
        assert t_m.shape == conv_m.shape == active_m.shape == (4, 10)
        assert torch.equal(active_m.reshape(-1), active_e) and not active_m[0, 2]
        assert torch.equal(conv_m.reshape(-1), conv_e) and conv_e.sum() >= 38
        assert_close(t_m.reshape(-1), t_e, 1e-12 if dtype == F64 else 1e-5, "t")


@pytest.mark.parametrize("shape", [(5, 3), (1, 4), (6, 1), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_rows_to_columns_is_the_contiguous_transpose(shape, compiled):
    """The masked Newton's (d, rows) layout: the transpose's values, contiguous (rows
    innermost), eager and inside a compiled graph."""
    from trpl_fast.ops._layout import rows_to_columns

    x = torch.arange(shape[0] * shape[1], dtype=F64).reshape(shape) + 0.5

    def transpose_plus_one(x):
        return rows_to_columns(x) + 1.0, rows_to_columns(x)

    fn = torch.compile(transpose_plus_one, fullgraph=True, dynamic=False) if compiled else transpose_plus_one
    plus_one, y = fn(x)
    assert y.shape == (shape[1], shape[0]) and y.is_contiguous()
    assert torch.equal(y, x.T) and torch.equal(plus_one, x.T + 1.0)


@pytest.fixture
def large_batch_path(monkeypatch):
    """The compiled CPU path for large batches, forced on for every batch size; counts the
    compiled calls."""
    from trpl_fast.ops import _compiled_cpu

    monkeypatch.setattr(_compiled_cpu, "_min_elements", 1)
    monkeypatch.setattr(_compiled_cpu, "_unavailable", False)
    calls = []
    real = kl_ops.run_compiled

    def counted(fn, *args, **kw):
        calls.append(fn.__name__)
        return real(fn, *args, **kw)

    monkeypatch.setattr(kl_ops, "run_compiled", counted)
    return calls


def _diag_forward_backward(case, dtype, bounds, seed=3):
    """Outputs (mean_t, std_t, t, converged) and the gradients of mean and std of the
    KL diagonal op for upstream gradients that are not ones."""
    n, d = case[0].shape
    gen = torch.Generator().manual_seed(seed)
    mean, std = (x.to(dtype).clone().requires_grad_(True) for x in case[:2])
    if bounds == "per_state":
        kw = dict(mean_bound=0.05 * (0.5 + torch.rand(n, generator=gen, dtype=F64)).to(dtype))
        kw["cov_bound"] = (0.01 * (0.5 + torch.rand(n, generator=gen, dtype=F64))).to(dtype)
        kw["cov_bound"][:4] = 10.0  # the hardest rows: spread 1e8 and a bound of 10
    else:
        kw = dict(mean_bound=0.05, cov_bound=10.0)
    out = trpl_fast.functional.project(
        "diag", mean, std, *[x.to(dtype) for x in case[2:]], kind="kl", return_aux=True, **kw
    )
    g_mean = torch.randn(n, d, generator=gen, dtype=F64).to(dtype)
    g_std = torch.randn(n, d, generator=gen, dtype=F64).to(dtype)
    grads = torch.autograd.grad((out[0] * g_mean).sum() + (out[1] * g_std).sum(), (mean, std))
    return [o.detach() for o in out[:4]], grads


@pytest.mark.parametrize("solve", ["columns", "masked"])
@pytest.mark.parametrize("bounds", ["scalar", "per_state"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_large_batch_path_equals_the_eager_one(dtype, bounds, solve, large_batch_path, monkeypatch):
    """The compiled CPU path for large batches (forced on here for 45 rows): values, flags
    and both gradients as the eager path gives them, including the rows its masked solve
    leaves open (spread 1e8 with a bound of 10, an overflowed ratio), solved again. Both
    solves: unrolled over the columns (d <= MAX_UNROLLED_D) and per element (larger d)."""
    from trpl_fast.ops import _compiled_cpu

    if solve == "masked":
        monkeypatch.setattr(kl_ops, "MAX_UNROLLED_D", 6)
    n, d = 45, 7
    case = list(whitened_case("diag", n, d, 1e8, seed=11))
    gen = torch.Generator().manual_seed(4)
    case[0] = case[2] + 0.3 * torch.randn(n, d, generator=gen, dtype=F64)
    case[1][5::7] = case[3][5::7] * (1 + 1e-6)  # inside the region
    case[1][6, 0] = case[3][6, 0] * (2.0**-70 if dtype == torch.float32 else 2.0**-600)  # r overflows
    got, got_grads = _diag_forward_backward(case, dtype, bounds)
    forward = "_kl_diag_columns" if solve == "columns" else "_kl_diag_masked"
    backward = "_kl_diag_backward_columns" if dtype == F64 else "_kl_diag_backward_rows"
    assert large_batch_path == [forward, backward]
    # the masked solve alone leaves rows open: the eager second solve is exercised
    rows = [x.to(dtype) for x in case]
    eps = torch.full((n,), 10.0, dtype=dtype)
    masked = getattr(kl_ops, forward)(*rows, torch.full((n,), 0.05, dtype=dtype), eps)
    assert (~masked[3]).sum() >= 2
    monkeypatch.setattr(_compiled_cpu, "_min_elements", None)
    want, want_grads = _diag_forward_backward(case, dtype, bounds)
    assert len(large_batch_path) == 2  # the eager run did not compile
    assert torch.equal(got[3], want[3]) and not got[3][6]  # the overflowed row is flagged
    # two solves of the same tolerance (TOL_F64 on log KLc) by different formulas
    tol = 2e-12 if dtype == F64 else 2e-6
    for name, a, b in zip(("mean_t", "std_t", "t"), got[:3], want[:3]):
        assert_close(a, b, tol, name)
    assert_close(got_grads[0], want_grads[0], 100 * tol, "grad mean", atol=100 * tol)
    assert_close(got_grads[1], want_grads[1], 100 * tol, "grad std", atol=100 * tol)


@pytest.mark.parametrize("d", [1, 2, 6, 17, 64])
def test_kl_of_columns_is_accurate_at_every_scale(d):
    """The product form of ``KLc`` (one log per row) against the per-element sum of
    ``phi`` (float64, a sum of non-negative terms each accurate to the last digits) on
    rows with ``|x|`` from 1e-8 to 100, mixed and one-signed: within TOL_F64 / 5 relative,
    so the solve's tolerance stays meaningful. Products that leave float64's range, and rows
    the error bound does not certify, are NaN (the eager solve takes them)."""
    gen = torch.Generator().manual_seed(d)
    rows = []
    for scale in (1e-8, 1e-5, 1e-3, 1e-2, 0.1, 0.3, 1.0, 5.0, 100.0):
        x = scale * torch.randn(300, d, generator=gen, dtype=F64)
        rows += [x, x.abs(), -x.abs()]
    x = torch.cat(rows).clamp_min(-1 + 1e-12)
    want = 0.5 * kl_ops.kl_phi(x).sum(-1)
    got, s2, s3, certified = kl_ops.kl_of_columns(list(x.T), torch.ones(x.shape[0], dtype=F64))
    product = (1 + x).prod(-1)  # NaN exactly where it leaves float64's normal range
    in_range = (product >= torch.finfo(F64).tiny) & (product < math.inf)
    assert torch.equal(~got.isnan(), in_range) and not (certified & ~in_range).any()
    if d <= 17:  # the bound is pessimistic beyond (module docstring)
        assert certified[in_range].float().mean() > 0.9, f"certified {certified.float().mean():.1%}"
    assert_close(got[certified], want[certified], TOL_F64 / 4, "KLc (certified)")
    assert_close(got[in_range], want[in_range], TOL_F64, "KLc (all in range)")
    assert_close(s2, ((x / (1 + x)) ** 2).sum(-1), 1e-14, "s2")
    assert_close(s3, ((x / (1 + x)) ** 3).sum(-1), 1e-14, "s3")
    # outside float64's range: 1e-200 ** 2 underflows, 1e200 ** 2 overflows
    far = torch.tensor([[1e-200 - 1, 1e-200 - 1], [1e200, 1e200]], dtype=F64)
    kl_far, _, _, certified_far = kl_ops.kl_of_columns(list(far.T), torch.ones(2, dtype=F64))
    assert kl_far.isnan().all() and not certified_far.any()


def _log_ratio_rows(n: int, d: int, scale: float, seed: int) -> torch.Tensor:
    """Ratios ``r = v_o / v - 1`` (n, d) of log-std differences ``scale * N(0, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.expm1(-2.0 * scale * torch.randn(n, d, generator=gen, dtype=F64))


@pytest.mark.parametrize("d,scale", [(3, 0.3), (17, 0.05), (17, 1.0)], ids=["d3", "d17-near", "d17-far"])
def test_halley_factor_matches_finite_differences(d, scale):
    """``halley_factor`` (the closed form of ``1 - h h'' / (2 h'^2)`` in ``s = log t``)
    against central differences of ``h(s) = log KLc(e^s) - log eps`` evaluated per element."""
    r = _log_ratio_rows(40, d, scale, seed=d)
    eps, step = 0.01, 1e-4
    t = torch.full((r.shape[0],), 0.3, dtype=F64)

    def h(s):
        return torch.log(0.5 * kl_ops.kl_phi(torch.exp(s).unsqueeze(-1) * r).sum(-1) / eps)

    s = torch.log(t)
    h0, hp, hm = h(s), h(s + step), h(s - step)
    d1, d2 = (hp - hm) / (2 * step), (hp - 2 * h0 + hm) / step**2
    want = 1.0 - h0 * d2 / (2 * d1 * d1)
    kl, s2, s3, _ = kl_ops.kl_of_columns(list(r.T), t)
    assert_close(0.5 * s2 / kl, d1, 1e-7, "h'")
    got = kl_ops.halley_factor(h0, kl, s2, s3)
    lo, hi = kl_ops.HALLEY_FACTOR_RANGE
    inside = (want > lo + 1e-3) & (want < hi - 1e-3)
    assert inside.any()
    assert_close(got[inside], want[inside], 1e-5, "Halley factor")
    assert (got[~inside] == 1.0).all()


@pytest.mark.parametrize(
    "d,scale,eps,iterations",
    [(17, 0.25, 0.01, 3), (6, 0.05, 0.005, 4), (6, 0.3, 0.05, 4), (17, 0.02, 0.001, 4), (17, 1.0, 0.5, 4)],
    ids=["itpal-like", "d6-near", "d6-far", "d17-small-bound", "d17-large-bound"],
)
def test_column_solve_settles_rows_within_its_iterations(d, scale, eps, iterations):
    """The masked Halley solve of the compiled path leaves no certified row open within
    ``COLUMNS_ITER`` iterations on rows like ``bench.itpal_peer``'s and on random rows of
    bounds up to 0.5 (open rows are correct, but settled by the slower eager solve), and
    each converged row meets the bound to the tolerance."""
    assert iterations <= kl_ops.COLUMNS_ITER
    r = _log_ratio_rows(3000, d, scale, seed=11)
    e = torch.full((r.shape[0],), eps, dtype=F64)
    t, conv, active = kl_ops.kl_dual_newton_columns(list(r.T), e, iterations)
    _, _, _, certain = kl_ops.kl_of_columns(list(r.T), t)
    assert active.sum() > 0.9 * r.shape[0]
    assert bool((conv | ~certain)[active].all()), f"{int((~conv & certain & active).sum())} rows open"
    kl = 0.5 * kl_ops.kl_phi(t.unsqueeze(-1) * r).sum(-1)
    assert_close(kl[conv & active], e[conv & active], 1e-11, "KLc(t)")


def swinging_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """Ratios ``r`` (n, d) whose running product ``prod (1 + r)`` climbs to ~e^10..e^90
    over the first 1-3 columns and comes back near 1 over the rest: the rounding of the
    product-form recurrences is then of the size of the peak (found in review)."""
    gen = torch.Generator().manual_seed(seed)
    log_g = torch.zeros(n, d, dtype=F64)
    k = 1 + torch.arange(n) % 3
    for j in range(3):
        big = (k > j).to(F64) * (5 + 25 * torch.rand(n, generator=gen, dtype=F64))
        log_g[:, j] = big
    rest = (d - k).to(F64)
    back = -log_g.sum(-1) / rest
    cols = torch.arange(d).expand(n, d) >= k.unsqueeze(-1)
    log_g = torch.where(cols, back.unsqueeze(-1) + 0.01 * torch.randn(n, d, generator=gen, dtype=F64), log_g)
    return torch.expm1(log_g).clamp_min(-1 + 1e-15)


@pytest.mark.parametrize("d", [6, 17, 32])
def test_kl_of_columns_never_returns_an_uncertified_value(d):
    """On rows whose running product swings, at t = 1 and at smaller t, every row the
    product form certifies has ``KLc`` within TOL_F64 / 4 (the others cannot end a solve)."""
    r = swinging_rows(3000, d, seed=d)
    for t in (1.0, 0.3, 1e-3, 1e-6):
        x = t * r
        want = 0.5 * kl_ops.kl_phi(x).sum(-1)
        got, _, _, certified = kl_ops.kl_of_columns(list(r.T), torch.full((r.shape[0],), t, dtype=F64))
        rel = ((got - want).abs() / want)[certified]
        assert rel.numel() == 0 or rel.max() <= TOL_F64 / 4, f"t={t}: error {rel.max():.2e} on a certified row"


def test_kl_of_columns_certifies_no_row_with_a_biased_product():
    """Rows built (in review) so that the roundings of ``g`` and of the product all lean
    one way, with ``p`` = 1.5 (once read through ``log p``: 7.4e-13 off, certified) and
    ``p`` = 3.5 (the large branch): certified values stay within TOL_F64 / 4."""
    x = torch.tensor(
        [
            0.022970568309597875, 0.02297056829565192, 0.02297056833690825, 0.022970568291094232,
            0.022970568297892794, 0.02297056829499711, 0.022970568299854336, 0.022970568338111733,
            0.022970568318245625, 0.022970568329521938, 0.02297056832714717, 0.022970568269294115,
            0.02297056831151412, 0.022970568302961628, 0.02297056828614508, 0.022970568319990007,
            0.022970568258015803, 0.022970568314531706,
        ],
        dtype=F64,
    )  # fmt: skip
    big = torch.full((1, 32), math.expm1(math.log(3.51) / 32), dtype=F64)
    for row in (x.unsqueeze(0), big, big * (1 + 1e-9 * torch.arange(32, dtype=F64))):
        want = 0.5 * kl_ops.kl_phi(row).sum(-1)
        got, _, _, certified = kl_ops.kl_of_columns(list(row.T), torch.ones(1, dtype=F64))
        rel = ((got - want).abs() / want)[certified]
        assert rel.numel() == 0 or rel.max() <= TOL_F64 / 4, f"certified with error {rel.max():.2e}"


@pytest.mark.parametrize("eps", [0.05, 10.0], ids=lambda e: f"eps={e:g}")
def test_large_batch_path_projects_swinging_rows_as_the_eager_one(eps, large_batch_path, monkeypatch):
    """Rows far outside the region whose product swings (review: the uncertified product
    form once called some of them inside and returned them unprojected): flags, values
    and t as the eager path's, and every row within its bound."""
    from trpl_fast.ops import _compiled_cpu

    n, d = 600, 17
    r = swinging_rows(n, d, seed=7)
    old_std = torch.exp(0.2 * torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=F64))
    std = old_std / torch.sqrt(1.0 + r)
    mean = old_mean = torch.zeros(n, d, dtype=F64)
    args = dict(kind="kl", mean_bound=0.1, cov_bound=eps, return_aux=True)
    got = trpl_fast.functional.project("diag", mean, std, old_mean, old_std, **args)
    assert large_batch_path == ["_kl_diag_columns"]
    monkeypatch.setattr(_compiled_cpu, "_min_elements", None)
    want = trpl_fast.functional.project("diag", mean, std, old_mean, old_std, **args)
    assert torch.equal(got[3], want[3])
    # solves of the same tolerance (|log KLc - log eps| <= 1e-12) from different starts
    assert_close(got[2], want[2], 1e-11, "t")
    assert_close(got[1], want[1], 1e-11, "std_t")
    kl_after = R.kl_cov(torch.diag_embed(got[1] ** 2), torch.diag_embed(old_std**2))
    assert (kl_after[got[3]] <= eps * (1 + 1e-10)).all()


def test_large_batch_path_falls_back_to_eager_without_a_compiler(large_batch_path, monkeypatch):
    """A compile failure (no C++ compiler) warns once and leaves the results to the eager
    path; later calls do not try again."""
    from torch._dynamo.exc import TorchDynamoException

    from trpl_fast.ops import _compiled_cpu

    def no_compiler(fn, **kw):
        def fails(*args):
            raise TorchDynamoException("no C++ compiler")

        return fails

    monkeypatch.setattr(_compiled_cpu, "_compiled", {})
    monkeypatch.setattr(torch, "compile", no_compiler)
    case = whitened_case("diag", 9, 5, 30.0, seed=2)
    with pytest.warns(RuntimeWarning, match="run eagerly"):
        got, got_grads = _diag_forward_backward(case, F64, "scalar")
    assert _compiled_cpu._unavailable and large_batch_path == ["_kl_diag_columns"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _diag_forward_backward(case, F64, "scalar")
    assert large_batch_path == ["_kl_diag_columns"]
    monkeypatch.setattr(_compiled_cpu, "_min_elements", None)
    want, want_grads = _diag_forward_backward(case, F64, "scalar")
    for a, b in zip(got + list(got_grads), want + list(want_grads)):
        assert torch.equal(a, b)


def test_large_batch_path_compiles_one_function_per_d(large_batch_path, monkeypatch):
    """The unrolled solve is specialized to d: each d gets a compiled function of its own
    (one shared function would reach dynamo's recompile limit and run eagerly)."""
    from trpl_fast.ops import _compiled_cpu

    compiled = []

    def recording_compile(fn, **kw):
        compiled.append(fn.__name__)
        return fn  # eager: only the bookkeeping is under test

    monkeypatch.setattr(_compiled_cpu, "_compiled", {})
    monkeypatch.setattr(torch, "compile", recording_compile)
    for d in (3, 5, 3):
        _diag_forward_backward(whitened_case("diag", 4, d, 30.0, seed=d), F64, "scalar")
    keys = sorted(k for fn, k in _compiled_cpu._compiled if fn is kl_ops._kl_diag_columns)
    assert keys == [3, 5] and compiled.count("_kl_diag_columns") == 2


def test_large_batch_path_compiles_with_threads_chosen_at_run_time(large_batch_path, monkeypatch):
    """Inductor sizes its OpenMP regions by the first call's shapes and caches the graph on
    disk for every later size: a graph first compiled for a small batch came back serial
    for large ones. The compiled functions ask for run-time thread counts instead."""
    from trpl_fast.ops import _compiled_cpu

    seen = []

    def recording_compile(fn, **kw):
        seen.append((fn.__name__, kw["dynamic"], kw["options"].get("cpp.dynamic_threads")))
        if fn.__name__ == "_kl_diag_backward_columns":  # rows of d: 256-bit vectors where there are
            avx = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            assert kw["options"].get("cpp.simdlen") == (256 if avx else None)
        return fn

    monkeypatch.setattr(_compiled_cpu, "_compiled", {})
    monkeypatch.setattr(torch, "compile", recording_compile)
    _diag_forward_backward(whitened_case("diag", 4, 3, 30.0, seed=1), F64, "scalar")
    assert seen == [("_kl_diag_columns", True, True), ("_kl_diag_backward_columns", True, True)]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "1"], ids=repr)
def test_cpu_compile_threshold_rejects_bad_values(bad):
    from trpl_fast.ops._compiled_cpu import set_cpu_compile_min_elements

    with pytest.raises(ValueError, match="min_elements"):
        set_cpu_compile_min_elements(bad)


# -- the Triton kernels (interpreter on CPU, or the GPU) ---------------------------------
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("bounds", ["scalar", "per_state"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("d", [1, 7, 17], ids=lambda d: f"d={d}")
def test_kl_diag_kernel(d, dtype, bounds):
    from trpl_fast.kernels.kl import launch_kl_diag_bwd, launch_kl_diag_fwd

    n = 41
    case = list(whitened_case("diag", n, d, 30.0, seed=d))
    gen = torch.Generator().manual_seed(2)
    case[0] = case[2] + 0.3 * torch.randn(n, d, generator=gen, dtype=F64)
    case[1][::5] = case[3][::5] * (1 + 1e-6)  # some rows inside the region
    if bounds == "per_state":
        mb = 0.05 * (0.5 + torch.rand(n, generator=gen, dtype=F64))
        cb = 0.01 * (0.5 + torch.rand(n, generator=gen, dtype=F64))
        args, kw = (mb.to(dtype).to(DEVICE), cb.to(dtype).to(DEVICE), 0.0, 0.0), dict(mean_bound=mb, cov_bound=cb)
    else:
        args, kw = (None, None, 0.05, 0.01), dict(mean_bound=0.05, cov_bound=0.01)
    dev = [x.to(dtype).to(DEVICE) for x in case]
    mean_t, std_t, t, conv = launch_kl_diag_fwd(*dev, *args)
    assert conv.all()
    ref_in = [x.to(dtype).to(F64) for x in case]
    ref_in[0].requires_grad_(True)
    ref_in[1].requires_grad_(True)
    r_mean, r_std = R.project_diag(*ref_in, kind="kl", **kw)
    tol = 1e-11 if dtype == F64 else 1e-5
    assert_close(mean_t, r_mean, tol, "mean_t")
    assert_close(std_t.to(F64) / r_std, torch.ones_like(r_std), tol, "std_t / reference")
    g_mean = torch.randn(n, d, generator=gen, dtype=F64).to(dtype)
    g_std = torch.randn(n, d, generator=gen, dtype=F64).to(dtype)
    gm, gs = launch_kl_diag_bwd(g_mean.to(DEVICE), g_std.to(DEVICE), *dev, t, *args)
    rgm, rgs = torch.autograd.grad((r_mean * g_mean.to(F64)).sum() + (r_std * g_std.to(F64)).sum(), ref_in[:2])
    assert_close(gm, rgm, 100 * tol, "grad mean", atol=100 * tol)
    assert_close(gs, rgs, 100 * tol, "grad std", atol=100 * tol)


@needs_triton
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_kl_newton_kernel_matches_torch(dtype):
    from trpl_fast.kernels.kl import launch_kl_newton

    gen = torch.Generator().manual_seed(3)
    r = (torch.exp(2 * torch.randn(37, 9, generator=gen, dtype=F64)) - 1.0).to(dtype)
    eps = torch.full((37,), 0.01, dtype=dtype)
    t_k, conv_k = launch_kl_newton(r.to(DEVICE), eps.to(DEVICE), 0.0)
    t_t, conv_t, _ = kl_ops.kl_dual_newton(r, 0.01)
    assert conv_k.all() and conv_t.all()
    assert_close(t_k, t_t, 1e-12 if dtype == F64 else 1e-5, "t")


def test_diag_cpu_kernel_float32_overflow_with_a_large_bound_matches_torch(monkeypatch):
    """A float32 ratio that overflows is infinitely far for the float32 torch solve, so its
    row is projected (to the old std, flagged, zero std gradient) whatever the bound -- the
    C kernel's float64 would call it inside a bound of 200; it must not, forward or backward."""
    case = [x.to(torch.float32) for x in whitened_case("diag", 3, 2, 3.0, seed=8)]
    case[1] = case[1].clone()
    case[1][1] = torch.tensor([1e-25, 1.0]) * case[3][1]
    got, got_grads = _diag_kernel_forward_backward(case, 200.0, torch.float32)
    monkeypatch.setattr(kl_ops, "CPU_KERNEL_DEVICE_TYPES", ())
    want, want_grads = _diag_kernel_forward_backward(case, 200.0, torch.float32)
    assert got[3].tolist() == want[3].tolist() == [True, False, True]
    assert got[2][1] == 0 and torch.equal(got[1][1], case[3][1])
    for a, b in zip(got[:3] + list(got_grads), want[:3] + list(want_grads)):
        assert_close(a, b, 1e-6, "output or gradient")


def test_cpu_kernels_under_another_default_device():
    """The C kernels allocate on the CPU whatever torch's default device (a 'meta' default
    once crashed the process)."""
    case = list(whitened_case("diag", 5, 3, 10.0, seed=9))
    full = list(whitened_case("full", 5, 3, 10.0, seed=9))
    want = [project("diag", case, 0.01), project("full", full, 0.01)]
    torch.set_default_device("meta")
    try:
        got = [project("diag", case, 0.01), project("full", full, 0.01)]
    finally:
        torch.set_default_device("cpu")
    for g, w in zip(got, want):
        for a, b in zip(g[:4], w[:4]):
            assert a.device.type == "cpu" and torch.equal(a, b)


@pytest.mark.parametrize("form", ["diag", "full"])
def test_cpu_kernels_under_vmapped_gradients(form):
    """Gradients vmapped over (``torch.func.jacrev`` in ``torch_func_mode``, diagonal op;
    ``autograd.grad(is_grads_batched=True)`` through the eager fast path, which the
    operators cannot do: no batching rule) reach the backward as batched tensors, which the
    C kernels cannot read: the torch backward runs (same formulas), and the Jacobian is the
    one computed row by row."""
    case = list(whitened_case(form, 3, 3, 10.0, seed=10))
    case[0] = case[2] + 0.5

    def f(mean):
        out = trpl_fast.functional.project(form, mean, *case[1:], kind="kl", mean_bound=0.05, cov_bound=0.01)
        return out[0]

    want = torch.autograd.functional.jacobian(f, case[0])
    if form == "diag":  # the opaque full op is not differentiable by torch.func at all
        with trpl_fast.ops.torch_func_mode():
            got = torch.func.jacrev(f)(case[0])
        assert_close(got, want, 1e-12, "jacrev")
    m = case[0].clone().requires_grad_(True)
    out = f(m)
    eye = torch.eye(out.numel(), dtype=F64).reshape(-1, *out.shape)
    (batched,) = torch.autograd.grad(out, m, eye, is_grads_batched=True)
    assert_close(batched.reshape(want.shape), want, 1e-12, "is_grads_batched")


def test_diag_cpu_kernel_takes_parameters(monkeypatch):
    """``nn.Parameter`` inputs are read by the C kernel like tensors (fast path and operator
    alike)."""
    case = list(whitened_case("diag", 6, 4, 10.0, seed=11))
    case[0] = case[2] + 0.5
    calls = []
    launch = kl_ops.launch_kl_diag_cpu_fwd
    monkeypatch.setattr(kl_ops, "launch_kl_diag_cpu_fwd", lambda *a: calls.append(1) or launch(*a))
    mean, std = torch.nn.Parameter(case[0].clone()), torch.nn.Parameter(case[1].clone())
    out = trpl_fast.project_diag(mean, std, *case[2:], kind="kl", mean_bound=0.05, cov_bound=0.01)
    assert calls
    want = trpl_fast.project_diag(*case, kind="kl", mean_bound=0.05, cov_bound=0.01)
    assert all(torch.equal(a, b) for a, b in zip(out, want))
