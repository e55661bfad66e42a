"""Value checks for the public API: one fused reduction and one host sync per call.

Shape, dtype and device checks need no data and live in the op bodies
(:func:`trpl_fast.ops._common.check_metadata`); the checks here read values (finite,
positive, triangular, symmetric positive definite), so they cost a device-to-host sync.
They run in eager mode by default and are skipped while ``torch.compile`` traces
(``check_values=False`` skips them on a hot path).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

KINDS = ("frob", "w2", "kl")
FORMS = ("diag", "full")


def check_kind(kind) -> str:
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def split_bound(name: str, bound, like: Tensor):
    """A bound as (tensor or None, float): floats go to the kernels as scalars."""
    if isinstance(bound, bool) or bound is None:
        raise ValueError(f"{name} must be a positive float or a tensor of the batch shape, got {bound!r}")
    if isinstance(bound, numbers.Real):
        value = float(bound)
        if not value > 0.0 or value == float("inf"):
            raise ValueError(f"{name} must be a finite number > 0, got {bound!r}")
        return None, value
    if isinstance(bound, Tensor):
        if not bound.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {bound.dtype}")
        if bound.device != like.device:
            raise ValueError(f"{name} is on {bound.device} but mean is on {like.device}")
        return bound, 0.0
    raise ValueError(f"{name} must be a positive float or a tensor of the batch shape, got {type(bound).__name__}")


def validate_values(
    form: str,
    kind: str,
    mean: Tensor,
    cov: Tensor,
    old_mean: Tensor,
    old_cov: Tensor,
    mean_bound: Tensor | None,
    cov_bound: Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the first bad argument. ``cov`` is std (diag) or the
    factor (full): a lower Cholesky factor (frob, kl) or a symmetric root (w2)."""
    cov_name = "std" if form == "diag" else "factor"
    checks: list[tuple[str, Tensor]] = []  # (message, bool tensor that must be True)
    for name, t in (("mean", mean), (cov_name, cov), ("old_mean", old_mean), (f"old_{cov_name}", old_cov)):
        checks.append((f"{name} has non-finite values (NaN or inf)", torch.isfinite(t).all()))
    for name, b in (("mean_bound", mean_bound), ("cov_bound", cov_bound)):
        if b is not None:
            checks.append((f"{name} must be finite and > 0 everywhere", (torch.isfinite(b) & (b > 0)).all()))
    if form == "diag":
        checks.append(("std must be > 0 everywhere", (cov > 0).all()))
        checks.append(("old_std must be > 0 everywhere", (old_cov > 0).all()))
    elif kind == "w2":
        for name, q in (("factor", cov), ("old_factor", old_cov)):
            scale = q.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
            sym = ((q - q.mT).abs() <= 1e-5 * scale).all()
            checks.append((f"{name} must be symmetric (kind='w2' takes the symmetric square root)", sym))
            pd = (
                torch.linalg.cholesky_ex(q.to(torch.float64) if q.dtype in (torch.float16, torch.bfloat16) else q).info
                == 0
            )
            checks.append((f"{name} must be positive definite (kind='w2' takes the symmetric square root)", pd.all()))
    else:
        for name, c in (("factor", cov), ("old_factor", old_cov)):
            checks.append(
                (
                    f"{name} must be lower triangular (a Cholesky factor; the strict upper triangle must be 0)",
                    (c.triu(1) == 0).all(),
                )
            )
            checks.append(
                (f"{name} must have a positive diagonal (a Cholesky factor)", (c.diagonal(dim1=-2, dim2=-1) > 0).all())
            )
    checks += _range_checks(form, kind, cov, old_cov, cov_name)
    ok = torch.stack([c for _, c in checks]).tolist()  # the one host sync
    for (message, _), good in zip(checks, ok):
        if not good:
            raise ValueError(message)


def _range_checks(form: str, kind: str, cov: Tensor, old_cov: Tensor, cov_name: str):
    """Inputs that are finite but whose projection the compute dtype cannot represent
    (issue 13): refused with a message rather than a silent NaN or pass-through. Frobenius
    works with variances (float64 inside for float32 inputs, so only float64 inputs can
    overflow: std or factor entries past ~1e154); W2 diagonal with the std ratio."""
    out = []
    if kind == "frob" and cov.dtype == torch.float64:
        for name, c in ((cov_name, cov), (f"old_{cov_name}", old_cov)):
            sq = c * c if form == "diag" else (c * c).sum(-1)
            out.append(
                (
                    f"{name} is too large for kind='frob' in float64: its variances (std**2, "
                    f"or the row norms of the factor squared) overflow",
                    torch.isfinite(2.0 * sq).all(),
                )
            )
    if kind == "w2" and form == "diag":
        out.append(
            (
                f"std / old_std overflows {cov.dtype} (kind='w2' works with the std ratio)",
                torch.isfinite(cov / old_cov).all(),
            )
        )
    return out
