"""Presets carry the paper's table 2 / 3 values; configs round-trip through JSON."""

import json

import pytest

from trpl_fast.rl.config import TrainConfig, preset


def test_mujoco_preset_table2():
    kl = preset("mujoco", "kl")
    assert (kl.rollout_steps, kl.epochs, kl.minibatch_size, kl.lr, kl.lr_vf) == (2048, 20, 32, 5e-5, 4.5e-4)
    assert (kl.mean_bound, kl.cov_bound, kl.regression_weight) == (0.015, 0.001, 8.0)
    assert not kl.normalize_rewards and kl.vf_clip is None
    ppo = preset("mujoco", "ppo")
    assert (ppo.epochs, ppo.minibatch_size, ppo.lr, ppo.lr_vf, ppo.ratio_clip) == (10, 64, 3e-4, 2.5e-4, 0.2)
    assert ppo.normalize_rewards and ppo.obs_clip == 10.0 and ppo.vf_clip == 0.2
    ppo_m = preset("mujoco", "ppo-m")
    assert not ppo_m.normalize_rewards and ppo_m.vf_clip is None and ppo_m.max_grad_norm is None
    assert preset("mujoco", "frob").mean_bound == 0.03


def test_humanoid_preset_table3():
    w2 = preset("humanoid", "w2")
    assert (w2.env_id, w2.rollout_steps, w2.minibatch_size, w2.cov_bound, w2.mean_bound) == (
        "Humanoid-v5", 16384, 256, 0.01, 0.05)
    assert preset("humanoid", "ppo").minibatch_size == 512


def test_round_trip_and_errors():
    cfg = preset("mujoco", "kl", seed=3, hidden=(32, 32))
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="algo must be one of"):
        preset("mujoco", "sac")
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("atari", "kl")
