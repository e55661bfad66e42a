"""Functional API: ``project_diag`` and ``project_full``, dispatching to ``torch.ops.trpl``."""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import OPS
from .ops.validation import check_kind, check_mode, split_bound, validate_values

__all__ = ["project_diag", "project_full", "project"]


def project(
    form: str,
    mean: Tensor,
    cov: Tensor,
    old_mean: Tensor,
    old_cov: Tensor,
    *,
    kind: str,
    mean_bound,
    cov_bound,
    check_values: bool | str = True,
    return_aux: bool = False,
):
    """Shared body of :func:`project_diag` / :func:`project_full` (``form`` 'diag' / 'full')."""
    kind = check_kind(kind)
    if (kind, form) not in OPS:
        raise NotImplementedError(f"kind={kind!r} with {form} covariance is not implemented yet")
    for name, t in (
        ("mean", mean),
        ("old_mean", old_mean),
        ("std" if form == "diag" else "factor", cov),
        ("old_std" if form == "diag" else "old_factor", old_cov),
    ):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    # The old policy is a constant of the projection (MATH.md): no gradient flows to it.
    old_mean = old_mean.detach().to(mean.dtype) if old_mean.is_floating_point() else old_mean
    old_cov = old_cov.detach().to(mean.dtype) if old_cov.is_floating_point() else old_cov
    mb_t, mb_v = split_bound("mean_bound", mean_bound, mean)
    cb_t, cb_v = split_bound("cov_bound", cov_bound, mean)
    op = OPS[(kind, form)]
    mode = check_mode(check_values, mean.device)
    if mode != "off" and not torch.compiler.is_compiling() and not _capturing(mean):
        op.check(mean, cov, old_mean, old_cov, mb_t, cb_t)  # shapes first: clearer errors
        validate_values(form, kind, mean, cov, old_mean, old_cov, mb_t, cb_t, mode)
    out = op.apply(mean, cov, old_mean, old_cov, mb_t, cb_t, mb_v, cb_v)
    return tuple(out) if return_aux else (out[0], out[1])


def _capturing(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (no host reads then)."""
    if t.device.type != "cuda":
        return False
    with torch.cuda.device(t.device):
        return torch.cuda.is_current_stream_capturing()


def project_diag(
    mean: Tensor,
    std: Tensor,
    old_mean: Tensor,
    old_std: Tensor,
    *,
    kind: str,
    mean_bound,
    cov_bound,
    check_values: bool | str = True,
):
    """Project a diagonal Gaussian onto the trust region around the old one.

    Args:
        mean, std: (..., d) network outputs (``std > 0``); differentiable.
        old_mean, old_std: (..., d) the old policy, treated as a constant.
        kind: ``"frob"``, ``"w2"`` (scaled by the old covariance) or ``"kl"`` (MATH.md).
        mean_bound, cov_bound: floats > 0, or tensors broadcastable to the batch shape
            (...) for per-state trust regions. For ``"kl"`` the mean bound is on
            ``0.5 * maha``; for ``"frob"`` and ``"w2"`` on ``maha``.
        check_values: check values (finite, positive): ``True`` checks without blocking
            the host on CUDA (a bad input raises at a later checked call or at
            :func:`trpl_fast.raise_deferred_errors`) and at once on the CPU; ``"sync"``
            raises in this call everywhere (one host sync on CUDA; the debug switch);
            ``"deferred"`` defers everywhere; ``False`` skips them. Shapes, dtypes and
            devices are always checked.

    Returns:
        ``(mean_t, std_t)`` of the input dtype (float16 / bfloat16 computed in float32).
        Rows inside the region are returned unchanged.
    """
    return project(
        "diag",
        mean,
        std,
        old_mean,
        old_std,
        kind=kind,
        mean_bound=mean_bound,
        cov_bound=cov_bound,
        check_values=check_values,
    )


def project_full(
    mean: Tensor,
    factor: Tensor,
    old_mean: Tensor,
    old_factor: Tensor,
    *,
    kind: str,
    mean_bound,
    cov_bound,
    check_values: bool | str = True,
):
    """Project a full-covariance Gaussian onto the trust region around the old one.

    ``factor`` (..., d, d) is the lower Cholesky factor of the covariance for ``"frob"``
    and ``"kl"`` (``S = C C^T``) and the symmetric positive-definite square root for
    ``"w2"`` (``S = Q Q``); the returned factor is of the same type. Everything else as in
    :func:`project_diag`.
    """
    return project(
        "full",
        mean,
        factor,
        old_mean,
        old_factor,
        kind=kind,
        mean_bound=mean_bound,
        cov_bound=cov_bound,
        check_values=check_values,
    )
