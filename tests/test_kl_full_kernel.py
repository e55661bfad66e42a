"""The fused full-covariance KL kernel (kernels/kl_full.py) against trpl_fast.reference:
values, every gradient with non-unit upstream gradients, float64 gradcheck, hard cases
(eigenvalue spreads 1e4-1e8), rows inside the region, the bound. Without CUDA the kernel
runs under TRITON_INTERPRET on CPU tensors: called through its launchers, and through the
op itself with "cpu" added to ``kl_ops.FUSED_DEVICE_TYPES``. Interpreter cases are kept
small (few rows, d <= 8)."""

from __future__ import annotations

import os

import pytest
import torch
from trpl_fast.kernels import kl_full as kl_full_kernels

import trpl_fast
from trpl_fast import reference as R
from trpl_fast.ops import kl as kl_ops

from .helpers import F64
from .test_kl import check_against_reference, whitened_case

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")

MEAN_BOUND, COV_BOUND = 0.05, 0.01
# normwise relative tolerances against the float64 reference
TOL = {F64: 1e-10, torch.float32: 1e-5}
GRAD_TOL = {F64: 1e-8, torch.float32: 1e-4}


def rel_diff(actual, expected):
    """``(max |a - e| / max |e|, index of the worst element, a there, e there)``: where and
    by how much two tensors differ (float64, on CPU)."""
    a, e = actual.detach().to(F64).cpu(), expected.detach().to(F64).cpu()
    err = (a - e).abs()
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    return err.max().item() / max(e.abs().max().item(), 1e-300), idx, a[idx].item(), e[idx].item()


def report(name, actual, expected, tol):
    """Assert ``rel_diff <= tol`` with a message saying where and by how much."""
    rel, idx, a, e = rel_diff(actual, expected)
    assert rel <= tol, f"{name}: normwise rel. error {rel:.3e} > {tol:.1e}, worst at {idx}: got {a!r}, expected {e!r}"
    return rel


@pytest.fixture
def fused_path(monkeypatch):
    """The full KL op on DEVICE tensors runs the fused kernel: on CUDA it does anyway;
    under the interpreter "cpu" joins the fused device types."""
    if INTERPRET:
        monkeypatch.setattr(kl_ops, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def case_with_inside_rows(n, d, spread, seed, scenario="random"):
    """``whitened_case`` with a moved mean and every third row a tiny perturbation of the old
    policy (inside the region, mean and covariance)."""
    mean, chol, old_mean, old_chol = whitened_case("full", n, d, spread, seed=seed, scenario=scenario)
    gen = torch.Generator().manual_seed(seed + 100)
    mean = old_mean + 0.5 * torch.randn(n, d, generator=gen, dtype=F64)
    inside = torch.arange(n) % 3 == 2
    mean[inside] = old_mean[inside] + 1e-4 * torch.randn(int(inside.sum()), d, generator=gen, dtype=F64)
    chol[inside] = old_chol[inside] * (1 + 1e-5)
    return mean, chol, old_mean, old_chol


def reference_grads(case, g_mean, g_chol, mean_bound, cov_bound):
    """Projection by reference.project_full and the gradients of ``<g, outputs>``."""
    mean = case[0].clone().requires_grad_(True)
    chol = case[1].clone().requires_grad_(True)
    r_mean, r_chol = R.project_full(mean, chol, case[2], case[3], kind="kl", mean_bound=mean_bound, cov_bound=cov_bound)
    grads = torch.autograd.grad((r_mean * g_mean).sum() + (r_chol * g_chol).sum(), (mean, chol))
    return r_mean.detach(), r_chol.detach(), grads


@pytest.mark.parametrize("bounds", ["scalar", "per_state"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("d", [1, 3, 6], ids=lambda d: f"d={d}")
def test_launchers_match_reference(d, dtype, bounds):
    """Forward and backward launchers: every output and both gradients (random upstream
    gradients) against autograd through the reference; the bound; inactive rows."""
    from trpl_fast.kernels.kl_full import launch_kl_full_bwd, launch_kl_full_fwd

    n = 6
    case = [x.to(dtype).to(F64) for x in case_with_inside_rows(n, d, 30.0, seed=d)]
    gen = torch.Generator().manual_seed(d)
    if bounds == "per_state":
        mb = MEAN_BOUND * (0.5 + torch.rand(n, generator=gen, dtype=F64))
        cb = COV_BOUND * (0.5 + torch.rand(n, generator=gen, dtype=F64))
        args, kw = (mb.to(dtype).to(DEVICE), cb.to(dtype).to(DEVICE), 0.0, 0.0), dict(mean_bound=mb, cov_bound=cb)
        eps = cb
    else:
        args, kw = (None, None, MEAN_BOUND, COV_BOUND), dict(mean_bound=MEAN_BOUND, cov_bound=COV_BOUND)
        eps = torch.full((n,), COV_BOUND, dtype=F64)
    dev = [x.to(dtype).to(DEVICE) for x in case]
    out = launch_kl_full_fwd(*dev, *args)
    mean_t, chol_t, t, conv, m, u = (o.cpu() for o in out)
    assert mean_t.dtype == dtype and chol_t.dtype == dtype and t.dtype == F64 and conv.dtype == torch.bool
    assert m.shape == (n, d) and u.shape == (n, d, d)
    assert conv.all()

    g_mean = torch.randn(n, d, generator=gen, dtype=F64).to(dtype).to(F64)
    g_chol = torch.randn(n, d, d, generator=gen, dtype=F64).to(dtype).to(F64)
    r_mean, r_chol, (rg_mean, rg_chol) = reference_grads(case, g_mean, g_chol, **kw)
    report("mean_t", mean_t, r_mean, TOL[dtype])
    report("chol_t", chol_t, r_chol, TOL[dtype])
    s_t = chol_t.to(F64) @ chol_t.to(F64).mT
    report("S_t", s_t, r_chol @ r_chol.mT, TOL[dtype])
    # eigenvalues of the whitened precision against eigvalsh of the formed matrix
    a = torch.linalg.solve_triangular(case[1].tril(), case[3].tril(), upper=False)
    report("eigvals", m, torch.linalg.eigvalsh(a.mT @ a), 1e-12)

    old_s = case[3] @ case[3].mT
    active = R.kl_cov(case[1] @ case[1].mT, old_s) > eps
    assert (~active).any() and active.any()
    kl_after = R.kl_cov(s_t, old_s)
    rel_kl = ((kl_after - eps).abs() / eps)[active]
    assert rel_kl.max() < (1e-8 if dtype == F64 else 1e-4), f"|KL - eps| / eps = {rel_kl.max():.3e}"
    assert torch.equal(chol_t[~active], case[1].to(dtype)[~active].tril())
    assert (t[~active] == 1).all()

    gm, gc = (
        g.cpu()
        for g in launch_kl_full_bwd(
            g_mean.to(dtype).to(DEVICE), g_chol.to(dtype).to(DEVICE), *dev, out[2], out[4], out[5], *args
        )
    )
    assert gm.dtype == dtype and gc.dtype == dtype
    report("grad mean", gm, rg_mean, GRAD_TOL[dtype])
    report("grad factor", gc, rg_chol, GRAD_TOL[dtype])
    assert torch.equal(gc[~active].cpu(), g_chol.to(dtype)[~active].tril())
    assert torch.equal(gc, gc.tril())


def test_op_uses_fused_kernel_and_matches_torch_path(fused_path, monkeypatch):
    """Through the functional API (forward, autograd backward, batch dims), by the eager
    fast path and by the operator: the fused kernel both ways, bit for bit the same, against
    the torch path; and the saved U is the upper factor of (1 - t) I + t M."""
    n, d = 4, 5
    case = case_with_inside_rows(n, d, 100.0, seed=3)
    case = on_device(*[x.reshape(2, 2, *x.shape[1:]) for x in case])
    gen = torch.Generator().manual_seed(0)
    g_mean, g_chol = on_device(
        torch.randn(2, 2, d, generator=gen, dtype=F64), torch.randn(2, 2, d, d, generator=gen, dtype=F64)
    )

    def run():
        mean = case[0].clone().requires_grad_(True)
        chol = case[1].clone().requires_grad_(True)
        out = trpl_fast.functional.project(
            "full", mean, chol, case[2], case[3], kind="kl", mean_bound=MEAN_BOUND, cov_bound=COV_BOUND, return_aux=True
        )
        grads = torch.autograd.grad((out[0] * g_mean).sum() + (out[1] * g_chol).sum(), (mean, chol))
        return [o.detach() for o in out], grads

    calls = []
    launch = kl_full_kernels._launch
    monkeypatch.setattr(kl_full_kernels, "_launch", lambda k, *a, **kw: calls.append(k) or launch(k, *a, **kw))
    fused, fused_grads = run()  # the ops' eager fast path, launching the fused kernel itself
    assert len(calls) == 2, "the fused kernel did not run forward and backward"
    trpl_fast.ops.set_eager_fast_path(False)
    try:
        fused_op, fused_op_grads = run()  # through the operator, its body launching the kernel
    finally:
        trpl_fast.ops.set_eager_fast_path(True)
    assert len(calls) == 4, "the operator did not run the fused kernel"
    for a, b in zip(fused + list(fused_grads), fused_op + list(fused_op_grads)):
        assert torch.equal(a, b), "fast path and operator differ"
    monkeypatch.setattr(kl_ops, "FUSED_DEVICE_TYPES", ())
    torch_path, torch_grads = run()
    assert len(calls) == 4
    for name, i in (("mean_t", 0), ("chol_t", 1), ("t", 2), ("eigvals", 4)):
        report(name, fused[i], torch_path[i], 1e-11)
    assert torch.equal(fused[3], torch_path[3])
    report("grad mean", fused_grads[0], torch_grads[0], 1e-10)
    report("grad factor", fused_grads[1], torch_grads[1], 1e-10)

    t, u = fused[2], fused[5]
    a = torch.linalg.solve_triangular(case[1].tril(), case[3].tril(), upper=False)
    eye = torch.eye(d, dtype=F64, device=DEVICE)
    g = (1 - t)[..., None, None] * eye + t[..., None, None] * (a.mT @ a)
    report("U U^T", u @ u.mT, g, 1e-13)
    assert torch.equal(u, u.triu())


def test_gradcheck_float64(fused_path):
    """gradcheck through the op on the fused path: one state, d = 3 (one Householder
    step), mean and covariance both projected (the other combinations are checked against
    reference gradients above; the interpreter makes each evaluation slow)."""
    mean, chol, old_mean, old_chol = whitened_case("full", 1, 3, 5.0, seed=4)
    gen = torch.Generator().manual_seed(5)
    mean = old_mean + torch.randn(1, 3, generator=gen, dtype=F64)
    mean, chol, old_mean, old_chol = on_device(mean, chol, old_mean, old_chol)
    aux = trpl_fast.functional.project(
        "full", mean, chol, old_mean, old_chol, kind="kl", mean_bound=MEAN_BOUND, cov_bound=COV_BOUND, return_aux=True
    )
    assert (aux[2] < 1).all() and not torch.equal(aux[0], mean)  # both parts projected

    def fn(m, c):
        return trpl_fast.project_full(
            m, c, old_mean, old_chol, kind="kl", mean_bound=MEAN_BOUND, cov_bound=COV_BOUND, check_values=False
        )

    inputs = (mean.clone().requires_grad_(True), chol.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-7, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("eps", [1e-6, 1e-3, 10.0], ids=lambda e: f"eps={e:g}")
@pytest.mark.parametrize("scenario,spread", [("random", 1e4), ("one_far", 1e4), ("random", 1e8), ("one_far", 1e8)])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
def test_hard_cases(fused_path, dtype, scenario, spread, eps):
    """test_kl's hard cases through the fused path at d = 4: projected covariance against
    the bisection reference, |KL - eps| / eps, every row converged, inactive rows exact."""
    case = on_device(*whitened_case("full", 4, 4, spread, seed=9, scenario=scenario))
    if dtype == F64:
        rtol = 1e-9 if spread <= 1e4 else 1e-6
        check_against_reference("full", case, eps, F64, rtol=rtol, kl_tol=1e-6)
    else:
        check_against_reference("full", case, eps, torch.float32, rtol=1e-4, kl_tol=1e-3)


def test_inside_rows_are_identity(fused_path):
    """A target equal to the old policy: outputs and gradients pass through unchanged."""
    case = on_device(*whitened_case("full", 3, 4, 1.0, seed=0, scenario="equal"))
    mean = case[0].clone().requires_grad_(True)
    chol = case[1].clone().requires_grad_(True)
    mean_t, chol_t, t, conv = trpl_fast.functional.project(
        "full", mean, chol, case[2], case[3], kind="kl", mean_bound=0.1, cov_bound=1e-6, return_aux=True
    )[:4]
    assert torch.equal(chol_t, chol) and torch.equal(mean_t, mean)
    assert conv.all() and (t == 1).all()
    g = torch.randn_like(chol)
    (g_chol,) = torch.autograd.grad((chol_t * g).sum(), chol)
    assert torch.equal(g_chol, g.tril())


def test_large_d_keeps_torch_path(fused_path):
    from trpl_fast.kernels.kl_full import MAX_D

    assert kl_ops.uses_fused_kernel(torch.zeros(2, MAX_D, dtype=F64, device=DEVICE))
    assert not kl_ops.uses_fused_kernel(torch.zeros(2, MAX_D + 1, dtype=F64, device=DEVICE))
