"""The ops' eager fast path (``trpl_fast/ops/_eager.py``): the Triton kernels launched
without the dispatcher, against the operators running the same kernels (bit for bit:
values, auxiliary outputs, every gradient) and against the float64 reference; the calls
it must leave to the operators; its per-signature plans.

Without CUDA the kernels run under TRITON_INTERPRET on CPU tensors, with "cpu" added to
the ops' kernel device types (so that the operators launch the kernels too); on a CUDA
machine on the GPU. Sizes stay small: the interpreter is slow.
"""

from __future__ import annotations

import os

import pytest
import torch

import trpl_fast
from trpl_fast import reference as R
from trpl_fast.functional import project
from trpl_fast.ops import OPS, _common
from trpl_fast.ops import _eager as eager
from trpl_fast.ops import kl as kl_ops

from .helpers import F64, assert_close, make_case

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")

MEAN_BOUND, COV_BOUND = 0.05, 0.01
FAST_NODE = "EagerProjectionBackward"


@pytest.fixture(autouse=True)
def kernels_on_device(monkeypatch):
    """Ops and fast path launch the kernels for DEVICE tensors (under the interpreter:
    "cpu" joins the kernel device types); the fast path on, with fresh plans."""
    if DEVICE == "cpu":
        monkeypatch.setattr(_common, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
        monkeypatch.setattr(kl_ops, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(eager, "_ENABLED", True)
    for op in OPS.values():
        for path in op.eager:
            path.plans.clear()


def run(form, tensors, kind, mean_bound, cov_bound, upstream, fast: bool):
    """Outputs (with the aux outputs) and the gradients of ``<outputs, upstream>`` with
    respect to mean and covariance, by the fast path or by the operators."""
    trpl_fast.ops.set_eager_fast_path(fast)
    try:
        m, c, mo, co = (t.detach().clone().requires_grad_(i < 2) for i, t in enumerate(tensors))
        out = project(
            form,
            m,
            c,
            mo,
            co,
            kind=kind,
            mean_bound=mean_bound,
            cov_bound=cov_bound,
            check_values=False,
            return_aux=True,
        )
        node = type(out[0].grad_fn).__name__
        loss = (out[0] * upstream[0]).sum() + (out[1] * upstream[1]).sum()
        gm, gc = torch.autograd.grad(loss, [m, c])
    finally:
        trpl_fast.ops.set_eager_fast_path(True)
    return out, (gm, gc), node


def check_paths_agree(form, kind, case, mean_bound, cov_bound, reference_tol):
    gen = torch.Generator().manual_seed(7)
    upstream = [torch.randn(t.shape, generator=gen, dtype=F64).to(t.dtype).to(DEVICE) for t in case[:2]]
    fast_out, fast_grads, fast_node = run(form, case, kind, mean_bound, cov_bound, upstream, fast=True)
    op_out, op_grads, op_node = run(form, case, kind, mean_bound, cov_bound, upstream, fast=False)
    assert fast_node == FAST_NODE, f"the fast path was not taken ({fast_node})"
    assert op_node != FAST_NODE
    names = ("mean_t", "cov_t") + tuple(a.name for a in OPS[(kind, form)].aux)
    for name, f, o in zip(names, fast_out, op_out):
        assert f.shape == o.shape and f.dtype == o.dtype, f"{name}: {f.shape} {f.dtype} vs {o.shape} {o.dtype}"
        assert f.is_contiguous(), f"{name} not contiguous"
        assert_close(f, o, 0.0, f"{name}, fast path vs op")
    for name, f, o in zip(("grad mean", "grad cov"), fast_grads, op_grads):
        assert_close(f, o, 0.0, f"{name}, fast path vs op")
    # and against the float64 reference
    ref_in = [t.detach().to(F64).cpu().requires_grad_(i < 2) for i, t in enumerate(case)]
    api = R.project_diag if form == "diag" else R.project_full
    cpu = lambda b: b.detach().to(F64).cpu() if isinstance(b, torch.Tensor) else b  # noqa: E731
    r_mean, r_cov = api(*ref_in, kind=kind, mean_bound=cpu(mean_bound), cov_bound=cpu(cov_bound))
    loss = (r_mean * upstream[0].to(F64).cpu()).sum() + (r_cov * upstream[1].to(F64).cpu()).sum()
    r_grads = torch.autograd.grad(loss, ref_in[:2])
    assert_close(fast_out[0], r_mean, reference_tol, "mean_t vs reference")
    assert_close(fast_out[1], r_cov, reference_tol, "cov_t vs reference")
    for name, f, r in zip(("grad mean", "grad cov"), fast_grads, r_grads):
        if kind == "w2" and form == "full" and name == "grad cov":
            f, r = 0.5 * (f + f.mT), 0.5 * (r + r.mT)
        assert_close(f, r, 100 * reference_tol, f"{name} vs reference", atol=100 * reference_tol)


DIAG_SHAPES = [((29,), 7), ((3, 5), 17), ((4,), 1)]


@pytest.mark.parametrize("bounds", ["scalar", "per_state", "broadcast"])
@pytest.mark.parametrize("batch,d", DIAG_SHAPES, ids=[f"batch={b},d={d}" for b, d in DIAG_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["frob", "w2", "kl"])
def test_diag_fast_path_matches_op_and_reference(kind, dtype, batch, d, bounds):
    case = [t.to(DEVICE) for t in make_case(kind, "diag", batch, d, seed=d, conditioning="ill", dtype=dtype)]
    gen = torch.Generator().manual_seed(3)
    if bounds == "scalar":
        mb, cb = MEAN_BOUND, COV_BOUND
    elif bounds == "per_state":
        mb = (MEAN_BOUND * (0.5 + torch.rand(batch, generator=gen, dtype=F64))).to(dtype).to(DEVICE)
        cb = (COV_BOUND * (0.5 + torch.rand(batch, generator=gen, dtype=F64))).to(dtype).to(DEVICE)
    else:  # a float64 bound of shape (..., 1): broadcast and cast by the plan
        mb = torch.full(batch[:-1] + (1,), MEAN_BOUND, dtype=F64, device=DEVICE)
        cb = torch.tensor(COV_BOUND, dtype=F64, device=DEVICE)
    check_paths_agree("diag", kind, case, mb, cb, 1e-10 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("batch,d", [((5,), 3), ((2, 3), 6)], ids=["batch=(5,),d=3", "batch=(2,3),d=6"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_kl_full_fast_path_matches_op_and_reference(dtype, batch, d):
    case = [t.to(DEVICE) for t in make_case("kl", "full", batch, d, seed=d, dtype=dtype)]
    check_paths_agree("full", "kl", case, MEAN_BOUND, COV_BOUND, 1e-9 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("kind", ["frob", "kl"])
def test_non_contiguous_and_half_inputs(kind):
    """Transposed inputs are copied to rows; bfloat16 is read by the kernels as it is and
    its aux outputs are in float32 -- as the operators do."""
    base = [t.to(DEVICE) for t in make_case(kind, "diag", (6,), 5, seed=1, dtype=torch.float32)]
    transposed = [t.t().contiguous().t() for t in base]
    assert not transposed[0].is_contiguous()
    check_paths_agree("diag", kind, transposed, MEAN_BOUND, COV_BOUND, 1e-5)
    half = [t.bfloat16() for t in base]
    gen = torch.Generator().manual_seed(3)
    upstream = [torch.randn(t.shape, generator=gen).bfloat16().to(DEVICE) for t in half[:2]]
    fast = run("diag", half, kind, MEAN_BOUND, COV_BOUND, upstream, fast=True)
    op = run("diag", half, kind, MEAN_BOUND, COV_BOUND, upstream, fast=False)
    assert fast[2] == FAST_NODE
    for f, o in zip(fast[0] + fast[1], op[0] + op[1]):
        assert f.dtype == o.dtype
        assert_close(f, o, 0.0, "bfloat16, fast path vs op")


def test_without_grad_and_unused_outputs():
    """No autograd node when nothing needs a gradient (the kernels still run, through the
    fast path); an output left out of the loss gets a zero upstream gradient."""
    case = [t.to(DEVICE) for t in make_case("kl", "diag", (9,), 4, seed=2, dtype=torch.float32)]
    calls = []
    path = OPS[("kl", "diag")].eager[0]  # the Triton launchers
    original = path.run_forward
    path.run_forward = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            mt, st = trpl_fast.project_diag(*case, kind="kl", mean_bound=MEAN_BOUND, cov_bound=COV_BOUND)
    finally:
        del path.run_forward
    assert calls and mt.grad_fn is None
    m, s = case[0].clone().requires_grad_(True), case[1].clone().requires_grad_(True)
    grads = []
    for fast in (True, False):
        trpl_fast.ops.set_eager_fast_path(fast)
        try:
            mt, _ = trpl_fast.project_diag(m, s, *case[2:], kind="kl", mean_bound=MEAN_BOUND, cov_bound=COV_BOUND)
            grads.append(torch.autograd.grad((mt * mt).sum(), [m, s]))
        finally:
            trpl_fast.ops.set_eager_fast_path(True)
    for f, o in zip(*grads):
        assert_close(f, o, 0.0, "gradient with the std output unused")


def test_calls_left_to_the_operators(monkeypatch):
    """Switched off, under a dispatch mode (fake tensors), under torch.func, for an empty
    batch and for inputs the fused kernel does not take: the operators run."""
    op = OPS[("frob", "diag")]
    case = [t.to(DEVICE) for t in make_case("frob", "diag", (4,), 3, dtype=torch.float32)]
    m = case[0].clone().requires_grad_(True)
    assert op.eager_path(m, case[1]) is op.eager[0]
    assert op.eager[0].plan(m, *case[1:], None, None) is not None
    trpl_fast.ops.set_eager_fast_path(False)
    try:
        assert op.eager_path(m, case[1]) is None
    finally:
        trpl_fast.ops.set_eager_fast_path(True)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with monkeypatch.context() as patch, FakeTensorMode() as mode:
        # the interpreter's kernels cannot take fake tensors (wrap_triton hands them back
        # unwrapped): the op's fake CPU tensors take its torch body here
        patch.setattr(_common, "KERNEL_DEVICE_TYPES", ("cuda",))
        fake = [mode.from_tensor(t) for t in case]
        assert op.eager_path(fake[0], fake[1]) is None
        out = trpl_fast.project_diag(*fake, kind="frob", mean_bound=0.1, cov_bound=0.1, check_values=False)
        assert out[0].shape == case[0].shape
    seen = []

    def loss(mean):
        seen.append(eager.takes_fast_path(mean, case[1]))
        mt, st = trpl_fast.project_diag(mean, *case[1:], kind="frob", mean_bound=0.1, cov_bound=0.1, check_values=False)
        return (mt * mt).sum()

    with trpl_fast.ops.torch_func_mode():
        g_func = torch.func.grad(loss)(case[0])
    assert seen == [False]
    m = case[0].clone().requires_grad_(True)
    (g_eager,) = torch.autograd.grad(loss(m), [m])
    assert seen[-1] is True
    assert_close(g_func, g_eager, 1e-6, "torch.func gradient vs the fast path's")
    empty = [t[:0] for t in case]
    assert op.eager[0].plan(*empty, None, None) is None
    assert trpl_fast.project_diag(*empty, kind="frob", mean_bound=0.1, cov_bound=0.1)[0].shape == (0, 3)
    kl_full = OPS[("kl", "full")]
    fused = kl_full.eager[0]
    big = [t.to(DEVICE) for t in make_case("kl", "full", (2,), kl_ops.MAX_D + 1, dtype=torch.float32)]
    assert not fused.applies(big[0])
    half = [t.to(DEVICE).bfloat16() for t in make_case("kl", "full", (2,), 3)]
    assert kl_full.eager_path(half[0], half[1]) is None
    small = [t.to(DEVICE) for t in make_case("kl", "full", (2,), 3)]
    assert kl_full.eager_path(small[0], small[1]) is fused
    monkeypatch.setattr(kl_ops, "FUSED_DEVICE_TYPES", ())
    assert kl_full.eager_path(small[0], small[1]) is not fused


def test_plans_are_made_once_per_signature(monkeypatch):
    """The metadata checks run when a signature is first seen; a new shape or bound
    layout gets its own plan; bad metadata raises the operators' error."""
    op = OPS[("w2", "diag")]
    checks = []
    original = type(op).check
    monkeypatch.setattr(type(op), "check", lambda self, *a: checks.append(1) or original(self, *a))
    case = [t.to(DEVICE) for t in make_case("w2", "diag", (8,), 3, dtype=torch.float32)]
    for _ in range(3):
        op.apply(*case, None, None, 0.1, 0.1)
    assert len(checks) == 1 and len(op.eager[0].plans) == 1
    op.apply(*case, torch.full((8,), 0.1, device=DEVICE), None, 0.0, 0.1)
    op.apply(*[t[:5] for t in case], None, None, 0.1, 0.1)
    assert len(checks) == 3 and len(op.eager[0].plans) == 3
    with pytest.raises(ValueError, match="old_std must have shape"):
        op.apply(case[0], case[1], case[2], case[3][:4], None, None, 0.1, 0.1)
    with pytest.raises(ValueError, match="does not broadcast"):
        op.apply(*case, torch.ones(3, device=DEVICE), None, 0.0, 0.1)


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "operator"])
def test_double_backward_is_refused(fast):
    """A second derivative through the projection raises (its backward is first order) --
    never a silent one missing the projection's term; create_graph=True alone is fine."""
    case = [t.to(DEVICE) for t in make_case("frob", "diag", (3,), 2, dtype=torch.float32)]
    trpl_fast.ops.set_eager_fast_path(fast)
    try:
        m = case[0].clone().requires_grad_(True)
        mt, _ = trpl_fast.project_diag(m, *case[1:], kind="frob", mean_bound=1e-3, cov_bound=1e-3)
        (g,) = torch.autograd.grad((mt * mt).sum() + (m**3).sum(), [m], create_graph=True)
        assert g.requires_grad
        with pytest.raises(RuntimeError):
            torch.autograd.grad(g.sum(), [m])
    finally:
        trpl_fast.ops.set_eager_fast_path(True)


def test_outputs_require_grad_when_only_a_bound_does():
    """As the operators: outputs require grad when any input does (a bound tensor here);
    the bound gets no gradient."""
    case = [t.to(DEVICE) for t in make_case("w2", "diag", (4,), 3, dtype=torch.float32)]
    bound = torch.full((4,), 0.05, device=DEVICE, requires_grad=True)
    mt, st = trpl_fast.project_diag(*case, kind="w2", mean_bound=bound, cov_bound=0.01)
    assert mt.requires_grad and type(mt.grad_fn).__name__ == FAST_NODE
    (mt.sum() + st.sum()).backward()
    assert bound.grad is None


def test_jit_trace_and_symbolic_shapes():
    """``torch.jit.trace`` records operators, so the fast path stays out of it; the launch
    geometry, cached for int shapes, takes the SymInts of ``torch.compile``'s dynamic
    shapes (unhashable) uncached."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from trpl_fast.kernels._common import row_geometry

    seen = []

    def f(x):
        seen.append(eager.takes_fast_path(x, x))
        return x * 2

    torch.jit.trace(f, torch.ones(2), check_trace=False)
    assert seen == [False]
    env = ShapeEnv()
    rows = env.create_symintnode(env.create_symbol(300, ConstantSource("rows")), hint=300)
    got = row_geometry(rows, 7)
    assert got[:2] == row_geometry(300, 7)[:2] and int(got[2][0]) == row_geometry(300, 7)[2][0]


@pytest.mark.parametrize("kind", ["frob", "kl"])
def test_batched_gradients_take_the_torch_backward(kind):
    """``autograd.grad(is_grads_batched=True)`` vmaps the backward: the kernels cannot read
    batched gradients, so the fast path's backward runs the op's torch implementation of
    the same formulas (the operators have no batching rule): the Jacobian row by row."""
    case = [t.to(DEVICE) for t in make_case(kind, "diag", (3,), 2, seed=3)]
    m = case[0].clone().requires_grad_(True)
    mt, _ = trpl_fast.project_diag(m, *case[1:], kind=kind, mean_bound=MEAN_BOUND, cov_bound=COV_BOUND)
    assert type(mt.grad_fn).__name__ == FAST_NODE
    eye = torch.eye(mt.numel(), dtype=mt.dtype, device=DEVICE).reshape(-1, *mt.shape)
    (batched,) = torch.autograd.grad(mt, m, eye, is_grads_batched=True, retain_graph=True)
    rows = [torch.autograd.grad(mt, m, e, retain_graph=True)[0] for e in eye]
    assert_close(batched, torch.stack(rows), 1e-12, "batched vs row-by-row gradients")
