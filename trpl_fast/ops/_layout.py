"""``rows_to_columns``: a (n, d) tensor as its contiguous (d, n) transpose, kept as a copy
by ``torch.compile``.

Inductor fuses a plain ``x.T.contiguous()`` into its consumers, which then read ``x`` with
stride d and are left as scalar loops. The masked Newton of the KL projections
(``kl.kl_dual_newton``) runs on the materialized (d, n) layout -- rows innermost, the sums
over d become adds of vectors -- and vectorizes: 16 iterations over 256 rows of d = 6 took
~300 us compiled on one AVX-512 core in the (n, d) layout, ~60-130 us in this one.

The copy is inductor's own stride-order primitive, lowered to a loop inside the compiled
graph. It replaced a ``torch.library`` custom op (``trpl::rows_to_columns``) that inductor
could not fuse either, but called back into Python from the compiled graph: ~14 us of a
~110 us compiled KL policy step (32 states, one thread; the profiler's count), measured
95-110 us per step with the primitive against 111-126 us with the op, same runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # registers torch.ops.prims.inductor_force_stride_order (a private, long-lived primitive)
    from torch._inductor import inductor_prims as _inductor_prims  # noqa: F401

    _force_stride_order = torch.ops.prims.inductor_force_stride_order
except (ImportError, AttributeError):  # pragma: no cover - a torch without it: correct, unfused
    _force_stride_order = None


def rows_to_columns(x: Tensor) -> Tensor:
    """``x`` (n, d) -> (d, n), contiguous: a copy (compiled, a loop of its own), or ``x.T``
    itself where that is already laid out so (n or d is 1). Read only; no gradient (used
    inside the operators' forward)."""
    n = x.shape[0]
    if _force_stride_order is None:
        return x.T.contiguous()
    return _force_stride_order(x.T, (n, 1))
