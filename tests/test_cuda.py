"""The operators on CUDA tensors (the Triton kernels compiled for the GPU, not the
interpreter) against the float64 reference: outputs, gradients, convergence, compile.
Skipped without CUDA; run on the lent GPU machine."""

from __future__ import annotations

import pytest
import torch

import trpl_fast
from trpl_fast import reference as R

from .helpers import F64, assert_close, make_case

pytestmark = pytest.mark.cuda
API = {"diag": trpl_fast.project_diag, "full": trpl_fast.project_full}
REF = {"diag": R.project_diag, "full": R.project_full}


@pytest.mark.parametrize("batch", [(41,), (3, 5), (70_000,)], ids=lambda b: f"batch={b}")
@pytest.mark.parametrize("d", [1, 7, 17], ids=lambda d: f"d={d}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("form", ["diag", "full"])
@pytest.mark.parametrize("kind", ["frob", "w2", "kl"])
def test_cuda_matches_reference(kind, form, dtype, d, batch):
    if form == "full" and batch == (70_000,) and d > 7:
        pytest.skip("dense reference too large")
    case = make_case(kind, form, batch, d, conditioning="ill", dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    up = [torch.randn(t.shape, generator=gen, dtype=F64) for t in case[:2]]
    kw = dict(kind=kind, mean_bound=0.1, cov_bound=0.05)

    def run(fn, tensors, device):
        m, c, mo, co = (t.clone().to(device) for t in tensors)
        m.requires_grad_(True)
        c.requires_grad_(True)
        mt, ct = fn(m, c, mo, co, **kw)
        gm, gc = torch.autograd.grad((mt * up[0].to(mt)).sum() + (ct * up[1].to(ct)).sum(), [m, c])
        return mt, ct, gm, gc

    got = run(API[form], case, "cuda")
    ref = run(REF[form], [t.to(F64) for t in case], "cpu")
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    names = ("mean_t", "cov_t", "grad mean", "grad cov")
    for g, r, name in zip(got, ref, names):
        if kind == "w2" and form == "full" and name == "grad cov":
            g, r = 0.5 * (g + g.mT), 0.5 * (r + r.mT)
        assert_close(
            g.cpu(), r, tol if "grad" not in name else 100 * tol, name, atol=100 * tol if "grad" in name else 0.0
        )


@pytest.mark.parametrize("form", ["diag", "full"])
def test_cuda_kl_converges_and_bf16(form):
    case = make_case("kl", form, (4096,), 17, seed=3)
    out = trpl_fast.functional.project(
        form, *[t.float().cuda() for t in case], kind="kl", mean_bound=0.015, cov_bound=0.001, return_aux=True
    )
    assert out[3].all()
    if form == "diag":
        half = trpl_fast.project_diag(
            *[t.bfloat16().cuda() for t in case], kind="kl", mean_bound=0.015, cov_bound=0.001
        )
        assert half[1].dtype == torch.bfloat16
        assert_close(half[1].float(), out[1], 2.0**-7, "bf16 std_t")


@pytest.mark.parametrize("kind", ["frob", "w2", "kl"])
def test_cuda_compile(kind):
    case = [t.float().cuda() for t in make_case(kind, "diag", (256,), 6)]

    def f(m, c):
        mt, ct = trpl_fast.project_diag(
            m, c, case[2], case[3], kind=kind, mean_bound=0.05, cov_bound=0.01, check_values=False
        )
        return (mt * mt).sum() + (ct * ct).sum()

    m, c = case[0].clone().requires_grad_(True), case[1].clone().requires_grad_(True)
    f(m, c).backward()
    g_eager = (m.grad.clone(), c.grad.clone())
    m.grad = c.grad = None
    torch.compile(f, fullgraph=True)(m, c).backward()
    assert_close(m.grad, g_eager[0], 1e-5, "compiled grad mean")
    assert_close(c.grad, g_eager[1], 1e-5, "compiled grad std")
