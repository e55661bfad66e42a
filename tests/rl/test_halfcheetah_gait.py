"""bench/halfcheetah_gait.py: the gait of a HalfCheetah checkpoint (upright or on its back),
and the errors for runs it cannot read."""

from __future__ import annotations

import json
import math

import pytest

from bench import halfcheetah_gait
from trpl_fast.rl.config import preset
from trpl_fast.rl.train import train

pytest.importorskip("mujoco")


def _run(path, env_id, seed=3):
    cfg = preset(
        "mujoco",
        "kl",
        env_id=env_id,
        seed=seed,
        total_steps=256,
        rollout_steps=256,
        minibatch_size=64,
        epochs=1,
        epochs_vf=1,
        eval_episodes=1,
        eval_in_background=False,
        env_backend="gymnasium",
    )
    train(cfg, path, progress=False, log_tensorboard=False)
    return path


def test_an_untrained_cheetah_stays_upright(tmp_path):
    # the mean action of a fresh policy is ~0 (its mean head starts at 0.01 gain): the
    # cheetah stands where it fell, its torso level, at 1,000 steps of one episode
    run = _run(tmp_path / "run", "HalfCheetah-v5")
    rows = halfcheetah_gait.main([str(run), "--out", str(tmp_path / "gait.json")])
    assert json.loads((tmp_path / "gait.json").read_text()) == {"runs": rows}
    (row,) = rows
    assert row["seed"] == 3 and row["on_back_fraction"] == 0.0 and row["flipped"] is False
    assert abs(row["forward_velocity"]) < 0.5 and math.isfinite(row["return"])


def test_a_cheetah_laid_on_its_back_counts_as_flipped(tmp_path, monkeypatch):
    # every episode starts with the torso turned by 180 degrees (qpos[2], the pitch, is what
    # the observation reports at index 1); with ~0 actions it stays there
    run = _run(tmp_path / "run", "HalfCheetah-v5")
    import gymnasium as gym

    class OnItsBack(gym.Wrapper):
        def reset(self, **kw):
            super().reset(**kw)
            sim = self.env.unwrapped
            qpos, qvel = sim.data.qpos.copy(), sim.data.qvel.copy()
            qpos[1], qpos[2] = 0.5, math.pi
            sim.set_state(qpos, qvel)
            return sim._get_obs(), {}

    make = gym.make
    monkeypatch.setattr(gym, "make", lambda *a, **k: OnItsBack(make(*a, **k)))
    (row,) = halfcheetah_gait.main([str(run)])
    assert row["on_back_fraction"] > 0.99 and row["flipped"] is True


def test_errors_name_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        halfcheetah_gait.main([str(tmp_path / "nothing")])
    assert "no checkpoint.pt in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        halfcheetah_gait.main([str(tmp_path), "--episodes", "0"])
    assert "--episodes must be >= 1" in capsys.readouterr().err
    run = _run(tmp_path / "hopper", "Hopper-v5")
    with pytest.raises(ValueError, match="a run of Hopper-v5, not of HalfCheetah"):
        halfcheetah_gait.main([str(run)])
