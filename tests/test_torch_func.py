"""The projections under ``torch.func.grad`` (``trpl_fast.ops.torch_func_mode``): the same
values and gradients as autograd through the ``torch.library`` operators, eager and
compiled -- what the training loop's one-graph minibatch step differentiates."""

import pytest
import torch
from torch.func import grad

from trpl_fast import project_diag, project_full
from trpl_fast.ops import in_torch_func_mode, torch_func_mode
from trpl_fast.projection import TrustRegionProjection

from .helpers import assert_close, make_case

CASES = [(k, "diag") for k in ("kl", "w2", "frob")]


def _objective(kind, form, cov, old_mean, old_cov, w_mean, w_cov):
    """A scalar of both outputs with weights that are not ones (upstream gradients)."""
    fn = project_diag if form == "diag" else project_full

    def f(mean):
        mt, ct = fn(mean, cov, old_mean, old_cov, kind=kind, mean_bound=0.05, cov_bound=0.02)
        return (mt * w_mean).sum() + (ct * w_cov).sum()

    return f


@pytest.mark.parametrize("kind,form", CASES, ids=[f"{k}-{f}" for k, f in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_torch_func_grad_equals_autograd_through_the_op(kind, form, dtype):
    mean, cov, old_mean, old_cov = make_case(kind, form, (3, 5), 4, seed=11, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    w_mean = torch.randn(mean.shape, generator=gen, dtype=dtype)
    w_cov = torch.randn(cov.shape, generator=gen, dtype=dtype)
    f = _objective(kind, form, cov, old_mean, old_cov, w_mean, w_cov)
    m = mean.clone().requires_grad_()
    f(m).backward()  # autograd through torch.ops.trpl
    with torch_func_mode():
        assert in_torch_func_mode()
        got = grad(f)(mean)
    assert not in_torch_func_mode()
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(got, m.grad, rtol, f"{kind}-{form} grad")


@pytest.mark.parametrize("kind", ["kl", "w2", "frob"])
def test_full_covariance_ops_stay_opaque_to_torch_func(kind):
    """The full-covariance ops are opaque custom ops (inductor decomposing them gave wrong
    gradients once): torch.func cannot differentiate them on this torch, and the training
    step's probe then keeps the autograd-engine path (rl/compiled_step.py)."""
    mean, cov, old_mean, old_cov = make_case(kind, "full", (3,), 3, seed=1)
    f = _objective(kind, "full", cov, old_mean, old_cov, torch.ones_like(mean), torch.ones_like(cov))
    with torch_func_mode(), pytest.raises(RuntimeError, match="setup_context"):
        grad(f)(mean)


@pytest.mark.parametrize("kind", ["kl", "w2", "frob"])
def test_compiled_torch_func_grad_through_the_layer(kind):
    """Dynamo traces the grad through the layer (no tensor of the transform escapes: the
    layer keeps no outputs for metrics inside the mode) and agrees with eager autograd."""
    mean, std, old_mean, old_std = make_case(kind, "diag", (16,), 6, seed=3, dtype=torch.float32)
    layer = TrustRegionProjection(kind, 0.03, 0.001, "diag", check_values=False)

    def f(m):
        mt, st = layer(m, std, old_mean, old_std)
        return (mt * 1.5).sum() + (st * 0.5).sum()

    m = mean.clone().requires_grad_()
    f(m).backward()
    with torch_func_mode():
        got = torch.compile(lambda x: grad(f)(x))(mean)
    assert_close(got, m.grad, 1e-5, f"{kind} compiled grad")
