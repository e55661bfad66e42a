"""Batched linear-algebra helpers for the full-covariance operators."""

from __future__ import annotations

import torch
from torch import Tensor


def solve_lower(chol: Tensor, b: Tensor) -> Tensor:
    """``chol^-1 b`` for lower-triangular ``chol`` (..., d, d) and vectors ``b`` (..., d)."""
    return torch.linalg.solve_triangular(chol, b.unsqueeze(-1), upper=False).squeeze(-1)


def solve_lower_t(chol: Tensor, b: Tensor) -> Tensor:
    """``chol^-T b`` for lower-triangular ``chol`` and vectors ``b``."""
    return torch.linalg.solve_triangular(chol.mT, b.unsqueeze(-1), upper=True).squeeze(-1)


def inner(a: Tensor, b: Tensor) -> Tensor:
    """Frobenius inner product over the last two dims, shape (...)."""
    return (a * b).sum((-2, -1))


def cholesky_backward(chol: Tensor, grad_chol: Tensor) -> Tensor:
    """Gradient w.r.t. a symmetric matrix ``A`` given ``chol = cholesky(A)`` and
    ``dLoss/dchol``; the result is symmetric (Murray 2016, "Differentiation of the
    Cholesky decomposition"): ``A_bar = sym(L^-T Phi(L^T L_bar) L^-1)`` with ``Phi``
    taking the lower triangle and halving the diagonal."""
    phi = chol.mT @ grad_chol.tril()
    phi = phi.tril() - 0.5 * torch.diag_embed(phi.diagonal(dim1=-2, dim2=-1))
    x = torch.linalg.solve_triangular(chol.mT, phi, upper=True)  # L^-T phi
    x = torch.linalg.solve_triangular(chol.mT, x.mT, upper=True).mT  # (.) L^-1
    return 0.5 * (x + x.mT)
