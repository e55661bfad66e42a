"""GAE against hand-computed cases; terminated vs truncated."""

import pytest
import torch

from trpl_fast.rl.advantages import gae


def t(x):
    return torch.tensor(x, dtype=torch.float64).unsqueeze(-1)  # (T, N=1)


def b(x):
    return torch.tensor(x, dtype=torch.bool).unsqueeze(-1)


def test_gae_hand_computed_no_episode_end():
    r, v, nv = t([1.0, 2.0, 3.0]), t([0.5, 1.0, 1.5]), t([1.0, 1.5, 2.0])
    gamma, lam = 0.9, 0.8
    d = [1 + 0.9 * 1.0 - 0.5, 2 + 0.9 * 1.5 - 1.0, 3 + 0.9 * 2.0 - 1.5]  # 1.4, 2.35, 3.3
    a2 = d[2]
    a1 = d[1] + gamma * lam * a2
    a0 = d[0] + gamma * lam * a1
    adv, ret = gae(r, v, nv, b([0, 0, 0]), b([0, 0, 0]), gamma, lam)
    assert torch.allclose(adv.squeeze(-1), torch.tensor([a0, a1, a2], dtype=torch.float64))
    assert torch.allclose(ret, adv + v)


def test_terminated_does_not_bootstrap_and_cuts_the_recursion():
    r, v, nv = t([1.0, 1.0]), t([0.0, 0.0]), t([5.0, 7.0])
    adv, _ = gae(r, v, nv, b([1, 0]), b([0, 0]), 0.5, 1.0)
    # step 0 terminated: delta = 1 (no bootstrap), no contribution from step 1
    assert adv[0].item() == pytest.approx(1.0)
    assert adv[1].item() == pytest.approx(1.0 + 0.5 * 7.0)


def test_truncated_bootstraps_from_the_final_observation_and_cuts_the_recursion():
    r, v, nv = t([1.0, 1.0]), t([0.0, 0.0]), t([5.0, 7.0])
    adv, _ = gae(r, v, nv, b([0, 0]), b([1, 0]), 0.5, 1.0)
    # step 0 truncated: delta = 1 + 0.5 * V(final obs) = 3.5, but A_1 does not leak in
    assert adv[0].item() == pytest.approx(3.5)


def test_several_envs_are_independent():
    gen = torch.Generator().manual_seed(0)
    r, v, nv = (torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    term = torch.rand(6, 3, generator=gen) < 0.2
    trunc = torch.rand(6, 3, generator=gen) < 0.2
    adv, _ = gae(r, v, nv, term, trunc, 0.99, 0.95)
    for n in range(3):
        a_n, _ = gae(
            r[:, n : n + 1], v[:, n : n + 1], nv[:, n : n + 1], term[:, n : n + 1], trunc[:, n : n + 1], 0.99, 0.95
        )
        assert torch.allclose(adv[:, n : n + 1], a_n)


def test_bad_input():
    with pytest.raises(ValueError, match="share the shape"):
        gae(t([1.0]), t([1.0, 2.0]), t([1.0]), b([0]), b([0]), 0.9, 0.9)
    with pytest.raises(ValueError, match="gamma and lam"):
        gae(t([1.0]), t([1.0]), t([1.0]), b([0]), b([0]), 1.5, 0.9)
