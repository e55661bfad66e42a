"""Gaussian policies: parametrizations valid for the projection layer, log-probs against
torch.distributions, initialization, global covariance copy."""

import pytest
import torch

import trpl_fast
from trpl_fast import distances as D
from trpl_fast.rl.policies import (
    FACTOR_OF_PROJECTION,  # noqa: E402
    GaussianPolicy,
    ValueNetwork,
)

CASES = [("kl", "diag"), ("frob", "full"), ("kl", "full"), ("w2", "full"), ("w2", "diag")]


@pytest.mark.parametrize("cov_type", ["global", "contextual"])
@pytest.mark.parametrize("kind,form", CASES)
def test_policy_outputs_are_valid_projection_inputs(kind, form, cov_type):
    torch.manual_seed(0)
    pol = GaussianPolicy(5, 3, factor=FACTOR_OF_PROJECTION[kind], cov_form=form, cov_type=cov_type, init_std=0.7)
    obs = torch.randn(11, 5)
    mean, cov = pol(obs)
    assert mean.shape == (11, 3) and cov.shape == ((11, 3) if form == "diag" else (11, 3, 3))
    # initial covariance: std 0.7 in every direction, mean near 0
    s = D.cholesky_of(kind, form, cov) if form == "full" else torch.diag_embed(cov)
    dense = s @ s.mT
    # (a contextual head adds its small initial weights times the features)
    assert torch.allclose(
        dense.diagonal(dim1=-2, dim2=-1), torch.full((11, 3), 0.49), rtol=1e-3 if cov_type == "global" else 0.05
    )
    assert mean.abs().max() < 0.5
    api = trpl_fast.project_diag if form == "diag" else trpl_fast.project_full
    with torch.no_grad():
        old_mean, old_cov = mean + 0.1, cov * 1.1
    api(mean, cov, old_mean, old_cov, kind=kind, mean_bound=0.01, cov_bound=0.01)  # validates


@pytest.mark.parametrize("kind,form", CASES)
def test_log_prob_matches_torch_distributions(kind, form):
    torch.manual_seed(1)
    pol = GaussianPolicy(4, 3, factor=FACTOR_OF_PROJECTION[kind], cov_form=form, cov_type="contextual")
    obs = torch.randn(7, 4, dtype=torch.float64)
    pol.double()
    mean, cov = pol(obs)
    a = D.sample(kind, form, mean, cov)
    if form == "diag":
        ref = torch.distributions.Normal(mean, cov).log_prob(a).sum(-1)
    else:
        c = D.cholesky_of(kind, form, cov)
        ref = torch.distributions.MultivariateNormal(mean, scale_tril=c).log_prob(a)
    assert torch.allclose(D.log_prob(kind, form, mean, cov, a), ref)
    # the policy's own distribution methods agree with torch.distributions too
    assert torch.allclose(pol.log_prob(mean, cov, a), ref)
    dist = (
        torch.distributions.Normal(mean, cov)
        if form == "diag"
        else torch.distributions.MultivariateNormal(mean, scale_tril=D.cholesky_of(kind, form, cov))
    )
    assert torch.allclose(pol.entropy(cov), dist.entropy().sum(-1) if form == "diag" else dist.entropy())
    other = (mean + 0.1, cov * 1.2)
    odist = (
        torch.distributions.Normal(*other)
        if form == "diag"
        else torch.distributions.MultivariateNormal(other[0], scale_tril=D.cholesky_of(kind, form, other[1]))
    )
    kl_ref = torch.distributions.kl_divergence(dist, odist)
    assert torch.allclose(pol.kl(mean, cov, *other), kl_ref.sum(-1) if form == "diag" else kl_ref)
    torch.manual_seed(3)
    x = pol.sample(mean, cov)
    torch.manual_seed(3)
    assert torch.equal(x, D.sample(kind, form, mean, cov))


@pytest.mark.parametrize("kind,form", CASES)
def test_set_global_cov_round_trip(kind, form):
    pol = GaussianPolicy(4, 3, factor=FACTOR_OF_PROJECTION[kind], cov_form=form, cov_type="global", init_std=1.0)
    _, cov = pol(torch.zeros(1, 4))
    target = cov[0] * 0.8
    pol.set_global_cov(target)
    _, new = pol(torch.zeros(1, 4))
    assert torch.allclose(new[0], target, atol=1e-5)


def test_value_network_and_bad_args():
    v = ValueNetwork(6)
    assert v(torch.randn(9, 6)).shape == (9,)
    with pytest.raises(ValueError, match="cov_type"):
        GaussianPolicy(3, 2, cov_type="state")
    with pytest.raises(ValueError, match="cov_form"):
        GaussianPolicy(3, 2, cov_form="dense")
    with pytest.raises(ValueError, match="factor must be one of"):
        GaussianPolicy(3, 2, factor="w2")
