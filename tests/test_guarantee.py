"""The projection guarantee at extreme but valid inputs (issue 13, items 1-3).

For every kind (frob, w2, kl) and form (diag, full), in float32 and float64, and for std
ratios ``std / old_std`` from 2^-60 to 2^60: each returned row satisfies its mean bound and
its covariance bound up to the dtype's rounding (float64 distances of the returned, rounded
parameters), or is flagged not converged (KL), or the call raises a ``ValueError``. Never a
silent pass-through: a row that was outside the region and is not flagged must also land
on its bound (the projection, not merely a point inside the region such as the old policy).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import trpl_fast
from trpl_fast import distances as D

from .helpers import F64, random_rotation

KINDS = ("frob", "w2", "kl")
FORMS = ("diag", "full")
DTYPES = {"float32": torch.float32, "float64": F64}
EXPONENTS = list(range(-60, 61, 4))  # std ratios 2^k
OLD_SCALES = (1.0, 1e-3, 30.0)
MEAN_BOUND, COV_BOUND = 0.05, 0.015
D_DIM = 3


def _lower_factor(x):
    """The lower Cholesky factor of ``x x^T`` by a QR of ``x^T`` (no Cholesky: ``x x^T``
    may be far too ill-conditioned to factor)."""
    _, r = torch.linalg.qr(x.mT)
    return r.mT * torch.sign(r.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)


def sweep_case(kind, form, exponents=EXPONENTS, old_scales=OLD_SCALES, seed=0):
    """float64 (mean, cov, old_mean, old_cov) rows: for each ratio ``q = 2^k`` and old scale,
    one row with every std scaled by ``q`` and one with the std ratios ``(q, 1.3, 1/q)``."""
    gen = torch.Generator().manual_seed(seed)
    ratios = []
    for k in exponents:
        q = 2.0**k
        ratios += [[q, q, q], [q, 1.3, 1.0 / q]]
    ratios = torch.tensor(ratios, dtype=F64)
    n0 = ratios.shape[0]
    scales = torch.tensor(old_scales, dtype=F64).repeat_interleave(n0)
    ratios = ratios.repeat(len(old_scales), 1)
    n, d = ratios.shape
    z = 0.3 * torch.randn(n, d, generator=gen, dtype=F64)
    old_mean = torch.randn(n, d, generator=gen, dtype=F64)
    if form == "diag":
        old_std = scales[:, None] * torch.exp(0.3 * torch.randn(n, d, generator=gen, dtype=F64))
        return old_mean + old_std * z, old_std * ratios, old_mean, old_std
    u = random_rotation((n,), d, gen)
    s_o = scales[:, None] * torch.exp(0.3 * torch.randn(n, d, generator=gen, dtype=F64))
    if kind == "w2":
        # commuting symmetric roots Q_o = U diag(s_o) U^T, Q = U diag(s_o q) U^T; a root is
        # only representable with a condition number well below 1 / unit roundoff, so the
        # mixed rows keep all ratios within a factor 1.3 of q
        ratios = ratios[:, :1] * torch.tensor([1.0, 1.0, 1.3], dtype=F64)
        q_o = (u * s_o.unsqueeze(-2)) @ u.mT
        q = (u * (s_o * ratios).unsqueeze(-2)) @ u.mT
        q_o, q = 0.5 * (q_o + q_o.mT), 0.5 * (q + q.mT)
        return old_mean + (q_o @ z.unsqueeze(-1)).squeeze(-1), q, old_mean, q_o
    old_chol = _lower_factor(u * s_o.unsqueeze(-2))
    # C = C_o T with T lower triangular, diag(T) = the ratios: a valid factor at any spread
    mix = torch.eye(d, dtype=F64) + 0.3 * torch.randn(n, d, d, generator=gen, dtype=F64).tril(-1)
    chol = old_chol @ (ratios.unsqueeze(-1) * mix)
    return old_mean + (old_chol @ z.unsqueeze(-1)).squeeze(-1), chol, old_mean, old_chol


def _sqnorm(x, dims):
    return (x * x).sum(dims)


def mean_slack(kind, form, mean_t, old_mean, old_cov, unit):
    """Absolute slack of the mean part for ``mean_t`` rounded to ``unit``: a change of a few
    ``unit |mean_t|`` measured in the old policy's metric."""
    size = mean_t.to(F64).abs() + old_mean.to(F64).abs()
    root = math.sqrt(MEAN_BOUND * (0.5 if kind == "kl" else 1.0))
    delta = 8 * unit * D.maha(kind, form, size, torch.zeros_like(size), old_cov.to(F64)).sqrt()
    if kind == "kl":
        delta = delta / math.sqrt(2.0)
    return 2 * root * delta + delta * delta


def slack(kind, form, cov_t, old_cov, unit):
    """Absolute slack of the covariance part for ``cov_t`` rounded to unit roundoff ``unit``:
    the change of the distance under a relative perturbation of a few ``unit`` of every
    returned parameter (the distance in float64 of a rounded point cannot do better)."""
    c, co = cov_t.to(F64), old_cov.to(F64)
    root_eps = math.sqrt(COV_BOUND)
    if kind == "kl":
        # KLc = 0.5 sum(1/g - 1 + log g) in the whitened basis: a relative change delta of
        # the returned parameters moves it by about sum |1/g - 1| delta, at most d (2 + 2 KLc)
        return torch.full(c.shape[:1], 8 * unit * D_DIM * (2.0 + 2.0 * COV_BOUND), dtype=F64)
    if kind == "frob":
        s = c * c if form == "diag" else c @ c.mT
        size = _sqnorm(s, -1 if form == "diag" else (-2, -1)).sqrt()
    elif form == "diag":
        size = _sqnorm(c / co, -1).sqrt()
    else:
        size = _sqnorm(torch.linalg.solve(co, c), (-2, -1)).sqrt()
    delta = 8 * unit * D_DIM * size
    return 2 * root_eps * delta + delta * delta


def check_rows(kind, form, case, dtype):
    """Project ``case`` in ``dtype``; returns (rows tried, rows flagged, list of defects).
    A ``ValueError`` is a clear refusal and counts as no defect."""
    inputs = [t.to(dtype) for t in case]
    try:
        out = trpl_fast.functional.project(
            form, *inputs, kind=kind, mean_bound=MEAN_BOUND, cov_bound=COV_BOUND, return_aux=True
        )
    except ValueError as err:
        return len(case[0]), 0, [], str(err)
    mean_t, cov_t = out[0], out[1]
    flagged = ~out[3] if kind == "kl" else torch.zeros(mean_t.shape[0], dtype=torch.bool)
    unit = torch.finfo(dtype).eps / 2
    in64 = [t.to(F64) for t in inputs]
    m_part = D.mean_part(kind, form, mean_t.to(F64), in64[2], in64[3])
    c_part = D.cov_part(kind, form, cov_t.to(F64), in64[3])
    c_in = D.cov_part(kind, form, in64[1], in64[3])
    s = slack(kind, form, cov_t, inputs[3], unit)
    ms = mean_slack(kind, form, mean_t, inputs[2], inputs[3], unit)
    tol = 1e-4 if dtype == torch.float32 else 1e-9  # the Newton's tolerance, with a margin
    defects = []
    for i in range(mean_t.shape[0]):
        if flagged[i]:
            continue
        what = f"row {i} (input cov part {c_in[i].item():.3e})"
        if not torch.isfinite(mean_t[i]).all() or not torch.isfinite(cov_t[i]).all():
            defects.append(f"{what}: non-finite output")
            continue
        if not m_part[i] <= MEAN_BOUND * (1 + tol) + ms[i]:
            defects.append(f"{what}: mean part {m_part[i].item():.6e} > {MEAN_BOUND}")
        if not c_part[i] <= COV_BOUND * (1 + tol) + s[i]:
            defects.append(f"{what}: cov part {c_part[i].item():.6e} > {COV_BOUND}")
        elif c_in[i] > COV_BOUND * (1 + tol) and not c_part[i] >= COV_BOUND * (1 - tol) - s[i]:
            defects.append(
                f"{what}: projected row inside the region, not on its bound (cov part {c_part[i].item():.6e})"
            )
    return mean_t.shape[0], int(flagged.sum()), defects, None


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_std_ratios_keep_the_bound(kind, form, dtype):
    case = sweep_case(kind, form)
    n, n_flagged, defects, error = check_rows(kind, form, case, dtype)
    assert not defects, f"{len(defects)} of {n} rows break the guarantee:\n" + "\n".join(defects[:10])
    # every row of the sweep is within reach of the dtype: it must be projected, not flagged
    assert error is None, error
    assert n_flagged == 0, f"{n_flagged} of {n} rows flagged not converged"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_std_ratios_have_finite_gradients(kind, form, dtype):
    case = [t.to(dtype) for t in sweep_case(kind, form, exponents=range(-60, 61, 12), old_scales=(1.0,))]
    mean, cov = case[0].clone().requires_grad_(True), case[1].clone().requires_grad_(True)
    mean_t, cov_t = trpl_fast.functional.project(
        form, mean, cov, case[2], case[3], kind=kind, mean_bound=MEAN_BOUND, cov_bound=COV_BOUND
    )
    g_mean, g_cov = torch.autograd.grad(mean_t.sum() + cov_t.sum(), [mean, cov])
    assert torch.isfinite(g_mean).all() and torch.isfinite(g_cov).all()


def test_issue_example_kl_std_1e4():
    """The issue's example: float32, std 1e4 against old std 1 (3 dims)."""
    ones = torch.ones(1, 3)
    layer = trpl_fast.TrustRegionProjection("kl", 0.015, 1e-3)
    mean_t, std_t = layer(0 * ones, 1e4 * ones, 0 * ones, ones)
    m = layer.metrics(mean_t, std_t, 0 * ones, ones, 0 * ones, 1e4 * ones)
    assert m["kl_max"] <= 1e-3 * (1 + 1e-4) and m["nonconverged_states"] == 0
    assert m["constraint_cov_max"] >= 1e-3 * (1 - 1e-4)


# -- the Triton kernels on a small subset (interpreter on CPU, or the GPU) -----------------
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_diag_kernels_keep_the_bound(kind, dtype, monkeypatch):
    """The CUDA path (the Triton diagonal kernels) under the same check as the torch path."""
    from trpl_fast.ops import OPS

    case = sweep_case(kind, "diag", exponents=(-60, -36, -12, 0, 12, 36, 60), old_scales=(1.0, 1e-3))
    op = OPS[(kind, "diag")]
    rows = [t.to(dtype).to(DEVICE).contiguous() for t in case]
    outs = op.launch(*rows, None, None, MEAN_BOUND, COV_BOUND)
    torch_outs = op.impl(
        *[t.to(dtype) for t in case], None, None, MEAN_BOUND, COV_BOUND, **({"early_exit": True} if op.aux else {})
    )
    mean_t, std_t = outs[0].cpu(), outs[1].cpu()
    if kind == "kl":
        assert torch.equal(outs[3].cpu(), torch_outs[3]), "kernel and torch flag different rows"
        assert outs[3].all()
    unit = torch.finfo(dtype).eps / 2
    c_part = D.cov_part(kind, "diag", std_t.to(F64), case[3].to(dtype).to(F64))
    m_part = D.mean_part(kind, "diag", mean_t.to(F64), case[2].to(dtype).to(F64), case[3].to(dtype).to(F64))
    s = slack(kind, "diag", std_t, case[3].to(dtype), unit)
    ms = mean_slack(kind, "diag", mean_t, case[2].to(dtype), case[3].to(dtype), unit)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert torch.isfinite(std_t).all()
    assert (c_part <= COV_BOUND * (1 + tol) + s).all(), c_part.max()
    assert (m_part <= MEAN_BOUND * (1 + tol) + ms).all(), m_part.max()
    outside = D.cov_part(kind, "diag", case[1].to(dtype).to(F64), case[3].to(dtype).to(F64)) > COV_BOUND
    on_bound = c_part >= COV_BOUND * (1 - tol) - s
    assert (on_bound | ~outside).all(), f"{int((outside & ~on_bound).sum())} projected rows not on the bound"
    # the kernel and the torch path agree (the same formulas), gradients included
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(std_t, torch_outs[1], rtol=rtol, atol=0)
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(rows[0].shape, generator=gen, dtype=F64).to(dtype) for _ in range(2)]
    aux = list(outs[2:])  # the KL backward takes the solved t and the flags
    g_kernel = op.launch_backward(*[g.to(DEVICE) for g in grads], *rows, *aux, None, None, MEAN_BOUND, COV_BOUND)
    g_torch = op.impl_backward(
        *grads, *[t.to(dtype) for t in case], *[a.cpu() for a in outs[2:]], None, None, MEAN_BOUND, COV_BOUND
    )
    for a, b in zip(g_kernel, g_torch):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.cpu(), b, rtol=rtol, atol=rtol * b.abs().max().item())


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_kl_newton_kernel_extreme_ratios(dtype):
    """The full-covariance Newton kernel on whitened ratios that round to -1 or overflow
    their squares: it solves them as the torch path does."""
    from trpl_fast.kernels.kl import launch_kl_newton

    from trpl_fast.ops import kl as kl_ops

    big = 2.0**120 if dtype == F64 else 2.0**100
    r = torch.tensor([[-1.0, -1.0, -1.0], [big, 0.0, -1.0], [big, big, 0.5], [1e-3, 0.0, -1.0]], dtype=dtype)
    eps = torch.full((4,), COV_BOUND, dtype=dtype)
    t_k, conv_k = launch_kl_newton(r.to(DEVICE), eps.to(DEVICE), 0.0)
    t_t, conv_t, active = kl_ops.kl_dual_newton(r, COV_BOUND)
    assert conv_k.all() and conv_t.all() and active.all()
    torch.testing.assert_close(t_k.cpu(), t_t, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0)


@pytest.mark.parametrize("ratio", [1e20, 1e30], ids=lambda r: f"ratio={r:g}")
def test_w2_diag_float32_beyond_the_sweep(ratio):
    """W2 diagonal in float32 at std ratios whose squared distance overflows (w > 3.4e38):
    the scaled norm still projects onto the bound (before: a = 0, the old std, silently)."""
    old_std = torch.ones(2, D_DIM)
    std = old_std * torch.tensor([ratio, 1.0, 1.0])
    mean = torch.zeros(2, D_DIM)
    _, std_t = trpl_fast.project_diag(mean, std, mean, old_std, kind="w2", mean_bound=MEAN_BOUND, cov_bound=COV_BOUND)
    w = D.cov_part("w2", "diag", std_t.double(), old_std.double())
    torch.testing.assert_close(w, torch.full_like(w, COV_BOUND), rtol=1e-5, atol=0)
