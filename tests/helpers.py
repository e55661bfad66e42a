"""Input generators and the comparison helper shared by the tests."""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64


def assert_close(actual: Tensor, expected: Tensor, rtol: float, name: str = "value", atol: float = 0.0) -> None:
    """Normwise relative comparison ``max|a - e| <= rtol * max|e| + atol`` that reports
    where the worst element is, its two values and the error measured."""
    a, e = actual.detach().to(F64).cpu(), expected.detach().to(F64).cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    finite = torch.isfinite(a)
    if not finite.all():
        idx = tuple(int(i) for i in (~finite).nonzero()[0])
        raise AssertionError(f"{name}: non-finite value {a[idx].item()} at {idx}")
    if a.numel() == 0:
        return
    err = (a - e).abs()
    scale = e.abs().max().item()
    worst = err.max().item()
    if worst > rtol * scale + atol:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name}: max abs error {worst:.3e} at index {idx} (got {a[idx].item():.17g}, "
            f"expected {e[idx].item():.17g}); relative to max|expected| = {scale:.3e}: "
            f"{worst / max(scale, 1e-300):.3e} > rtol {rtol:.1e}; "
            f"{int((err > rtol * scale + atol).sum())} of {err.numel()} elements off"
        )


def random_rotation(batch, d, gen, dtype=F64) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(*batch, d, d, generator=gen, dtype=dtype))
    return q * torch.sign(r.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)


def random_spd(batch, d, gen, log_spread: float, dtype=F64) -> Tensor:
    """SPD matrices with eigenvalues ``exp(U(-log_spread, log_spread))``."""
    u = random_rotation(batch, d, gen, dtype)
    ev = torch.exp((2 * torch.rand(*batch, d, generator=gen, dtype=dtype) - 1) * log_spread)
    return u @ torch.diag_embed(ev) @ u.mT


def spd_sqrt(s: Tensor) -> Tensor:
    ev, u = torch.linalg.eigh(s)
    root = u @ torch.diag_embed(ev.clamp_min(0).sqrt()) @ u.mT
    return 0.5 * (root + root.mT)


def make_case(
    kind: str,
    form: str,
    batch,
    d: int,
    *,
    conditioning: str = "well",
    seed: int = 0,
    inside_fraction: float = 0.25,
    dtype=F64,
):
    """Random (mean, cov_param, old_mean, old_cov_param) in the API's parametrization.

    ``conditioning``: ``"well"`` (std / eigenvalues within a factor e^0.5 of 1) or
    ``"ill"`` (std spanning e^-3..e^3, eigenvalues of the covariance e^-4.5..e^4.5).
    About ``inside_fraction`` of the rows are a tiny perturbation of the old policy, so
    that they are inside the trust region for the bounds the tests use.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = tuple(batch)
    spread = 0.5 if conditioning == "well" else 3.0
    old_mean = torch.randn(*batch, d, generator=gen, dtype=F64)
    mean = old_mean + torch.randn(*batch, d, generator=gen, dtype=F64)
    near = torch.rand(*batch, generator=gen, dtype=F64) < inside_fraction
    if form == "diag":
        old_std = torch.exp((2 * torch.rand(*batch, d, generator=gen, dtype=F64) - 1) * spread)
        std = old_std * torch.exp(0.6 * torch.randn(*batch, d, generator=gen, dtype=F64))
        std_near = old_std * (1 + 1e-4 * torch.randn(*batch, d, generator=gen, dtype=F64))
        std = torch.where(near.unsqueeze(-1), std_near, std)
        cov, old_cov = std, old_std
    else:
        s_old = random_spd(batch, d, gen, 1.5 * spread)
        a = torch.eye(d, dtype=F64) + 0.4 * torch.randn(*batch, d, d, generator=gen, dtype=F64) / math.sqrt(d)
        s_new = a @ s_old @ a.mT
        s_new = torch.where(near[..., None, None], s_old * (1 + 1e-4), s_new)
        if kind == "w2":
            cov, old_cov = spd_sqrt(s_new), spd_sqrt(s_old)
        else:
            cov, old_cov = torch.linalg.cholesky(s_new), torch.linalg.cholesky(s_old)
    mean = torch.where(near.unsqueeze(-1), old_mean + 1e-4 * torch.randn(*batch, d, generator=gen, dtype=F64), mean)
    return tuple(t.to(dtype) for t in (mean, cov, old_mean, old_cov))
