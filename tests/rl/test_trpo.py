"""TRPO: conjugate gradient solves F x = g; the line search never accepts a step whose mean
KL(old || new) exceeds the bound, even when the quadratic model badly underestimates it."""

import pytest
import torch

from trpl_fast import distances as D
from trpl_fast.rl import trpo as T
from trpl_fast.rl.policies import GaussianPolicy


def test_conjugate_gradient_solves_spd_system():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    f = a @ a.T + 8 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=gen, dtype=torch.float64)
    x = T.conjugate_gradient(lambda v: f @ v, b, iters=20)
    assert torch.allclose(f @ x, b, atol=1e-8)


def batch(seed, form="diag"):
    torch.manual_seed(seed)
    pol = GaussianPolicy(4, 2, cov_form=form, cov_type="contextual", init_std=0.5)
    obs = torch.randn(256, 4)
    with torch.no_grad():
        mean, cov = pol(obs)
        act = D.sample("kl", form, mean, cov)
        logp = D.log_prob("kl", form, mean, cov, act)
    adv = torch.randn(256)
    return pol, obs, act, adv, logp, mean, cov


@pytest.mark.parametrize("max_kl", [0.01, 2.0], ids=["kl=0.01", "kl=2-quadratic-model-too-optimistic"])
@pytest.mark.parametrize("form", ["diag", "full"])
def test_line_search_never_exceeds_the_kl_bound(form, max_kl):
    """At max_kl = 2 the quadratic KL model underestimates the true KL of the full step
    (measured: every full step on these batches was over the bound), so the line search
    must backtrack; at 0.01 the full step is accepted."""
    fractions = []
    for seed in range(6):
        pol, obs, act, adv, logp, mean, cov = batch(seed, form)
        info = T.trpo_step(pol, obs, act, adv, logp, mean, cov, max_kl=max_kl)
        with torch.no_grad():
            new_mean, new_cov = pol(obs)
            kl = D.kl("kl", form, mean, cov, new_mean, new_cov).mean().item()
        if info["accepted"]:
            assert kl <= max_kl and info["kl"] == pytest.approx(kl)
            fractions.append(info["step_fraction"])
        else:
            assert kl == 0.0  # rejected: parameters restored exactly
    assert fractions, "no step was accepted"
    if max_kl > 1:
        assert max(fractions) < 1.0  # every accepted step was backtracked
