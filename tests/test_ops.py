"""The torch.ops.trpl operators (through the public API) against trpl_fast.reference:
outputs and every gradient, constraint satisfaction, identity on inactive rows,
gradcheck, opcheck, dtypes, batch shapes, non-contiguous inputs, per-state bounds."""

from __future__ import annotations

import pytest
import torch

import trpl_fast
from trpl_fast import reference as R
from trpl_fast.ops import OPS

from .helpers import F64, assert_close, make_case

KINDS = ["frob", "w2", "kl"]
FORMS = ["diag", "full"]
MEAN_BOUND, COV_BOUND = 0.1, 0.05
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}

API = {"diag": trpl_fast.project_diag, "full": trpl_fast.project_full}
REF = {"diag": R.project_diag, "full": R.project_full}


def ids(name):
    return lambda v: f"{name}={v}"


def dense_cov(kind, form, param):
    """Dense covariance of an API parametrization, float64."""
    p = param.to(F64)
    if form == "diag":
        return torch.diag_embed(p * p)
    return p @ p if kind == "w2" else p.tril() @ p.tril().mT


def cov_constraint(kind, form, param, old_param):
    """The projection's covariance distance, from the reference, float64."""
    if kind == "w2":
        q, qo = (torch.diag_embed(p.to(F64)) if form == "diag" else p.to(F64) for p in (param, old_param))
        return R.w2_distance(q, qo)
    return R.cov_distance(kind, dense_cov(kind, form, param), dense_cov(kind, form, old_param))


def run_and_grads(fn, case, upstream, **kw):
    mean, cov, old_mean, old_cov = (t.clone() for t in case)
    mean.requires_grad_(True)
    cov.requires_grad_(True)
    mean_t, cov_t = fn(mean, cov, old_mean, old_cov, **kw)
    g_mean, g_cov = torch.autograd.grad(
        (mean_t * upstream[0].to(mean_t.dtype)).sum() + (cov_t * upstream[1].to(cov_t.dtype)).sum(), [mean, cov]
    )
    return mean_t, cov_t, g_mean, g_cov


def upstream_for(case, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen, dtype=F64) for t in case[:2]]


@pytest.mark.parametrize("conditioning", ["well", "ill"])
@pytest.mark.parametrize("batch", [(1,), (41,), (3, 5), (1000,)], ids=ids("batch"))
@pytest.mark.parametrize("d", [1, 2, 6, 17, 32], ids=ids("d"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=ids("dtype"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, form, dtype, d, batch, conditioning):
    if batch == (1000,) and d > 6 and (form == "full" or kind == "kl"):
        pytest.skip("large dense reference covered by smaller batches")
    case = make_case(kind, form, batch, d, conditioning=conditioning, dtype=dtype)
    up = upstream_for(case)
    kw = dict(kind=kind, mean_bound=MEAN_BOUND, cov_bound=COV_BOUND)
    mean_t, cov_t, g_mean, g_cov = run_and_grads(API[form], case, up, **kw)
    ref_case = tuple(t.to(F64) for t in case)  # the reference sees the same (rounded) inputs
    r_mean, r_cov, r_g_mean, r_g_cov = run_and_grads(REF[form], ref_case, up, **kw)
    assert mean_t.dtype == dtype and cov_t.dtype == dtype
    assert_close(mean_t, r_mean, TOL[dtype], "mean_t")
    assert_close(cov_t, r_cov, TOL[dtype], "cov_t")
    if kind == "w2" and form == "full":
        # Q is symmetric: only the symmetric part of its gradient is defined by the math.
        g_cov, r_g_cov = 0.5 * (g_cov + g_cov.mT), 0.5 * (r_g_cov + r_g_cov.mT)
    # A gradient can vanish (e.g. d = 1 on the bound): rounding noise is measured
    # against the size of the upstream gradient then.
    floor = GRAD_TOL[dtype] * max(u.abs().max().item() for u in up)
    assert_close(g_mean, r_g_mean, GRAD_TOL[dtype], "grad mean", atol=floor)
    assert_close(g_cov, r_g_cov, GRAD_TOL[dtype], "grad cov", atol=floor)


@pytest.mark.parametrize("conditioning", ["well", "ill"])
@pytest.mark.parametrize("d", [1, 6, 17], ids=ids("d"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=ids("dtype"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_constraints_hold_and_inactive_rows_are_identity(kind, form, dtype, d, conditioning):
    case = make_case(kind, form, (257,), d, conditioning=conditioning, dtype=dtype, seed=3)
    mean, cov, old_mean, old_cov = case
    kw = dict(kind=kind, mean_bound=MEAN_BOUND, cov_bound=COV_BOUND)
    up = upstream_for(case, seed=5)
    mean_t, cov_t, g_mean, g_cov = run_and_grads(API[form], case, up, **kw)
    tol = 1e-9 if dtype == torch.float64 else 2e-3

    old_dense = dense_cov(kind, form, old_cov)
    m_before = R.mean_distance(kind, mean, old_mean, old_dense)
    m_after = R.mean_distance(kind, mean_t, old_mean, old_dense)
    c_before = cov_constraint(kind, form, cov, old_cov)
    c_after = cov_constraint(kind, form, cov_t, old_cov)
    mean_active, cov_active = m_before > MEAN_BOUND, c_before > COV_BOUND
    assert mean_active.any() and (~mean_active).any(), "case must mix active and inactive rows"
    assert cov_active.any() and (~cov_active).any(), "case must mix active and inactive rows"
    # every row satisfies its bound; projected rows lie on it
    assert (m_after <= MEAN_BOUND * (1 + tol)).all(), m_after.max()
    assert (c_after <= COV_BOUND * (1 + tol)).all(), c_after.max()
    assert_close(m_after[mean_active], torch.full_like(m_after[mean_active], MEAN_BOUND), tol, "maha on bound")
    assert_close(c_after[cov_active], torch.full_like(c_after[cov_active], COV_BOUND), tol, "cov distance on bound")
    # inactive rows: unchanged, identity gradient (the upstream gradient passes through)
    assert torch.equal(mean_t[~mean_active], mean[~mean_active])
    assert torch.equal(cov_t.detach()[~cov_active], cov[~cov_active])
    assert torch.equal(g_mean[~mean_active], up[0].to(dtype)[~mean_active])
    expected_g_cov = up[1].to(dtype)
    if form == "full" and kind != "w2":
        expected_g_cov = expected_g_cov.tril()  # only the lower triangle of a Cholesky factor is read
    assert torch.equal(g_cov[~cov_active], expected_g_cov[~cov_active])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_with_per_state_bounds(kind, form):
    mean, cov, old_mean, old_cov = make_case(kind, form, (6,), 3, seed=7, inside_fraction=0.4)
    gen = torch.Generator().manual_seed(0)
    mean_bound = MEAN_BOUND * (0.5 + torch.rand(6, generator=gen, dtype=F64))
    cov_bound = COV_BOUND * (0.5 + torch.rand(6, generator=gen, dtype=F64))

    def fn(m, c):
        return API[form](
            m, c, old_mean, old_cov, kind=kind, mean_bound=mean_bound, cov_bound=cov_bound, check_values=False
        )

    inputs = (mean.clone().requires_grad_(True), cov.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-7, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bounds", ["scalar", "tensor"])
def test_opcheck(kind, form, bounds):
    mean, cov, old_mean, old_cov = make_case(kind, form, (2, 3), 4, seed=11, inside_fraction=0.3)
    spec = OPS[(kind, form)]
    mb = torch.full((2, 3), MEAN_BOUND, dtype=F64) if bounds == "tensor" else None
    cb = torch.full((3,), COV_BOUND, dtype=F64) if bounds == "tensor" else None
    args = (mean.requires_grad_(True), cov.requires_grad_(True), old_mean, old_cov, mb, cb, MEAN_BOUND, COV_BOUND)
    torch.library.opcheck(spec.forward_op, args)
    aux = list(spec.forward_op(*args)[2:])  # KL: the dual variable and convergence flags
    g = upstream_for((mean, cov))
    bargs = (g[0], g[1], mean.detach(), cov.detach(), old_mean, old_cov, aux, mb, cb, MEAN_BOUND, COV_BOUND)
    torch.library.opcheck(spec.backward_op, bargs)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_per_state_bounds_equal_rowwise_scalar_calls(kind, form):
    mean, cov, old_mean, old_cov = make_case(kind, form, (5,), 4, seed=13, inside_fraction=0.0)
    mb = torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0], dtype=F64)
    cb = torch.tensor([0.001, 0.05, 0.5, 2.0, 20.0], dtype=F64)
    m_all, c_all = API[form](mean, cov, old_mean, old_cov, kind=kind, mean_bound=mb, cov_bound=cb)
    for i in range(5):
        m_i, c_i = API[form](
            mean[i : i + 1],
            cov[i : i + 1],
            old_mean[i : i + 1],
            old_cov[i : i + 1],
            kind=kind,
            mean_bound=float(mb[i]),
            cov_bound=float(cb[i]),
        )
        assert_close(m_all[i : i + 1], m_i, 1e-14, f"row {i} mean")
        assert_close(c_all[i : i + 1], c_i, 1e-14, f"row {i} cov")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=ids("dtype"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_is_computed_in_float32(kind, form, dtype):
    case = make_case(kind, form, (41,), 7, seed=17, dtype=dtype)
    up = [u.to(dtype).to(F64) for u in upstream_for(case)]  # representable in both runs
    mean_t, cov_t, g_mean, g_cov = run_and_grads(
        API[form], case, up, kind=kind, mean_bound=MEAN_BOUND, cov_bound=COV_BOUND
    )
    f32_case = tuple(t.to(torch.float32) for t in case)
    e_mean, e_cov, e_g_mean, e_g_cov = run_and_grads(
        API[form], f32_case, up, kind=kind, mean_bound=MEAN_BOUND, cov_bound=COV_BOUND
    )
    assert mean_t.dtype == dtype and cov_t.dtype == dtype and g_cov.dtype == dtype
    # identical up to the final rounding to the half type
    assert torch.equal(mean_t, e_mean.to(dtype)) and torch.equal(cov_t, e_cov.to(dtype))
    assert torch.equal(g_mean, e_g_mean.to(dtype)) and torch.equal(g_cov, e_g_cov.to(dtype))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_and_batched_inputs(kind, form):
    mean, cov, old_mean, old_cov = make_case(kind, form, (4, 6), 5, seed=19)
    expect = API[form](mean, cov, old_mean, old_cov, kind=kind, mean_bound=MEAN_BOUND, cov_bound=COV_BOUND)
    # the same data seen through transposed (non-contiguous) views
    views = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (mean, cov, old_mean, old_cov)]
    assert not views[0].is_contiguous()
    got = API[form](*views, kind=kind, mean_bound=MEAN_BOUND, cov_bound=COV_BOUND)
    for g, e, n in zip(got, expect, ("mean_t", "cov_t")):
        assert g.shape == e.shape
        assert_close(g, e, 0.0, n)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(kind, form):
    mean, cov, old_mean, old_cov = make_case(kind, form, (0,), 3)
    mean_t, cov_t = API[form](mean, cov, old_mean, old_cov, kind=kind, mean_bound=0.1, cov_bound=0.1)
    assert mean_t.shape == mean.shape and cov_t.shape == cov.shape


@pytest.mark.parametrize("conditioning", ["well", "ill"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_theorem1_entropy_bounds(kind, form, conditioning):
    """Paper Theorem 1: Frobenius and W2 projections never lower the entropy below
    min(H(pi), H(pi_old)); KL never raises it above the max."""
    mean, cov, old_mean, old_cov = make_case(kind, form, (500,), 6, conditioning=conditioning, seed=23)
    _, cov_t = API[form](mean, cov, old_mean, old_cov, kind=kind, mean_bound=MEAN_BOUND, cov_bound=COV_BOUND)
    h = R.entropy(dense_cov(kind, form, cov))
    h_old = R.entropy(dense_cov(kind, form, old_cov))
    h_t = R.entropy(dense_cov(kind, form, cov_t))
    if kind == "kl":
        assert (h_t <= torch.maximum(h, h_old) + 1e-10).all()
    else:
        assert (h_t >= torch.minimum(h, h_old) - 1e-10).all()


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("batch", [(32,), (3, 5)], ids=ids("batch"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=ids("dtype"))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_eager_fast_path_equals_the_operator(kind, form, dtype, batch, layout):
    """Eager CPU calls take the ops' fast path (``ops/_eager.py``: the implementations the
    op's CPU kernel runs -- the KL ops' C kernels among them -- without the dispatcher):
    bit for bit the operator's outputs, aux outputs and both gradients (to rounding for
    transposed inputs, which the fast path copies to rows), contiguous; half precision and
    the compiled large-batch sizes go through the operator."""
    case = [t.to(dtype) for t in make_case(kind, form, batch, 6, seed=4, conditioning="ill")]
    if layout == "transposed":  # inputs that are not rows: copied by the fast path
        case = [t.mT.contiguous().mT if t.dim() > 2 or form == "diag" else t for t in case]
    gen = torch.Generator().manual_seed(5)
    up = [torch.randn(t.shape, generator=gen, dtype=F64).to(dtype) for t in case[:2]]

    def run(fast):
        trpl_fast.ops.set_eager_fast_path(fast)
        try:
            m, c = case[0].clone().requires_grad_(True), case[1].clone().requires_grad_(True)
            out = trpl_fast.functional.project(
                form, m, c, *case[2:], kind=kind, mean_bound=MEAN_BOUND, cov_bound=COV_BOUND, return_aux=True
            )
            grads = torch.autograd.grad((out[0] * up[0]).sum() + (out[1] * up[1]).sum(), [m, c])
        finally:
            trpl_fast.ops.set_eager_fast_path(True)
        return type(out[0].grad_fn).__name__, [o.detach() for o in out] + list(grads)

    fast_node, fast = run(True)
    op_node, op = run(False)
    assert fast_node == "EagerProjectionBackward" and op_node != fast_node
    for i, (a, b) in enumerate(zip(fast, op)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
        if layout == "contiguous" or a.dtype == torch.bool:
            assert torch.equal(a, b), f"output {i}"
        else:  # the fast path computes on a contiguous copy: sums in another order
            assert_close(a, b, 1e-13 if dtype == torch.float64 else 1e-5, f"output {i}")
    spec = OPS[(kind, form)]
    assert spec.eager_path(case[0].bfloat16(), case[1].bfloat16()) is None
    if spec.large_batch is not None:
        before = trpl_fast.ops.cpu_compile_min_elements()
        try:
            trpl_fast.ops.set_cpu_compile_min_elements(case[0].numel())
            assert spec.eager_path(case[0], case[1]) is None  # the compiled path's size
        finally:
            trpl_fast.ops.set_cpu_compile_min_elements(before)
