"""Policy and value losses of the on-policy algorithms (paper Eq. 12; PPO)."""

from __future__ import annotations

import torch
from torch import Tensor


def weighted_mean(x: Tensor, weight: Tensor | None = None) -> Tensor:
    """``mean(x)``, or ``sum(w x) / sum(w)`` with per-row weights (0 / 1 masks of the rows a
    minibatch really holds: fixed-size minibatches keep static shapes). No host sync."""
    if weight is None:
        return x.mean()
    return (x * weight).sum() / weight.sum().clamp_min(1.0)


def importance_ratio(logp: Tensor, logp_old: Tensor) -> Tensor:
    return torch.exp(logp - logp_old)


def surrogate_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, weight: Tensor | None = None) -> Tensor:
    """``-mean(ratio * A)``: the TRPL objective (the projection keeps the policy in the
    trust region, so there is no clipping; paper Eq. 12 without the regression term)."""
    return -weighted_mean(importance_ratio(logp, logp_old) * advantages, weight)


def ppo_clip_loss(
    logp: Tensor, logp_old: Tensor, advantages: Tensor, clip: float, weight: Tensor | None = None
) -> Tensor:
    """PPO's clipped surrogate ``-mean(min(ratio A, clip(ratio, 1 - eps, 1 + eps) A))``."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    ratio = importance_ratio(logp, logp_old)
    return -weighted_mean(torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages), weight)


def value_loss(
    values: Tensor,
    returns: Tensor,
    old_values: Tensor | None = None,
    clip: float | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """``0.5 mean((V - R)^2)``; with ``clip`` PPO's clipped variant
    ``0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))``."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * weighted_mean(unclipped, weight)
    if old_values is None:
        raise ValueError("old_values is required for a clipped value loss")
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    return 0.5 * weighted_mean(torch.maximum(unclipped, clipped), weight)
