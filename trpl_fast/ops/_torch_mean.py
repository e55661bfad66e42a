"""Mean projection (MATH.md "Mean projection") in vectorized torch, forward and backward.

``prec_delta`` is ``L_o (mu - mu_o)`` (shape (rows, d)), computed by the caller from the
old covariance parametrization (elementwise for diagonal, triangular solves for full).
``eps`` is a (rows,) tensor or a float; KL callers pass ``2 eps_mu``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _scale(m: Tensor, eps):
    active = m > eps
    m_safe = torch.where(active, m, eps)
    return active, m_safe, torch.sqrt(eps / m_safe)


def mean_project(mean: Tensor, old_mean: Tensor, prec_delta: Tensor, eps) -> Tensor:
    delta = mean - old_mean
    active, _, scale = _scale((delta * prec_delta).sum(-1), eps)
    return torch.where(active.unsqueeze(-1), old_mean + scale.unsqueeze(-1) * delta, mean)


def mean_project_backward(grad: Tensor, mean: Tensor, old_mean: Tensor, prec_delta: Tensor, eps) -> Tensor:
    """``b g - (b / m) <g, delta> L_o delta`` on active rows, ``g`` elsewhere."""
    delta = mean - old_mean
    active, m_safe, scale = _scale((delta * prec_delta).sum(-1), eps)
    g_dot = (grad * delta).sum(-1)
    g = scale.unsqueeze(-1) * grad - (scale * g_dot / m_safe).unsqueeze(-1) * prec_delta
    return torch.where(active.unsqueeze(-1), g, grad)


def bound_or_value(bound, value: float):
    """The per-row bound tensor when there is one, else the float."""
    return value if bound is None else bound


def interpolation_scale(dist: Tensor, eps):
    """``(active, dist_safe, a)`` with ``a = sqrt(eps / dist)`` on rows where ``dist > eps``
    (the ``1 / (1 + eta)`` of the Frobenius and W2 projections); inactive rows get ``a = 1``
    so that ``x_o + a (x - x_o)`` is exact there too."""
    active = dist > eps
    dist_safe = torch.where(active, dist, eps)
    return active, dist_safe, torch.sqrt(eps / dist_safe)


def scaled_norm(x: Tensor, dims) -> Tensor:
    """``||x||`` over ``dims`` with the squares taken of ``x / max|x|``: no overflow where
    ``sum x^2`` would (float32 ``|x| > 1.8e19``), no underflow of a tiny row."""
    big = x.abs().amax(dims, keepdim=True)
    big = torch.where(big > 0, big, 1.0)
    return big.squeeze(dims) * torch.sqrt(((x / big) ** 2).sum(dims))


def interpolation_direction(x: Tensor, dims, eps):
    """``(active, a, unit)`` for the Frobenius / W2 interpolation ``x_o + a (x - x_o)``
    given the difference ``x`` (the distance is ``||x||^2`` over ``dims``): ``a = sqrt(eps)
    / ||x||`` where ``||x||^2 > eps`` (1 elsewhere) and ``unit = x / ||x||``, so that the
    backward's ``(a / dist) <g, x> x`` is ``a <g, unit> unit`` (nothing squared to overflow)."""
    norm = scaled_norm(x, dims)
    root_eps = torch.sqrt(eps) if isinstance(eps, Tensor) else eps**0.5
    active = norm > root_eps
    norm_safe = torch.where(active, norm, root_eps)
    shape = norm.shape + (1,) * (x.dim() - norm.dim())
    return active, (root_eps / norm_safe).reshape(shape), x / norm_safe.reshape(shape)
