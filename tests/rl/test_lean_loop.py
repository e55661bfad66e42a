"""The lean loop: the compiled minibatch steps agree with the eager ones, the rollout's
actor on an accelerator is a CPU copy synced once per iteration, and every phase's time is
logged."""

import pytest
import torch

from trpl_fast.rl.config import preset
from trpl_fast.rl.policies import GaussianPolicy
from trpl_fast.rl.rollout import Actor
from trpl_fast.rl.runlog import TIMING_COLUMNS
from trpl_fast.rl.train import train

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


@pytest.mark.parametrize("algo", ["kl", "ppo"])
def test_compiled_steps_agree_with_eager(algo, tmp_path):
    """Two iterations (ppo: with its learning-rate decay, whose tensor learning rate must not
    recompile) give the same parameters up to float32 reassociation."""
    states = {}
    for compiled in (False, True):
        d = tmp_path / str(compiled)
        rows = train(small(algo, compile_update=compiled), d, progress=False, log_tensorboard=False)
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
    same = Actor(policy, torch.device("cpu"))
    assert same.local is policy and not same.separate
    actor = Actor(policy, torch.device("cuda"))  # the copy is made on the CPU: no GPU needed here
    assert actor.separate and next(actor.local.parameters()).device.type == "cpu"
    obs = torch.randn(4, 3)
    with torch.no_grad():
        policy.mean_head.bias.add_(5.0)  # an update on the training device
    torch.manual_seed(1)
    before = actor.act(obs)
    actor.sync()
    torch.manual_seed(1)
    after = actor.act(obs)
    assert torch.allclose(after - before, torch.full_like(after, 5.0), atol=1e-5)


def test_phase_times_are_logged(tmp_path):
    rows = train(small("kl", total_steps=256), tmp_path, progress=False, log_tensorboard=False)
    for col in TIMING_COLUMNS:
        assert rows[0][col] > 0, col
    phases = sum(rows[0][c] for c in TIMING_COLUMNS if c.startswith("time_"))
    assert phases == pytest.approx(256 / rows[0]["steps_per_second"], rel=1e-6)
