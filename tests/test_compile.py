"""torch.compile(fullgraph=True) of a small policy head + projection + loss + backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trpl_fast


class Head(nn.Module):
    def __init__(self, obs_dim, d, form, kind):
        super().__init__()
        self.form, self.kind, self.d = form, kind, d
        self.mean = nn.Linear(obs_dim, d)
        n_cov = d if form == "diag" else d * d
        self.cov = nn.Linear(obs_dim, n_cov)

    def forward(self, obs):
        mean = self.mean(obs)
        raw = self.cov(obs)
        if self.form == "diag":
            return mean, nn.functional.softplus(raw) + 1e-3
        a = raw.view(*raw.shape[:-1], self.d, self.d)
        eye = torch.eye(self.d, dtype=obs.dtype)
        if self.kind == "w2":  # a symmetric positive-definite root
            return mean, 0.1 * (a @ a.mT) + eye
        return mean, a.tril(-1) * 0.1 + torch.diag_embed(nn.functional.softplus(a.diagonal(dim1=-2, dim2=-1)) + 1e-3)


@pytest.mark.parametrize("form", ["diag", "full"])
@pytest.mark.parametrize("kind", ["frob", "w2", "kl"])
def test_compile_fullgraph_head_projection_loss_backward(kind, form):
    torch.manual_seed(0)
    d, obs_dim, n = 3, 5, 16
    head = Head(obs_dim, d, form, kind)
    layer = trpl_fast.TrustRegionProjection(kind, 0.01, 0.01, form, contextual_cov=True, check_values=False)
    obs = torch.randn(n, obs_dim)
    with torch.no_grad():
        old_mean, old_cov = head(obs)
        old_mean = old_mean + 0.3
        old_cov = old_cov * 1.2
    actions = torch.randn(n, d)
    adv = torch.randn(n)

    def loss_fn(obs):
        mean, cov = head(obs)
        mean_t, cov_t = layer(mean, cov, old_mean, old_cov)
        if form == "diag":
            dist = torch.distributions.Normal(mean_t, cov_t)
            logp = dist.log_prob(actions).sum(-1)
        else:
            s = cov_t @ cov_t if kind == "w2" else None
            dist = (
                torch.distributions.MultivariateNormal(mean_t, covariance_matrix=s)
                if s is not None
                else torch.distributions.MultivariateNormal(mean_t, scale_tril=cov_t)
            )
            logp = dist.log_prob(actions)
        return -(torch.exp(logp - logp.detach()) * adv).mean() + layer.trust_region_loss(mean, cov, mean_t, cov_t)

    eager_loss = loss_fn(obs)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    # fullgraph: no graph break anywhere in head + projection + loss; AOTAutograd
    # compiles the matching backward graph, which loss.backward() runs.
    loss = torch.compile(loss_fn, fullgraph=True)(obs)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for p, g in zip(head.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
