"""The KL projection's CPU kernels (``kl_cpu.c``; full and diagonal covariances): built on
first use with the system's C compiler, cached on disk, called through ctypes (full: float64
arrays; diagonal: float32 or float64 arrays as they are, computed in float64), a
batch split across ``torch.get_num_threads()`` OpenMP threads of torch's own runtime (the
library binds to the ``libgomp.so.1`` torch has loaded; a second pool of threads -- tried
first, Python threads around the ctypes call -- lost half its time to torch's OpenMP
workers spinning on the same two cores after each torch op: 8.2 vs 4.4 ms per forward +
backward at 512 x 17, measured).

Why C and not torch: per state the projection is a few thousand multiply-adds on 17 x 17
matrices, and batched ``torch.linalg`` spends its time around them -- ``eigvalsh`` is a
serial loop of LAPACK calls (3.4 ms for 512 states of d = 17 on this project's 2-core CPU,
one or two threads alike) and each of the ~20 other batched calls of a forward + backward
costs 0.1-0.5 ms; one pass per state in C does the whole projection with the matrices in
L1 cache.

:func:`available` is False where no compiler works (warned once); the caller then keeps
the torch path. ``TRPL_FAST_CACHE_DIR`` moves the cache (default
``~/.cache/trpl_fast``); ``CC`` picks the compiler (default ``cc``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

# The largest d the kernel takes (its per-state matrices live on the stack; MAXD there)
MAX_D = 32
# Implicit QR steps per eigenvalue at most (Golub & Van Loan: about 2 on average)
QR_MAX_STEPS = 30
# Each thread gets at least this many states (a parallel region costs more than fewer save)
MIN_ROWS_PER_THREAD = 32
# Diagonal rows per thread at least (a row is ~d * 10 transcendental-bound Newton steps)
MIN_DIAG_ROWS_PER_THREAD = 256

_SOURCE = Path(__file__).with_name("kl_cpu.c")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed = False

_i64, _int, _f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_double
_ptr = ctypes.c_void_p


def _compile_flags(openmp: bool) -> list[str]:
    flags = ["-O3", "-fPIC", "-shared", "-fno-math-errno"] + (["-fopenmp"] if openmp else [])
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _build() -> ctypes.CDLL:
    try:
        return _build_with(openmp=True)
    except subprocess.CalledProcessError:  # a compiler without OpenMP: one thread
        return _build_with(openmp=False)


def _build_with(openmp: bool) -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    flags = _compile_flags(openmp)
    source = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(source + " ".join([cc, version, *flags, platform.machine()]).encode()).hexdigest()[:20]
    cache = Path(os.environ.get("TRPL_FAST_CACHE_DIR", Path.home() / ".cache" / "trpl_fast"))
    target = cache / f"kl_cpu-{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # built beside the target and renamed into place: concurrent processes never load
        # a half-written library
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True, check=True)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    lib.kl_full_cpu_forward.restype = _int
    lib.kl_full_cpu_forward.argtypes = [_i64, _int, _int] + [_ptr] * 5 + [_ptr, _i64, _ptr, _i64]
    lib.kl_full_cpu_forward.argtypes += [_int, _f64, _f64, _int, _ptr, _int] + [_ptr] * 6
    lib.kl_full_cpu_backward.restype = _int
    lib.kl_full_cpu_backward.argtypes = [_i64, _int, _int] + [_ptr] * 10 + [_ptr, _i64, _ptr, _i64]
    lib.kl_full_cpu_backward.argtypes += [_f64, _int, _ptr] + [_ptr] * 2
    lib.kl_diag_cpu_forward.restype = _int
    lib.kl_diag_cpu_forward.argtypes = [_i64, _int, _int, _int] + [_ptr] * 4 + [_ptr, _i64, _ptr, _i64]
    lib.kl_diag_cpu_forward.argtypes += [_int, _f64, _f64, _int, _ptr] + [_ptr] * 4
    lib.kl_diag_cpu_backward.restype = _int
    lib.kl_diag_cpu_backward.argtypes = [_i64, _int, _int, _int] + [_ptr] * 7 + [_ptr, _i64, _ptr, _i64]
    lib.kl_diag_cpu_backward.argtypes += [_f64, _int, _ptr] + [_ptr] * 2
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _failed
    if _lib is not None or _failed:
        return _lib
    with _lock:
        if _lib is None and not _failed:
            try:
                _lib = _build()
            except (OSError, subprocess.CalledProcessError) as e:
                _failed = True
                detail = getattr(e, "stderr", "") or str(e)
                warnings.warn(
                    f"trpl_fast: building the CPU KL kernel failed ({type(e).__name__}: {detail.strip()[:200]}); "
                    "the KL projection runs on torch instead (slower, same results)",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _lib


def available() -> bool:
    """Whether the CPU kernel could be built (builds it on the first call)."""
    return _library() is not None


def _threads(rows: int, min_rows: int = MIN_ROWS_PER_THREAD) -> int:
    """Threads for a batch of ``rows`` states: torch's count, at most one per ``min_rows``
    states."""
    return max(1, min(torch.get_num_threads(), rows // min_rows))


# every tensor a kernel reads or writes is made on the CPU, whatever torch's default device
_CPU64 = dict(dtype=torch.float64, device="cpu")


def _on_cpu(*tensors) -> None:
    """The kernels take host pointers: refuse anything else (an error, not a crash)."""
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"the CPU KL kernel takes CPU tensors, got one on {t.device}")


def _check(status: int) -> None:
    if status != 0:
        raise ValueError(f"the CPU KL kernel takes 1 <= d <= {MAX_D}")


@functools.lru_cache(maxsize=256)
def _scalar(value: float) -> torch.Tensor:
    """A float bound as a one-element float64 tensor, made once per value (read only)."""
    return torch.tensor([value], dtype=torch.float64, device="cpu")


def _bound(bound, value: float, rows: int):
    """(pointer holder, stride): a per-row float64 bound, or the float value with stride 0."""
    if bound is None:
        return _scalar(float(value)), 0
    return bound.to(torch.float64).expand(rows).contiguous(), 1


@functools.lru_cache
def _phi_series(series: tuple) -> torch.Tensor:
    """The series coefficients as a float64 tensor, made once (read only by the kernel)."""
    return torch.tensor(series, dtype=torch.float64, device="cpu")


def _matrices(*matrices) -> tuple[list[torch.Tensor], torch.Tensor]:
    """float64 (rows, d, d) batches as they are (any strides: the kernel reads them in
    place, no copy of a column-major factor) and their (batch, row, column) strides."""
    mats = [m.to(torch.float64) for m in matrices]
    return mats, torch.tensor([s for m in mats for s in m.stride()], dtype=torch.int64, device="cpu")


def launch_kl_full_cpu_fwd(
    mean, factor, old_mean, old_factor, mean_bound, cov_bound, mean_bound_value, cov_bound_value, constants
):
    """Forward on float64 CPU tensors: means (rows, d), lower factors (rows, d, d) (only
    lower triangles read), bounds (rows,) or None (then the float values), ``constants``:
    ``dict(max_iter, tol, phi_cut, phi_series)`` (the torch path's). Returns ``(mean_t,
    chol_t, t, converged, eigvals, u_inv)``: float64 (rows, d), (rows, d, d), (rows,), bool
    (rows,), eigenvalues of ``M = C_o^T L C_o`` ascending (rows, d), ``U^-1`` (rows, d, d)
    for ``G = (1 - t) I + t M = U U^T``."""
    _on_cpu(mean, factor, old_mean, old_factor, mean_bound, cov_bound)
    lib = _library()
    rows, d = mean.shape
    (factor, old_factor), strides = _matrices(factor, old_factor)
    mean, old_mean = mean.contiguous(), old_mean.contiguous()
    f64 = dict(dtype=torch.float64, device="cpu")
    outs = [
        torch.empty(rows, d, **f64),
        torch.empty(rows, d, d, **f64),
        torch.empty(rows, **f64),
        torch.empty(rows, dtype=torch.uint8, device="cpu"),
        torch.empty(rows, d, **f64),
        torch.empty(rows, d, d, **f64),
    ]
    (mb, mbs), (cb, cbs) = _bound(mean_bound, mean_bound_value, rows), _bound(cov_bound, cov_bound_value, rows)
    series = _phi_series(constants["phi_series"])
    args = [d, *(x.data_ptr() for x in (mean, factor, old_mean, old_factor, strides)), mb.data_ptr(), mbs]
    args += [
        cb.data_ptr(),
        cbs,
        constants["max_iter"],
        constants["tol"],
        constants["phi_cut"],
        series.numel(),
        series.data_ptr(),
    ]
    args += [QR_MAX_STEPS, *(o.data_ptr() for o in outs)]
    _check(lib.kl_full_cpu_forward(rows, _threads(rows), *args))
    return outs[0], outs[1], outs[2], outs[3].bool(), outs[4], outs[5]


def launch_kl_full_cpu_bwd(
    grad_mean,
    grad_factor,
    mean,
    factor,
    old_mean,
    old_factor,
    t,
    eigvals,
    u_inv,
    mean_bound,
    cov_bound,
    mean_bound_value,
    cov_bound_value,
    constants,
):
    """Implicit backward on float64 CPU tensors (the forward's inputs, its ``t``,
    ``eigvals`` and ``u_inv``) -> ``(grad_mean, grad_factor)``, float64, ``grad_factor``
    lower triangular."""
    _on_cpu(grad_mean, grad_factor, mean, factor, old_mean, old_factor, t, eigvals, u_inv, mean_bound, cov_bound)
    lib = _library()
    rows, d = mean.shape
    (grad_factor, factor, old_factor), strides = _matrices(grad_factor, factor, old_factor)
    grad_mean, mean, old_mean = (x.to(torch.float64).contiguous() for x in (grad_mean, mean, old_mean))
    ins = [grad_mean, grad_factor, mean, factor, old_mean, old_factor, strides]
    ins += [x.to(torch.float64).contiguous() for x in (t, eigvals, u_inv)]
    outs = [torch.empty(rows, d, **_CPU64), torch.empty(rows, d, d, **_CPU64)]
    (mb, mbs), (cb, cbs) = _bound(mean_bound, mean_bound_value, rows), _bound(cov_bound, cov_bound_value, rows)
    series = _phi_series(constants["phi_series"])
    args = [d, *(x.data_ptr() for x in ins), mb.data_ptr(), mbs, cb.data_ptr(), cbs]
    args += [constants["phi_cut"], series.numel(), series.data_ptr(), *(o.data_ptr() for o in outs)]
    _check(lib.kl_full_cpu_backward(rows, _threads(rows), *args))
    return outs[0], outs[1]


DIAG_DTYPES = (torch.float32, torch.float64)


def launch_kl_diag_cpu_fwd(
    mean, std, old_mean, old_std, mean_bound, cov_bound, mean_bound_value, cov_bound_value, constants
):
    """Forward on (rows, d) CPU tensors of one dtype, float32 or float64 (computed in
    float64), bounds (rows,) or None (then the float values), ``constants`` as for the full
    kernel. Returns ``(mean_t, std_t, t, converged)`` in the input dtype (``converged``
    bool), as ``ops.kl.kl_diag``."""
    _on_cpu(mean, std, old_mean, old_std, mean_bound, cov_bound)
    lib = _library()
    rows, d = mean.shape
    ins = [x.contiguous() for x in (mean, std, old_mean, old_std)]
    like = dict(dtype=mean.dtype, device="cpu")
    outs = [torch.empty(rows, d, **like), torch.empty(rows, d, **like)]
    outs += [torch.empty(rows, **like), torch.empty(rows, dtype=torch.uint8, device="cpu")]
    (mb, mbs), (cb, cbs) = _bound(mean_bound, mean_bound_value, rows), _bound(cov_bound, cov_bound_value, rows)
    series = _phi_series(constants["phi_series"])
    args = [d, int(mean.dtype == torch.float32), *(x.data_ptr() for x in ins), mb.data_ptr(), mbs, cb.data_ptr()]
    args += [cbs, constants["max_iter"], constants["tol"], constants["phi_cut"], series.numel(), series.data_ptr()]
    _check(
        lib.kl_diag_cpu_forward(rows, _threads(rows, MIN_DIAG_ROWS_PER_THREAD), *args, *(o.data_ptr() for o in outs))
    )
    return outs[0], outs[1], outs[2], outs[3].view(torch.bool)


def launch_kl_diag_cpu_bwd(
    grad_mean,
    grad_std,
    mean,
    std,
    old_mean,
    old_std,
    t,
    mean_bound,
    cov_bound,
    mean_bound_value,
    cov_bound_value,
    constants,
):
    """Implicit backward on (rows, d) CPU tensors of the forward's dtype (the forward's
    inputs and its ``t``) -> ``(grad_mean, grad_std)`` in that dtype."""
    _on_cpu(grad_mean, grad_std, mean, std, old_mean, old_std, t, mean_bound, cov_bound)
    lib = _library()
    rows, d = mean.shape
    ins = [x.to(mean.dtype).contiguous() for x in (grad_mean, grad_std, mean, std, old_mean, old_std, t)]
    outs = [torch.empty(rows, d, dtype=mean.dtype, device="cpu"), torch.empty(rows, d, dtype=mean.dtype, device="cpu")]
    (mb, mbs), (cb, cbs) = _bound(mean_bound, mean_bound_value, rows), _bound(cov_bound, cov_bound_value, rows)
    series = _phi_series(constants["phi_series"])
    args = [d, int(mean.dtype == torch.float32), *(x.data_ptr() for x in ins), mb.data_ptr(), mbs, cb.data_ptr()]
    args += [cbs, constants["phi_cut"], series.numel(), series.data_ptr()]
    _check(
        lib.kl_diag_cpu_backward(rows, _threads(rows, MIN_DIAG_ROWS_PER_THREAD), *args, *(o.data_ptr() for o in outs))
    )
    return outs[0], outs[1]
