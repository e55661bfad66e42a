"""The compiled whole-step (torch.func gradient + Adam written out) against the eager step
it replaces: ``loss.backward()``, optional gradient clipping, ``torch.optim.Adam.step()``."""

import copy

import pytest
import torch
from torch import nn

from trpl_fast.rl.compiled_step import CompiledAdamStep, clip_by_seed_norm, clip_by_total_norm, supports
from trpl_fast.rl.multiseed import clip_grad_norm_per_seed
from trpl_fast.rl.policies import ValueNetwork


def _loss(forward, obs, target, weight):
    return 0.5 * (((forward(obs) - target) ** 2) * weight).sum() / weight.sum()


def _max_rel_diff(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item() for x, y in zip(a, b))


@pytest.mark.parametrize(
    "fused,clip,tensor_lr",
    [(True, None, False), (False, None, False), (True, 0.05, False), (True, None, True)],
    ids=["fused", "foreach", "clipped", "tensor-lr"],
)
def test_compiled_step_equals_backward_and_adam(fused, clip, tensor_lr):
    torch.manual_seed(0)
    net = ValueNetwork(7, (16, 16))
    ref = copy.deepcopy(net)
    lr = torch.tensor(3e-3) if tensor_lr else 3e-3
    kw = dict(lr=lr, eps=1e-5, fused=fused) if fused else dict(lr=lr, eps=1e-5, foreach=True)
    opt = torch.optim.Adam(net.parameters(), **kw)
    opt_ref = torch.optim.Adam(ref.parameters(), **{**kw, "lr": lr.clone() if tensor_lr else lr})
    step = CompiledAdamStep(net, opt, _loss, clip_by_total_norm(clip) if clip else None)
    gen = torch.Generator().manual_seed(1)
    for i in range(12):
        obs, target = torch.randn(33, 7, generator=gen), torch.randn(33, generator=gen) * 3
        weight = (torch.rand(33, generator=gen) > 0.1).float()
        if i == 6 and tensor_lr:  # a schedule changes the rate in place: no recompile, new rate used
            opt.param_groups[0]["lr"].fill_(1e-3)
            opt_ref.param_groups[0]["lr"].fill_(1e-3)
        got = step(obs, target, weight)
        opt_ref.zero_grad()
        want = _loss(ref, obs, target, weight)
        want.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt_ref.step()
        assert got.item() == pytest.approx(want.item(), rel=1e-5), i
    assert _max_rel_diff(list(net.parameters()), list(ref.parameters())) < 1e-5
    st, st_ref = opt.state_dict()["state"], opt_ref.state_dict()["state"]
    for k in st_ref:  # the optimizer's own state was advanced: checkpoints hold it
        assert float(st[k]["step"]) == float(st_ref[k]["step"]) == 12
        assert (
            _max_rel_diff([st[k]["exp_avg"], st[k]["exp_avg_sq"]], [st_ref[k]["exp_avg"], st_ref[k]["exp_avg_sq"]])
            < 1e-4
        )


def test_steps_of_equal_shapes_never_share_a_graph_and_int_arguments_stay_guarded():
    """The compiled steps keep only the guards on their arguments (``_guard_on_arguments``):
    two steps over networks of the same shapes but different losses must still each run
    their own graph, and a Python int argument (the entropy schedule's step) that changes
    must be seen -- each compared with the eager step."""
    torch.manual_seed(0)
    nets = [ValueNetwork(4, (8,)) for _ in range(2)]
    refs = [copy.deepcopy(n) for n in nets]

    def scaled(scale):
        def loss(forward, obs, target, weight, k):
            return scale * k * _loss(forward, obs, target, weight)

        return loss

    opts = [torch.optim.Adam(n.parameters(), lr=1e-2) for n in nets]
    opt_refs = [torch.optim.Adam(n.parameters(), lr=1e-2) for n in refs]
    steps = [CompiledAdamStep(n, o, scaled(s)) for n, o, s in zip(nets, opts, (1.0, 5.0))]
    gen = torch.Generator().manual_seed(2)
    for k in (1, 2, 3, 3):
        obs, target, weight = torch.randn(16, 4, generator=gen), torch.randn(16, generator=gen), torch.ones(16)
        for step, ref, opt_ref, s in zip(steps, refs, opt_refs, (1.0, 5.0)):
            got = step(obs, target, weight, k)
            opt_ref.zero_grad()
            want = scaled(s)(ref, obs, target, weight, k)
            want.backward()
            opt_ref.step()
            assert got.item() == pytest.approx(want.item(), rel=1e-5), (s, k)
    for n, r in zip(nets, refs):
        assert _max_rel_diff(list(n.parameters()), list(r.parameters())) < 1e-4


def test_compiled_step_continues_from_a_loaded_optimizer_state():
    """Eager steps, a state dict round trip, then compiled steps: as eager all along."""
    torch.manual_seed(0)
    net = ValueNetwork(5, (8,))
    ref = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, eps=1e-5, fused=True)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-5, fused=True)
    data = [(torch.randn(16, 5), torch.randn(16), torch.ones(16)) for _ in range(8)]
    for i, (o, t, w) in enumerate(data):
        pairs = [(ref, opt_ref), (net, opt)] if i < 4 else [(ref, opt_ref)]  # net: eager for 4 steps
        for module, optimizer in pairs:
            optimizer.zero_grad()
            _loss(module, o, t, w).backward()
            optimizer.step()
    opt2 = torch.optim.Adam(net.parameters(), lr=1e-2, eps=1e-5, fused=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # what a resume does
    step = CompiledAdamStep(net, opt2, _loss)
    for o, t, w in data[4:]:
        step(o, t, w)
    assert _max_rel_diff(list(net.parameters()), list(ref.parameters())) < 1e-5


def test_per_seed_clipping_is_the_in_place_one():
    torch.manual_seed(0)
    grads = [torch.randn(3, 4, 5), torch.randn(3, 4)]
    grads[0][1] *= 100  # seed 1 clipped, the others not
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_grad_norm_per_seed(params, 5.0)
    for got, p in zip(clip_by_seed_norm(5.0)(grads), params):
        assert torch.allclose(got, p.grad)


def test_unsupported_optimizers_are_refused_by_name():
    net = nn.Linear(2, 2)
    assert not supports(torch.optim.Adam(net.parameters(), weight_decay=0.1))
    assert not supports(torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="torch.optim.Adam"):
        CompiledAdamStep(net, torch.optim.Adam(net.parameters(), amsgrad=True), _loss)
    with pytest.raises(ValueError, match="module.parameters"):
        CompiledAdamStep(net, torch.optim.Adam(nn.Linear(2, 2).parameters()), _loss)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_compiled_step_is_traced_once(tensor_lr):
    """The learning rate reaches the graph as a one-element tensor: a 0-d float64 one made dynamo
    trace it as a symbolic float and then restart the whole trace to specialize it (~30% of
    the KL policy step's compilation, paid at the start of every run)."""
    import logging

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    torch.manual_seed(0)
    net = ValueNetwork(3, (8,))
    lr = torch.tensor(1e-3) if tensor_lr else 1e-3
    step = CompiledAdamStep(net, torch.optim.Adam(net.parameters(), lr=lr), _loss)
    logger = logging.getLogger("torch._dynamo")
    handler = Collect(level=logging.INFO)
    logger.addHandler(handler)
    torch._logging.set_logs(dynamo=logging.INFO)
    try:
        step(torch.randn(5, 3), torch.randn(5), torch.ones(5))
    finally:
        torch._logging.set_logs()
        logger.removeHandler(handler)
    assert any("start tracing" in m for m in records), records  # it was compiled here
    assert not [m for m in records if "Restarting analysis" in m]
