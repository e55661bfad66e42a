"""Large CPU batches through inductor-compiled kernels (issue 12, "a CPU path that leads the
C++ peers").

Eagerly, each torch op of an implementation is a pass over memory: the KL diagonal
projection of 65,536 x 17 float64 states took ~126 ms forward + backward on 2 threads,
most of it ~100 unfused elementwise passes. Compiled by inductor (dynamic shapes, so one
graph serves every batch size), the same math runs as a few vectorized, OpenMP-parallel
loops. Compiling costs seconds once per process (inductor's on-disk cache keeps the
kernels between processes: measured ~50 s cold, ~5 s warm for the KL forward and
backward), so only batches of at least :func:`cpu_compile_min_elements` elements take
this path; smaller ones stay eager. Where no C++ compiler is available the first call
warns once and everything stays eager.

Only real CPU tensors come here (the operators' CPU kernels); traced calls compile as part
of the caller's graph instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

# Batches of at least this many elements (rows x d) take the compiled path by default: at
# 2^18 float64 elements (2 threads) an eager KL forward + backward costs ~38 ms and the
# compiled one ~7 ms, so the ~5 s warm-cache compile pays for itself within a few hundred
# calls of a training run (the ~50 s cold one within a few thousand).
DEFAULT_MIN_ELEMENTS = 1 << 18

_min_elements: int | None = DEFAULT_MIN_ELEMENTS
_compiled: dict[tuple[Callable, object], Callable] = {}
_unavailable = False


def set_cpu_compile_min_elements(n: int | None) -> None:
    """Batches of at least ``n`` elements (rows x d) run compiled on the CPU; ``None``
    turns the compiled CPU path off."""
    global _min_elements
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"min_elements must be a positive int or None, got {n!r}")
    _min_elements = n


def cpu_compile_min_elements() -> int | None:
    """The current threshold of :func:`set_cpu_compile_min_elements` (``None``: off)."""
    return _min_elements


def wants_compiled(rows: torch.Tensor) -> bool:
    """Whether the (rows, d) CPU batch ``rows`` is large enough for the compiled path."""
    return not _unavailable and _min_elements is not None and rows.numel() >= _min_elements


# Inductor options of the compiled CPU kernels. ``cpp.dynamic_threads``: every loop nest
# gets an OpenMP region whose thread count is read at run time. By default inductor
# decides parallelism from the sizes of the first call (a dynamic-shape graph first
# compiled for 32 x 6 states is serial) and its disk cache serves that graph to every
# later size and process: the KL diagonal backward at 65,536 x 17 float64 then ran on one
# thread, 12.8 ms instead of 6.5 ms on two (measured). Thread counts read at run time
# also follow a later ``torch.set_num_threads``.
COMPILE_OPTIONS = {"cpp.dynamic_threads": True}


def row_layout_options() -> dict:
    """:data:`COMPILE_OPTIONS` for kernels whose loops run along rows of d elements (the
    backward's row sums): 256-bit vectors where the CPU has them. Inductor vectorizes such
    loops along d with 16 float64 lanes on AVX-512, so d = 17 costs two vector steps of
    which one masked for a single element; with 8 lanes it is three steps of 8 (24 lanes for
    17 instead of 32). Measured on this project's 2-core AMD EPYC (Zen 5, AVX-512), KL
    diagonal backward 65,536 x 17 float64, alternating in one process: 8.3 vs 10.6 ms and
    4.1 vs 6.1 ms (two processes). The column-layout forward showed no difference."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return {**COMPILE_OPTIONS, "cpp.simdlen": 256}
    return COMPILE_OPTIONS


def run_compiled(fn: Callable, *args, key=None, options: dict | None = None):
    """``fn(*args)`` compiled (inductor, dynamic shapes, one graph), or ``None`` where
    compilation is unavailable (warned once; the caller then runs eagerly). ``fn`` takes
    tensors only: a float argument would be guarded on, and a new value would recompile.
    ``key``: what ``fn``'s graph is specialized to (e.g. a dimension it unrolls over); each
    key gets a compiled function of its own. ``options``: inductor's (default
    :data:`COMPILE_OPTIONS`), fixed at the first call for ``(fn, key)``."""
    global _unavailable
    compiled = _compiled.get((fn, key))
    if compiled is None:
        options = COMPILE_OPTIONS if options is None else options
        compiled = _compiled[(fn, key)] = torch.compile(fn, dynamic=True, fullgraph=True, options=options)
    # detached: an input that requires grad (the backward op gets the forward's leaves)
    # made the compiled call 2.5x slower, no_grad notwithstanding (measured: KL diag
    # backward, 65,536 x 17 float64, 16.5 vs 6.8 ms)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    try:
        with torch.no_grad():
            return compiled(*args)
    except Exception as e:  # noqa: BLE001 - no compiler / inductor failure: eager is correct
        if not _is_compile_failure(e):
            raise
        _unavailable = True
        warnings.warn(
            f"trpl_fast: compiling the CPU kernels failed ({type(e).__name__}); large CPU batches "
            "run eagerly from now on (slower, same results)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _is_compile_failure(e: Exception) -> bool:
    """A failure of dynamo / inductor (no compiler, a backend bug), not of the math."""
    import torch._inductor.exc
    from torch._dynamo.exc import TorchDynamoException

    kinds: tuple[type, ...] = (TorchDynamoException,)
    inductor_error = getattr(torch._inductor.exc, "InductorError", None)  # torch >= 2.7
    if inductor_error is not None:
        kinds += (inductor_error,)
    return isinstance(e, kinds)
