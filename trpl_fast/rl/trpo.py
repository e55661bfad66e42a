"""TRPO's policy step (Schulman et al. 2015; ``../shared/seeds/trpo_reading_slides.txt``):
natural-gradient direction by conjugate gradient on Fisher-vector products, scaled to the
KL bound, then a backtracking line search that accepts only steps whose mean
``KL(pi_old || pi_new)`` is within ``max_kl`` and whose surrogate improves."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters


def flat_grad(output: Tensor, params, **kw) -> Tensor:
    """Gradient of ``output`` w.r.t. ``params`` as one vector (zeros for unused ones, e.g.
    the empty off-diagonal parameter of a diagonal policy)."""
    grads = torch.autograd.grad(output, params, allow_unused=True, **kw)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def conjugate_gradient(fvp, b: Tensor, iters: int = 10, tol: float = 1e-10) -> Tensor:
    """Solve ``F x = b`` for symmetric positive-definite ``F`` given as ``fvp(v) = F v``."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        fp = fvp(p)
        alpha = rr / (p @ fp)
        x += alpha * p
        r -= alpha * fp
        rr_new = r @ r
        if rr_new < tol:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def trpo_step(
    policy,
    obs: Tensor,
    actions: Tensor,
    advantages: Tensor,
    old_logp: Tensor,
    old_mean: Tensor,
    old_cov: Tensor,
    *,
    max_kl: float,
    cg_iters: int = 10,
    damping: float = 0.1,
    backtrack_steps: int = 10,
    backtrack_ratio: float = 0.5,
) -> dict:
    """One TRPO update of ``policy`` in place. Returns ``kl`` (of the accepted step, 0 when
    none was accepted), ``improvement`` of the surrogate, ``step_fraction`` and ``accepted``.
    ``policy`` owns its distribution (``log_prob``, ``kl``: :class:`~trpl_fast.rl.policies.GaussianPolicy`)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    old_params = parameters_to_vector(params).detach().clone()

    def surrogate() -> Tensor:
        mean, cov = policy(obs)
        logp = policy.log_prob(mean, cov, actions)
        return (torch.exp(logp - old_logp) * advantages).mean()

    def mean_kl() -> Tensor:
        mean, cov = policy(obs)
        return policy.kl(old_mean, old_cov, mean, cov).mean()  # KL(old || new)

    loss = surrogate()
    grad = flat_grad(loss, params).detach()
    grad_kl = flat_grad(mean_kl(), params, create_graph=True)

    def fvp(v: Tensor) -> Tensor:
        return flat_grad(grad_kl @ v, params, retain_graph=True).detach() + damping * v

    direction = conjugate_gradient(fvp, grad, cg_iters)
    shs = 0.5 * (direction @ fvp(direction))
    if not torch.isfinite(shs) or shs <= 0:
        return {"kl": 0.0, "improvement": 0.0, "step_fraction": 0.0, "accepted": False}
    full_step = direction * torch.sqrt(max_kl / shs)
    with torch.no_grad():
        base = loss.item()
        frac = 1.0
        for _ in range(backtrack_steps):
            vector_to_parameters(old_params + frac * full_step, params)
            new_kl, improvement = mean_kl().item(), surrogate().item() - base
            if new_kl <= max_kl and improvement > 0:
                return {"kl": new_kl, "improvement": improvement, "step_fraction": frac, "accepted": True}
            frac *= backtrack_ratio
        vector_to_parameters(old_params, params)
    return {"kl": 0.0, "improvement": 0.0, "step_fraction": 0.0, "accepted": False}
