"""Running statistics, normalizers and losses."""

import pytest
import torch

from trpl_fast.rl.losses import ppo_clip_loss, surrogate_loss, value_loss
from trpl_fast.rl.normalization import ObservationNormalizer, RewardNormalizer, RunningMeanStd


def test_running_mean_std_matches_batch_statistics():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(1000, 4, generator=gen, dtype=torch.float64) * 3 + 2
    rms = RunningMeanStd((4,), epsilon=0.0)
    for chunk in data.split(137):
        rms.update(chunk)
    assert torch.allclose(rms.mean, data.mean(0))
    assert torch.allclose(rms.var, data.var(0, unbiased=False))
    clone = RunningMeanStd((4,))
    clone.load_state_dict(rms.state_dict())
    assert torch.equal(clone.mean, rms.mean) and torch.equal(clone.var, rms.var)
    with pytest.raises(ValueError, match="cannot be loaded"):
        RunningMeanStd((3,)).load_state_dict(rms.state_dict())


def test_observation_normalizer_standardizes_and_clips():
    gen = torch.Generator().manual_seed(1)
    obs = torch.randn(5000, 3, generator=gen) * torch.tensor([1.0, 10.0, 0.1]) + 5
    norm = ObservationNormalizer((3,), clip=5.0)
    out = norm(obs, update=True)
    assert torch.allclose(out.mean(0), torch.zeros(3), atol=1e-3)
    assert torch.allclose(out.std(0), torch.ones(3), atol=1e-2)
    assert norm(torch.full((1, 3), 1e6)).max() == 5.0
    frozen = norm.stats.mean.clone()
    norm(obs + 100)  # update=False leaves the statistics alone
    assert torch.equal(norm.stats.mean, frozen)


def test_reward_normalizer_scales_by_return_std_and_resets_at_done():
    norm = RewardNormalizer(num_envs=2, gamma=0.5, clip=None)
    r = torch.tensor([1.0, 2.0])
    norm(r, torch.tensor([False, True]))
    assert norm.ret.tolist() == [1.0, 0.0]
    out = norm(r, torch.tensor([False, False]))
    assert torch.allclose(out, r / torch.sqrt(norm.stats.var + 1e-8).float())


def test_losses():
    logp = torch.tensor([0.0, 0.5, -0.5])
    logp_old = torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, -1.0])
    ratio = torch.exp(logp)
    assert surrogate_loss(logp, logp_old, adv).item() == pytest.approx(-(ratio * adv).mean().item())
    # ratio e^0.5 = 1.65 clipped to 1.2 for a positive advantage; e^-0.5 = 0.61 clipped to 0.8
    # for a negative one (min picks the clipped, more pessimistic value)
    expect = -(1.0 + 1.2 - 0.8) / 3
    assert ppo_clip_loss(logp, logp_old, adv, 0.2).item() == pytest.approx(expect)
    v, ret, old = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 2.5])
    assert value_loss(v, ret).item() == pytest.approx(0.5 * (1 + 9) / 2)
    # clipped: V_old + clip(V - V_old, 0.2): [0.2, 2.7] -> max((1,9),(0.04,7.29)) = (1, 9)
    assert value_loss(v, ret, old, 0.2).item() == pytest.approx(0.5 * (1 + 9) / 2)
    # V moved from 3 towards R = 0 by more than the clip: the clipped term (2 - 0)^2 wins
    assert value_loss(torch.tensor([0.9]), torch.tensor([0.0]), torch.tensor([3.0]), 1.0).item() == pytest.approx(
        0.5 * 4.0
    )
    with pytest.raises(ValueError, match="clip must be > 0"):
        ppo_clip_loss(logp, logp_old, adv, 0.0)


def test_numpy_paths_equal_the_tensor_paths():
    """The rollout's per-step numpy normalizers compute what the tensor versions compute."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = ObservationNormalizer((3,), clip=2.0), ObservationNormalizer((3,), clip=2.0)
    ra, rb = RewardNormalizer(2, 0.9), RewardNormalizer(2, 0.9)
    for step in range(50):
        obs = (rng.standard_normal((2, 3)) * [1.0, 5.0, 0.2] + 3).astype(np.float32)
        out_np = a.numpy(obs, update=True)
        out_t = b(torch.from_numpy(obs), update=True)
        assert out_np.dtype == np.float32 and np.array_equal(out_np, out_t.numpy())
        rew, done = rng.standard_normal(2) * 10, rng.random(2) < 0.1
        r_np = ra.numpy(rew, done)
        r_t = rb(torch.from_numpy(rew).float(), torch.from_numpy(done))
        assert r_np.dtype == np.float32 and np.allclose(r_np, r_t.numpy(), rtol=1e-6), step
    assert torch.equal(a.stats.mean, b.stats.mean) and torch.equal(a.stats.var, b.stats.var)
    assert a.state_dict()["mean"].dtype == torch.float64  # checkpoints hold tensors, as before
