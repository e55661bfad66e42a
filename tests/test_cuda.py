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


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("kind", ["frob", "w2", "kl"])
def test_cuda_compile(kind, mode):
    """fullgraph compile, and with inductor's CUDA graphs (``reduce-overhead``: the ops
    must not sync the host)."""
    case = [t.float().cuda() for t in make_case(kind, "diag", (256,), 6)]

    def f(m, c, old_mean, old_std):
        mt, ct = trpl_fast.project_diag(
            m, c, old_mean, old_std, kind=kind, mean_bound=0.05, cov_bound=0.01, check_values=False
        )
        return (mt * mt).sum() + (ct * ct).sum()

    compiled = torch.compile(f, fullgraph=True, mode=mode)
    # the second batch size recompiles with dynamic shapes (SymInt launch geometry)
    for rows in (256, 200):
        inputs = [x[:rows] for x in case]
        m, c = (x.clone().requires_grad_(True) for x in inputs[:2])
        f(m, c, *inputs[2:]).backward()
        g_eager = (m.grad.clone(), c.grad.clone())
        for _ in range(3):  # reduce-overhead: warm-up, recording, replay
            m.grad = c.grad = None
            torch.compiler.cudagraph_mark_step_begin()
            compiled(m, c, *inputs[2:]).backward()
        assert_close(m.grad, g_eager[0], 1e-5, f"compiled grad mean, {rows} rows")
        assert_close(c.grad, g_eager[1], 1e-5, f"compiled grad std, {rows} rows")


# -- CUDA graphs: the ops, the layer and a training step captured and replayed -----------


def _warm_up(fn, times: int = 3):
    """Run ``fn`` on a side stream before capture (Triton compiles, plans are made,
    allocator pools settle), as torch.cuda.graph's documentation asks."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(s)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "operator"])
@pytest.mark.parametrize("form,kind", [("diag", "frob"), ("diag", "w2"), ("diag", "kl"), ("full", "kl")])
def test_cuda_graph_captures_projection_forward_backward(form, kind, fast_path):
    """Forward + backward of the functional API (default value checks: deferred, skipped
    while capturing) captured once, replayed on new inputs copied into the static ones:
    the same outputs, aux outputs and gradients as eager calls on those inputs."""
    batch, d = (64,), 6
    first = [t.float().cuda() for t in make_case(kind, form, batch, d, seed=0)]
    static = [t.clone().requires_grad_(i < 2) for i, t in enumerate(first)]
    gen = torch.Generator().manual_seed(2)
    up = [torch.randn(t.shape, generator=gen).cuda() for t in first[:2]]

    def step(m, c, mo, co):
        out = trpl_fast.functional.project(
            form, m, c, mo, co, kind=kind, mean_bound=0.05, cov_bound=0.01, return_aux=True
        )
        grads = torch.autograd.grad((out[0] * up[0]).sum() + (out[1] * up[1]).sum(), [m, c])
        return [o.detach() for o in out] + list(grads)

    trpl_fast.ops.set_eager_fast_path(fast_path)
    try:
        _warm_up(lambda: step(*static))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step(*static)
        for seed in (1, 2):
            new = [t.float().cuda() for t in make_case(kind, form, batch, d, seed=seed)]
            with torch.no_grad():
                for s, n in zip(static, new):
                    s.copy_(n)
            graph.replay()
            eager = step(*[t.clone().requires_grad_(i < 2) for i, t in enumerate(new)])
            torch.cuda.synchronize()
            for i, (c, e) in enumerate(zip(captured, eager)):
                assert_close(c, e, 0.0, f"replayed output {i} (seed {seed})")
    finally:
        trpl_fast.ops.set_eager_fast_path(True)
    trpl_fast.raise_deferred_errors()


@pytest.mark.parametrize("kind", ["frob", "w2", "kl"])
def test_cuda_graph_captures_a_training_step(kind):
    """A whole policy-gradient step with the layer -- network, projection (contextual
    std), likelihood-ratio loss, the trust-region regression loss, backward and a
    capturable Adam -- captured once and replayed on three minibatches: the parameters
    follow the same eager steps from the same state."""
    import copy

    from torch import nn

    torch.manual_seed(0)
    obs_dim, d, n = 5, 3, 64
    net = nn.Sequential(nn.Linear(obs_dim, 32), nn.Tanh(), nn.Linear(32, 2 * d)).cuda()
    layer = trpl_fast.TrustRegionProjection(kind, mean_bound=0.03, cov_bound=0.001)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, capturable=True)

    def minibatch(seed):
        g = torch.Generator().manual_seed(seed)
        obs = torch.randn(n, obs_dim, generator=g)
        old_mean = 0.1 * torch.randn(n, d, generator=g)
        old_std = 0.5 + 0.5 * torch.rand(n, d, generator=g)
        act = old_mean + old_std * torch.randn(n, d, generator=g)
        adv = torch.randn(n, generator=g)
        return [t.cuda() for t in (obs, old_mean, old_std, act, adv)]

    def log_prob(mean, std, act):  # no torch.distributions argument checks (a host sync)
        return (-0.5 * ((act - mean) / std) ** 2 - std.log()).sum(-1)

    def step(net, opt, obs, old_mean, old_std, act, adv):
        out = net(obs)
        mean, std = out[:, :d], nn.functional.softplus(out[:, d:]) + 1e-3
        mean_t, std_t = layer(mean, std, old_mean, old_std)
        ratio = (log_prob(mean_t, std_t, act) - log_prob(old_mean, old_std, act)).exp()
        loss = -(ratio * adv).mean() + layer.trust_region_loss(mean, std, mean_t, std_t)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return loss.detach()

    static = minibatch(0)
    for p in net.parameters():  # gradients exist before capture (set_to_none=False)
        p.grad = torch.zeros_like(p)
    _warm_up(lambda: step(net, opt, *static))
    ref_net = copy.deepcopy(net)
    ref_opt = torch.optim.Adam(ref_net.parameters(), lr=1e-3, capturable=True)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own moment buffers
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step(net, opt, *static)
    for seed in (1, 2, 3):
        batch = minibatch(seed)
        for s, b in zip(static, batch):
            s.copy_(b)
        graph.replay()
        eager_loss = step(ref_net, ref_opt, *batch)
        torch.cuda.synchronize()
        assert_close(captured_loss, eager_loss, 1e-6, f"loss, minibatch {seed}")
        for (name, p), q in zip(net.named_parameters(), ref_net.parameters()):
            assert_close(p, q, 1e-6, f"{name} after minibatch {seed}")
    trpl_fast.raise_deferred_errors()
