"""Shared Triton helpers: typed loads, per-row bounds and launch geometry."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, offs, mask, other, F64: tl.constexpr):
    """Load a tile and upcast to the compute dtype (float64 or float32)."""
    x = tl.load(ptr + offs, mask=mask, other=other)
    if F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def wide(x):
    """``x`` in float64 (the Frobenius kernels compute in it whatever the storage dtype)."""
    return x.to(tl.float64)


@triton.jit
def narrow(x, F64: tl.constexpr):
    """A float64 result back to the compute dtype before a store (the store then rounds
    float32 to half precision itself; a direct float64 -> bfloat16 store gives NaN in the
    interpreter)."""
    if F64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def row_norm(x):
    """Euclidean norm of each row of a tile, the squares taken of ``x / max|x|``: no
    overflow where ``sum x^2`` would (the torch path's ``scaled_norm``)."""
    big = tl.max(tl.abs(x), axis=1)
    big = tl.where(big > 0.0, big, 1.0)
    xs = x / big[:, None]
    return big * tl.sqrt(tl.sum(xs * xs, axis=1))


@triton.jit
def load_row_bound(ptr, rows, row_mask, value, HAS_TENSOR: tl.constexpr, F64: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Per-row bound: from a (rows,) tensor if given, else the scalar ``value`` (float32
    only: Triton passes a Python float as a float32 scalar, so ``launch_rows`` hands float64
    kernels their bounds as tensors)."""
    if HAS_TENSOR:
        return load_tile(ptr, rows, row_mask, 1.0, F64)
    else:
        tl.static_assert(not F64, "float64 bounds must come as tensors (see launch_rows)")
        return tl.zeros([BLOCK_ROWS], dtype=tl.float32) + value


# Overrides of every launcher's tile size (elements per program) and warps, for
# bench/tune_rows.py's sweep; None: the launcher's own choice.
TILE_ELEMENTS: int | None = None
NUM_WARPS: int | None = None
# The launchers' defaults, from that sweep on an H100 (1M rows, d = 17, float32; see
# bench/RESULTS.md): 4096-element tiles ran 2.5-5x slower than 512-1024 (fewer registers
# per thread, more programs in flight); the KL Newton loop prefers the smaller tile.
DEFAULT_TILE, DEFAULT_WARPS = 1024, 4


def row_geometry(n_rows: int, d: int, elements_per_program: int = DEFAULT_TILE):
    """(BLOCK_ROWS, BLOCK_D, grid) for a kernel that gives each program whole rows; cached
    per shape (it is on every eager call's host path) -- plain ints only: under
    ``torch.compile`` with dynamic shapes ``n_rows`` is a SymInt, which cannot be hashed."""
    if type(n_rows) is int and type(d) is int and type(elements_per_program) is int:
        return _row_geometry(n_rows, d, elements_per_program)
    return _row_geometry.__wrapped__(n_rows, d, elements_per_program)


@functools.lru_cache(maxsize=1024)
def _row_geometry(n_rows, d, elements_per_program):
    block_d = triton.next_power_of_2(max(d, 1))
    block_rows = max(1, min(triton.next_power_of_2(max(n_rows, 1)), elements_per_program // block_d))
    return block_rows, block_d, (triton.cdiv(n_rows, block_rows),)


def on_device(like: torch.Tensor):
    """The context to launch a kernel on ``like``'s device: Triton launches on the current
    CUDA device, which need not be the tensors' (multi-GPU)."""
    if like.device.type == "cuda" and like.device.index != torch.cuda.current_device():
        return torch.cuda.device(like.device)
    return contextlib.nullcontext()


# (device, rows, value) -> a (rows,) float64 tensor of value: the scalar bounds of float64
# launches, made once (an allocation and a fill per call otherwise). Only eager launches on
# real tensors use it; the cache starts again past MAX_CACHED_BOUND_ELEMENTS elements.
_BOUND_ROWS: dict = {}
MAX_CACHED_BOUND_ELEMENTS = 1 << 22


def float64_bound_rows(value: float, n_rows: int, like: torch.Tensor) -> torch.Tensor:
    """A (n_rows,) float64 tensor of ``value`` on ``like``'s device (Triton passes a Python
    float as float32, so float64 kernels take scalar bounds as tensors). Cached for eager
    launches; made afresh while a CUDA graph is captured (the graph's pool keeps it, and a
    cached tensor could be freed under the graph later) or a graph is traced."""
    device = like.device
    eager = type(like) is torch.Tensor and not torch.compiler.is_compiling()
    if not eager or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.full((n_rows,), float(value), dtype=torch.float64, device=device)
    key = (device, n_rows, float(value))
    rows = _BOUND_ROWS.get(key)
    if rows is None:
        if sum(t.numel() for t in _BOUND_ROWS.values()) + n_rows > MAX_CACHED_BOUND_ELEMENTS:
            _BOUND_ROWS.clear()
        rows = _BOUND_ROWS[key] = torch.full((n_rows,), float(value), dtype=torch.float64, device=device)
    return rows


def bound_arg(bound: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an optional per-row bound (a dummy when it is a scalar)."""
    return like if bound is None else bound


@triton.jit
def row_tile(pid, n_rows, d, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row indices, row mask, element mask and int64 element offsets of one program's tile
    of a contiguous (n_rows, d) array."""
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < d)
    offs = rows.to(tl.int64)[:, None] * d + cols[None, :]
    return rows, row_mask, mask, offs


def launch_rows(
    kernel,
    inputs,
    outputs,
    mean_bound,
    cov_bound,
    mean_bound_value,
    cov_bound_value,
    tile: int = DEFAULT_TILE,
    warps: int = DEFAULT_WARPS,
    **extra,
):
    """Launch a row kernel with the argument order every projection kernel here uses:
    ``(*inputs, mean_bound_ptr, cov_bound_ptr, *outputs, n_rows, d, mean_bound_value,
    cov_bound_value, **extra, HAS_MEAN_BOUND, HAS_COV_BOUND, F64, BLOCK_ROWS, BLOCK_D)``.

    ``inputs[0]`` is (n_rows, d) and fixes the geometry (``tile`` elements and ``warps``
    warps per program); ``mean_bound`` / ``cov_bound`` are
    (n_rows,) tensors in the compute dtype, or None to use the scalar values.
    """
    from torch.library import wrap_triton

    n_rows, d = inputs[0].shape
    block_rows, block_d, grid = row_geometry(n_rows, d, TILE_ELEMENTS or tile)
    f64 = inputs[0].dtype == torch.float64
    if f64:
        # Triton passes a Python float argument as a float32 scalar: a float64 kernel would
        # see its bound rounded to 24 bits (measured on an H100: 1e-8 relative error). The
        # float64 path takes scalar bounds as per-row tensors instead.
        if mean_bound is None:
            mean_bound = float64_bound_rows(mean_bound_value, n_rows, inputs[0])
        if cov_bound is None:
            cov_bound = float64_bound_rows(cov_bound_value, n_rows, inputs[0])
    # the kernel itself in an eager call (``triton_op`` bodies and the ops' eager fast path
    # turn wrap_triton off); recorded as a graph node while torch.compile traces the body
    with on_device(inputs[0]):
        wrap_triton(kernel)[grid](
            *inputs,
            bound_arg(mean_bound, inputs[0]),
            bound_arg(cov_bound, inputs[0]),
            *outputs,
            n_rows,
            d,
            float(mean_bound_value),
            float(cov_bound_value),
            **extra,
            HAS_MEAN_BOUND=mean_bound is not None,
            HAS_COV_BOUND=cov_bound is not None,
            F64=f64,
            BLOCK_ROWS=block_rows,
            BLOCK_D=block_d,
            num_warps=NUM_WARPS or warps,
        )
    return outputs


@triton.jit
def load_projection_inputs(
    mean_ptr,
    std_ptr,
    old_mean_ptr,
    old_std_ptr,
    mean_bound_ptr,
    cov_bound_ptr,
    rows,
    row_mask,
    mask,
    offs,
    mean_bound_value,
    cov_bound_value,
    HAS_MEAN_BOUND: tl.constexpr,
    HAS_COV_BOUND: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """The tiles every diagonal projection kernel reads: ``mean, std, old_mean, old_std``
    (padded lanes: means 0, stds 1, so they add nothing to row sums) and the two per-row
    bounds."""
    mu = load_tile(mean_ptr, offs, mask, 0.0, F64)
    sd = load_tile(std_ptr, offs, mask, 1.0, F64)
    mu_o = load_tile(old_mean_ptr, offs, mask, 0.0, F64)
    sd_o = load_tile(old_std_ptr, offs, mask, 1.0, F64)
    eps_mu = load_row_bound(mean_bound_ptr, rows, row_mask, mean_bound_value, HAS_MEAN_BOUND, F64, BLOCK_ROWS)
    eps_cov = load_row_bound(cov_bound_ptr, rows, row_mask, cov_bound_value, HAS_COV_BOUND, F64, BLOCK_ROWS)
    return mu, sd, mu_o, sd_o, eps_mu, eps_cov
