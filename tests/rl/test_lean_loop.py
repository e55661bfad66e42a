"""The lean loop: the compiled minibatch steps agree with the eager ones, the rollout's
actor on an accelerator is a CPU copy synced once per iteration, and every phase's time is
logged."""

import numpy as np
import pytest
import torch

from trpl_fast.rl.config import preset
from trpl_fast.rl.policies import GaussianPolicy
from trpl_fast.rl.rollout import Actor
from trpl_fast.rl.runlog import TIMING_COLUMNS, PhaseClock
from trpl_fast.rl.train import device_synchronizer, train

pytest.importorskip("gymnasium")


def small(algo, **kw):
    args = dict(
        env_id="Pendulum-v1",
        total_steps=512,
        rollout_steps=256,
        num_envs=2,
        epochs=2,
        epochs_vf=1,
        minibatch_size=64,
        eval_episodes=0,
        device="cpu",
        env_backend="gymnasium",
    )
    args.update(kw)
    return preset("mujoco", algo, **args)


@pytest.mark.parametrize(
    "algo,extra",
    [
        ("kl", {}),
        ("ppo", {}),
        ("w2", {"entropy_control": "eq", "target_entropy": -0.5, "max_grad_norm": 0.1}),
        ("frob", {"cov_form": "full", "contextual_cov": True}),
    ],
    ids=["kl", "ppo", "w2-entropy-control-clipped", "frob-full-contextual"],
)
def test_compiled_steps_agree_with_eager(algo, extra, tmp_path):
    """Two iterations (ppo: with its learning-rate decay, whose tensor learning rate must not
    recompile) give the same parameters up to float32 reassociation: the one-graph step
    (torch.func gradient through the projection, Adam written out) against backward + Adam."""
    states = {}
    for compiled in (False, True):
        d = tmp_path / str(compiled)
        rows = train(small(algo, compile_update=compiled, **extra), d, progress=False, log_tensorboard=False)
        states[compiled] = (torch.load(d / "checkpoint.pt", weights_only=False), rows)
    (eager, rows_e), (comp, rows_c) = states[False], states[True]
    for net in ("policy", "value"):
        for name, t in eager[net].items():
            assert torch.allclose(t, comp[net][name], rtol=1e-4, atol=1e-5), f"{net}.{name}"
    for a, b in zip(rows_e, rows_c):
        assert a["policy_loss"] == pytest.approx(b["policy_loss"], rel=1e-3, abs=1e-5)
        assert a["kl_max"] == pytest.approx(b["kl_max"], rel=1e-3, abs=1e-7)


def test_actor_on_an_accelerator_is_a_cpu_copy_synced_per_iteration():
    torch.manual_seed(0)
    policy = GaussianPolicy(3, 2)
    same = Actor(policy, torch.device("cpu"), np.random.default_rng(0))
    assert same.local is policy and not same.separate
    actor = Actor(policy, torch.device("cuda"), np.random.default_rng(0))  # a CPU copy: no GPU needed here
    assert actor.separate and next(actor.local.parameters()).device.type == "cpu"
    obs = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    with torch.no_grad():
        policy.mean_head.bias.add_(5.0)  # an update on the training device
    actor.rng = np.random.default_rng(1)
    before = actor.act(obs)
    actor.sync()
    actor.rng = np.random.default_rng(1)
    after = actor.act(obs)
    assert np.allclose(after - before, 5.0, atol=1e-5)


@pytest.mark.parametrize(
    "cov_form,factor,contextual",
    [
        ("diag", "cholesky", False),
        ("full", "cholesky", False),
        ("full", "sqrt", False),
        ("diag", "cholesky", True),
        ("full", "cholesky", True),
    ],
    ids=["diag", "full-cholesky", "full-sqrt", "diag-contextual", "full-contextual-torch"],
)
def test_numpy_actor_samples_what_the_policy_samples(cov_form, factor, contextual):
    """The rollout's numpy path and its torch fallback (a contextual full covariance) give
    the torch policy's sample for the same noise, and the noise is the generator's."""
    torch.manual_seed(0)
    policy = GaussianPolicy(
        5, 3, cov_form=cov_form, factor=factor, cov_type="contextual" if contextual else "global", init_std=0.7
    )
    with torch.no_grad():  # a covariance with correlations and unequal stds
        if contextual:
            policy.cov_head.weight.normal_(0.0, 0.3)
        else:
            policy.cov_diag.add_(torch.tensor([0.3, -0.2, 0.1]))
            policy.cov_off.add_(0.2)
    actor = Actor(policy, torch.device("cpu"), np.random.default_rng(7))
    assert (actor._forward is None) == (contextual and cov_form == "full")
    obs = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
    got = actor.act(obs)
    z = np.random.default_rng(7).standard_normal((6, 3), dtype=np.float32)
    with torch.no_grad():
        mean, cov = policy(torch.from_numpy(obs))
        want = policy.sample(mean, cov, noise=torch.from_numpy(z)).numpy()
    assert got.dtype == np.float32 and got.shape == (6, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_phase_times_are_logged(tmp_path):
    rows = train(small("kl", total_steps=256), tmp_path, progress=False, log_tensorboard=False)
    for col in TIMING_COLUMNS:
        assert rows[0][col] > 0, col
    phases = sum(rows[0][c] for c in TIMING_COLUMNS if c.startswith("time_"))
    assert phases == pytest.approx(256 / rows[0]["steps_per_second"], rel=1e-6)


def test_phase_clock_waits_for_the_device_before_each_reading():
    # a GPU runs kernels asynchronously: without a sync a phase's queued work would be
    # counted in the next phase that waits for it
    calls = []
    clock = PhaseClock(sync=lambda: calls.append(len(calls)))
    first, second = clock.lap(), clock.lap()
    assert calls == [0, 1] and first >= 0 and second >= 0
    assert clock.total == pytest.approx(first + second)
    assert device_synchronizer(torch.device("cpu")) is None
    cuda_sync = device_synchronizer(torch.device("cuda", 0))  # built without touching CUDA
    assert cuda_sync.func is torch.cuda.synchronize and cuda_sync.args == (torch.device("cuda", 0),)
