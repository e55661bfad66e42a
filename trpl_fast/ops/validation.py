"""Value checks for the public API: one host read per call (or none: deferred).

Shape, dtype and device checks need no data and live in the op bodies
(:func:`trpl_fast.ops._common.check_metadata`); the checks here read values (finite,
positive, triangular, symmetric positive definite): torch reductions, or for diagonal
covariances on CUDA one Triton kernel (``kernels/validation.py``: one launch instead of
one reduction per check, the same messages). They run in eager mode by default and
are skipped while ``torch.compile`` traces or a CUDA graph is captured
(``check_values=False`` skips them on a hot path).

Modes (:func:`check_mode`): ``"sync"`` reads the result at once and raises in the call
that got the bad input -- a device-to-host sync on CUDA, free on the CPU, where it is the
default. ``"deferred"`` (the default on CUDA) keeps the host free: the checks' result is
copied to pinned host memory behind the call's work and read once it has arrived -- at the
next checked call, or at :func:`raise_deferred_errors` (which waits) -- and raised there as
the same ``ValueError``, marked as deferred. ``check_values="sync"`` is the debug switch.
"""

from __future__ import annotations

import collections
import numbers
import threading
from collections.abc import Callable
from typing import NamedTuple

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


def check_mode(check_values, device: torch.device) -> str:
    """``"off"``, ``"sync"`` or ``"deferred"`` for a ``check_values`` argument (``True``:
    deferred on CUDA, sync elsewhere; ``False``: off; or the mode's name)."""
    if check_values is True:
        return "deferred" if device.type == "cuda" else "sync"
    if check_values is False:
        return "off"
    if isinstance(check_values, str) and check_values in ("sync", "deferred"):
        return check_values
    raise ValueError(f"check_values must be True, False, 'sync' or 'deferred', got {check_values!r}")


class _Deferred(NamedTuple):
    """One call's checks in flight: their messages, the host copy of their results and
    whether (``ready``) / until when (``wait``) that copy is complete."""

    messages: tuple[str, ...]
    ok: Tensor
    ready: Callable[[], bool]
    wait: Callable[[], None]


_pending: collections.deque[_Deferred] = collections.deque()
_lock = threading.Lock()
# Checks in flight kept at most (a caller that never syncs): beyond, the oldest is waited for.
MAX_PENDING_CHECKS = 256
DEFERRED_NOTE = (
    "(deferred value check: found after the call that got this input returned; check_values='sync' raises in that call)"
)


def _defer(messages: tuple[str, ...], ok: Tensor) -> None:
    if ok.device.type == "cuda":
        # on the inputs' device (not necessarily the current one): the event must follow
        # the copy on the stream that runs it
        with torch.cuda.device(ok.device):
            host = torch.empty(ok.shape, dtype=ok.dtype, pin_memory=True)
            host.copy_(ok, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(ok.device))
        item = _Deferred(messages, host, event.query, event.synchronize)
    else:  # already computed: ready now, read at the next checked call
        item = _Deferred(messages, ok, lambda: True, lambda: None)
    with _lock:
        _pending.append(item)
        overflow = [_pending.popleft() for _ in range(len(_pending) - MAX_PENDING_CHECKS)]
    for old in overflow:
        _read(old, wait=True)


def _read(item: _Deferred, wait: bool = False) -> None:
    """Raise the first failed check of ``item`` (waiting for its copy first if asked)."""
    if wait:
        item.wait()
    for message, good in zip(item.messages, item.ok.tolist()):
        if not good:
            raise ValueError(f"{message} {DEFERRED_NOTE}")


def _pop(ready_only: bool) -> _Deferred | None:
    """The oldest check in flight (only if its result is in, with ``ready_only``), taken
    off the queue under the lock, or None."""
    with _lock:
        if _pending and (not ready_only or _pending[0].ready()):
            return _pending.popleft()
    return None


def _raise_ready() -> None:
    """Raise the first failure among the oldest checks whose results are in (no waiting);
    checks still in flight stay pending."""
    while (item := _pop(ready_only=True)) is not None:
        _read(item)


def raise_deferred_errors() -> None:
    """Wait for every deferred value check in flight and raise the first failure as the
    ``ValueError`` its call would have raised with ``check_values="sync"``; a no-op when
    none is pending (or on the CPU, where checks are synchronous by default). The queue is
    shared by the process's threads: a check may be raised in another thread than the call
    that queued it."""
    while (item := _pop(ready_only=False)) is not None:
        _read(item, wait=True)


def pending_value_checks() -> int:
    """How many deferred value checks are still unread."""
    return len(_pending)


def _finite_message(name: str) -> str:
    return f"{name} has non-finite values (NaN or inf)"


def _bound_message(name: str) -> str:
    return f"{name} must be finite and > 0 everywhere"


def _positive_message(name: str) -> str:
    return f"{name} must be > 0 everywhere"


def _frob_overflow_message(name: str) -> str:
    return (
        f"{name} is too large for kind='frob' in float64: its variances (std**2, "
        f"or the row norms of the factor squared) overflow"
    )


def _w2_ratio_message(dtype: torch.dtype) -> str:
    return f"std / old_std overflows {dtype} (kind='w2' works with the std ratio)"


def _diag_checks_fused(kind, mean, std, old_mean, old_std, mean_bound, cov_bound):
    """The diagonal checks as one kernel (``kernels/validation.py``): its messages in its
    slots' order -- the order of the torch checks -- and its (slots,) ``ok`` vector."""
    from ..kernels.validation import launch_check_diag

    d = mean.shape[-1]
    batch = mean.shape[:-1]
    rows = [t.reshape(-1, d).contiguous() for t in (mean, std, old_mean, old_std)]
    bounds = [None if b is None else b.expand(batch).reshape(-1).contiguous() for b in (mean_bound, cov_bound)]
    messages = (
        *(_finite_message(n) for n in ("mean", "std", "old_mean", "old_std")),
        _bound_message("mean_bound"),
        _bound_message("cov_bound"),
        _positive_message("std"),
        _positive_message("old_std"),
        _frob_overflow_message("std"),
        _frob_overflow_message("old_std"),
        _w2_ratio_message(std.dtype),
    )
    ok = launch_check_diag(*rows, *bounds, frob_f64=kind == "frob" and std.dtype == torch.float64, w2=kind == "w2")
    return messages, ok


def uses_check_kernel(form: str, mean: Tensor) -> bool:
    """The diagonal checks run as one Triton kernel on the devices the ops launch their
    kernels on (CUDA; one launch instead of one reduction per check), on real tensors of a
    non-empty batch."""
    from ._common import KERNEL_DEVICE_TYPES

    return (
        form == "diag"
        and mean.device.type in KERNEL_DEVICE_TYPES
        and mean.numel() > 0  # an empty batch: the bounds are still checked, by torch
        and torch._C._len_torch_dispatch_stack() == 0
    )


def validate_values(
    form: str,
    kind: str,
    mean: Tensor,
    cov: Tensor,
    old_mean: Tensor,
    old_cov: Tensor,
    mean_bound: Tensor | None,
    cov_bound: Tensor | None,
    mode: str = "sync",
) -> None:
    """Raise ``ValueError`` naming the first bad argument (``mode="sync"``), or queue the
    checks and raise the failures of earlier deferred ones whose results are in
    (``"deferred"``; see the module). ``cov`` is std (diag) or the factor (full): a lower
    Cholesky factor (frob, kl) or a symmetric root (w2)."""
    if mode == "deferred":
        _raise_ready()
    if uses_check_kernel(form, mean):
        messages, ok = _diag_checks_fused(kind, mean, cov, old_mean, old_cov, mean_bound, cov_bound)
    else:
        messages, ok = _checks_torch(form, kind, mean, cov, old_mean, old_cov, mean_bound, cov_bound)
    if mode == "deferred":
        _defer(messages, ok)
        return
    for message, good in zip(messages, ok.tolist()):  # the one host read
        if not good:
            raise ValueError(message)


def _checks_torch(form, kind, mean, cov, old_mean, old_cov, mean_bound, cov_bound):
    """The checks as torch reductions: their messages and a bool tensor, True where the
    check passed."""
    cov_name = "std" if form == "diag" else "factor"
    checks: list[tuple[str, Tensor]] = []  # (message, bool tensor that must be True)
    for name, t in (("mean", mean), (cov_name, cov), ("old_mean", old_mean), (f"old_{cov_name}", old_cov)):
        checks.append((_finite_message(name), torch.isfinite(t).all()))
    for name, b in (("mean_bound", mean_bound), ("cov_bound", cov_bound)):
        if b is not None:
            checks.append((_bound_message(name), (torch.isfinite(b) & (b > 0)).all()))
    if form == "diag":
        checks.append((_positive_message("std"), (cov > 0).all()))
        checks.append((_positive_message("old_std"), (old_cov > 0).all()))
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
    return tuple(m for m, _ in checks), torch.stack([c for _, c in checks])


def _range_checks(form: str, kind: str, cov: Tensor, old_cov: Tensor, cov_name: str):
    """Inputs that are finite but whose projection the compute dtype cannot represent
    (issue 13): refused with a message rather than a silent NaN or pass-through. Frobenius
    works with variances (float64 inside for float32 inputs, so only float64 inputs can
    overflow: std or factor entries past ~1e154); W2 diagonal with the std ratio."""
    out = []
    if kind == "frob" and cov.dtype == torch.float64:
        for name, c in ((cov_name, cov), (f"old_{cov_name}", old_cov)):
            sq = c * c if form == "diag" else (c * c).sum(-1)
            out.append((_frob_overflow_message(name), torch.isfinite(2.0 * sq).all()))
    if kind == "w2" and form == "diag":
        out.append((_w2_ratio_message(cov.dtype), torch.isfinite(cov / old_cov).all()))
    return out
