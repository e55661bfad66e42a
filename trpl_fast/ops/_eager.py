"""The operators' eager fast path: Triton kernels launched without the dispatcher.

An eager call of ``torch.ops.trpl.project_*`` goes through the dispatcher, the
generated autograd wrapper of the custom op, a redispatch into the Python body, the
metadata checks and the launcher, and its backward through the backward op the same way:
~0.15-0.25 ms of host work per call on an H100 (bench/RESULTS.md), more than the
kernels themselves below ~1M rows (on the CPU ~0.1 ms, more than the KL ops' C kernels
at the training loop's size). :meth:`ProjectionOp.apply` (``_common.py``) takes this
path instead when the call is eager on plain tensors (:func:`takes_fast_path`) and one of
the op's backends takes the inputs (``ProjectionOp.eager_path``: the Triton launchers on
CUDA, the fused full-KL kernel, the CPU implementations): a ``torch.autograd.Function``
whose forward and backward call the same code the operator would (``wrap_triton`` turned
off, as in a ``triton_op`` body), with the metadata checks, row shapes and bound layout
worked out once per input signature (:class:`EagerPlan`, cached per backend) and the
launch geometry cached per shape in the kernels.

Everything else keeps the operators: ``torch.compile`` (dynamo, and the
``FunctionalTensorMode`` it traces with), any other dispatch mode (``make_fx``, fake
tensors, ...), ``torch.func`` transforms, tensor subclasses, inputs the kernels do not take
(the op's own predicate, e.g. the full KL kernel's ``d <= 32``; half precision on the
CPU; the compiled large-batch sizes) and empty batches. Both paths run the same code, so
they agree bit for bit (tested); :func:`set_eager_fast_path` switches the fast path off
(for comparisons and debugging). Like the operators, its backward is first order: a
double backward is refused with an error.

The fast path has no host synchronization and allocates only its outputs (and, for float64
with scalar bounds, the per-row bound tensors the launchers build), so it can be captured
in a CUDA graph like the ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

try:  # what a ``triton_op`` body runs under eagerly: wrap_triton hands back the kernel itself
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # correct without it, only slower (each launch through wrap_triton's op)

    def _set_wrap_triton_enabled(enabled):
        return contextlib.nullcontext()


_ENABLED = True
# input signatures whose plan is kept per op; beyond, the cache starts again (a workload
# cycles through a handful of shapes)
MAX_PLANS = 256


def set_eager_fast_path(enabled: bool) -> None:
    """Turn the ops' eager fast path on (the default) or off (every call through the
    ``torch.library`` operators). Process-wide."""
    global _ENABLED
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be a bool, got {enabled!r}")
    _ENABLED = enabled


def eager_fast_path_enabled() -> bool:
    return _ENABLED


_PLAIN_TYPES = (Tensor, nn.Parameter)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def takes_fast_path(mean: Tensor, cov: Tensor) -> bool:
    """Whether this call may bypass the operators: the fast path is on, nothing traces
    (no ``torch.compile``, ``torch.jit.trace``, dispatch mode or ``torch.func`` transform) and the inputs
    are plain tensors (the old policy and bounds are checked by the plan)."""
    return (
        _ENABLED
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and type(mean) in _PLAIN_TYPES
        and type(cov) in _PLAIN_TYPES
        and torch._C._len_torch_dispatch_stack() == 0
        and not _functorch_active()
    )


def _bound_key(bound):
    if bound is None:
        return None
    return (type(bound), bound.shape, bound.dtype, bound.device, bound.is_contiguous())


class EagerPlan(NamedTuple):
    """What one input signature needs, worked out (and checked) once: the batch shape
    and ``d``, the (rows, d[, d]) shapes of the mean-like and covariance-like tensors,
    whether inputs already are rows (``flat``: one batch dimension), the output shapes,
    the compute dtype and how each bound becomes a (rows,) tensor (``None``: scalar;
    ``"view"``: it already is one; ``"convert"``: broadcast / cast it)."""

    batch: torch.Size
    flat: bool
    mean_rows: tuple
    cov_rows: tuple
    mean_shape: torch.Size
    cov_shape: torch.Size
    aux_shapes: tuple
    compute_dtype: torch.dtype
    mean_bound: str | None
    cov_bound: str | None


def _as_rows(t: Tensor, shape: tuple, flat: bool) -> Tensor:
    """``t`` as contiguous rows of ``shape`` (a view when it is contiguous)."""
    if t.is_contiguous():
        return t if flat else t.view(shape)
    return t.reshape(shape).contiguous()


def _shaped(t: Tensor, shape, flat: bool) -> Tensor:
    """An output row tensor in the op's output shape, contiguous (as the op returns it: a
    torch implementation may hand back a transposed factor)."""
    return t.contiguous() if flat else t.reshape(shape).contiguous()


class EagerPath:
    """One op's fast path: its launchers (``forward(mean, cov, old_mean, old_cov,
    mean_bound, cov_bound, mean_bound_value, cov_bound_value) -> (mean_t, cov_t, *aux)`` on
    contiguous rows, ``backward(grad_mean, grad_cov, mean, cov, old_mean, old_cov, *aux,
    bounds...) -> (grad_mean, grad_cov)``), the predicate saying which inputs they take,
    and the plans by input signature."""

    def __init__(self, spec, forward: Callable, backward: Callable, applies: Callable[[Tensor], bool]):
        self.spec = spec
        self.forward, self.backward, self.applies = forward, backward, applies
        self.plans: dict = {}

    def plan(self, mean, cov, old_mean, old_cov, mean_bound, cov_bound) -> EagerPlan | None:
        """The plan for these inputs' signature (checked and made on the first call), or
        None when the fast path does not take them (an empty batch, a subclass for the old
        policy or a bound)."""
        key = (
            mean.shape,
            cov.shape,
            old_mean.shape,
            old_cov.shape,
            mean.dtype,
            cov.dtype,
            old_mean.dtype,
            old_cov.dtype,
            mean.device,
            cov.device,
            old_mean.device,
            old_cov.device,
            type(old_mean),
            type(old_cov),
            _bound_key(mean_bound),
            _bound_key(cov_bound),
        )
        try:
            return self.plans[key]
        except KeyError:
            pass
        plan = self._make_plan(mean, cov, old_mean, old_cov, mean_bound, cov_bound)
        if len(self.plans) >= MAX_PLANS:
            self.plans.clear()
        self.plans[key] = plan
        return plan

    def _make_plan(self, mean, cov, old_mean, old_cov, mean_bound, cov_bound) -> EagerPlan | None:
        from ._common import compute_dtype

        spec = self.spec
        batch, d = spec.check(mean, cov, old_mean, old_cov, mean_bound, cov_bound)  # raises on bad metadata
        tensors = [old_mean, old_cov] + [b for b in (mean_bound, cov_bound) if b is not None]
        if any(type(t) not in _PLAIN_TYPES for t in tensors) or batch.numel() == 0:
            return None
        cdt = compute_dtype(mean.dtype)
        rows = batch.numel()

        def bound_mode(b):
            if b is None:
                return None
            flat_ok = b.shape == (rows,) and len(batch) == 1 and b.dtype == cdt and b.is_contiguous()
            return "view" if flat_ok else "convert"

        return EagerPlan(
            batch=batch,
            flat=len(batch) == 1,
            mean_rows=(rows, d),
            cov_rows=(rows,) + (d,) * spec.cov_event_dims,
            mean_shape=mean.shape,
            cov_shape=cov.shape,
            aux_shapes=tuple(tuple(batch) + (d,) * a.rank for a in spec.aux),
            compute_dtype=cdt,
            mean_bound=bound_mode(mean_bound),
            cov_bound=bound_mode(cov_bound),
        )

    def __call__(self, mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv):
        """The op's outputs by this backend (chosen by ``ProjectionOp.eager_path``: the call
        is eager on plain tensors and ``applies``), or None when the plan refuses it."""
        plan = self.plan(mean, cov, old_mean, old_cov, mean_bound, cov_bound)
        if plan is None:
            return None
        mb = _flat_bound(mean_bound, plan.mean_bound, plan)
        cb = _flat_bound(cov_bound, plan.cov_bound, plan)
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (mean, cov, old_mean, old_cov, mean_bound, cov_bound)
        ):  # (as the operators: outputs that require grad, gradients for mean and cov only)
            return EagerProjection.apply(self, plan, mean, cov, old_mean, old_cov, mb, cb, mbv, cbv)
        return self.run_forward(plan, mean, cov, old_mean, old_cov, mb, cb, mbv, cbv)[0]

    def run_forward(self, plan: EagerPlan, mean, cov, old_mean, old_cov, mb, cb, mbv, cbv):
        """(outputs in the inputs' shapes, the row tensors the backward needs)."""
        flat = plan.flat
        rows = (
            _as_rows(mean, plan.mean_rows, flat),
            _as_rows(cov, plan.cov_rows, flat),
            _as_rows(old_mean, plan.mean_rows, flat),
            _as_rows(old_cov, plan.cov_rows, flat),
        )
        with _set_wrap_triton_enabled(False):
            outs = self.forward(*rows, mb, cb, float(mbv), float(cbv))
        shaped = (
            _shaped(outs[0], plan.mean_shape, flat),
            _shaped(outs[1], plan.cov_shape, flat),
            *(_shaped(a, s, flat) for a, s in zip(outs[2:], plan.aux_shapes)),
        )
        return shaped, rows, outs[2:]

    def run_backward(self, plan: EagerPlan, grad_mean, grad_cov, rows, aux, mb, cb, mbv, cbv):
        flat, dtype, backward = plan.flat, rows[0].dtype, self.backward
        as_rows = _as_rows
        if any(g is not None and not torch._C._has_storage(g) for g in (grad_mean, grad_cov)):
            # batched gradients (autograd.grad(is_grads_batched=True) vmaps the backward):
            # no kernel can read them; the op's torch implementation of the same formulas
            # runs instead (the operators have no batching rule at all). The fused full-KL
            # kernel's aux outputs have no torch counterpart: its backward then fails, as
            # the op's does.
            backward = self.spec.impl_backward
            rows = [r.to(plan.compute_dtype) for r in rows]
            as_rows = lambda t, shape, _flat: t.reshape(shape)  # noqa: E731 (batched: no strides)
        like = dict(dtype=rows[0].dtype, device=rows[0].device)
        grad_mean = (
            torch.zeros(plan.mean_rows, **like)
            if grad_mean is None
            else as_rows(grad_mean.to(like["dtype"]), plan.mean_rows, flat)
        )
        grad_cov = (
            torch.zeros(plan.cov_rows, **like)
            if grad_cov is None
            else as_rows(grad_cov.to(like["dtype"]), plan.cov_rows, flat)
        )
        with _set_wrap_triton_enabled(False):
            gm, gc = backward(grad_mean, grad_cov, *rows, *aux, mb, cb, float(mbv), float(cbv))
        return _shaped(gm.to(dtype), plan.mean_shape, flat), _shaped(gc.to(dtype), plan.cov_shape, flat)


def _flat_bound(bound, mode, plan: EagerPlan):
    if mode is None:
        return None
    if mode == "view":
        return bound
    return bound.to(plan.compute_dtype).expand(plan.batch).reshape(-1).contiguous()


class EagerProjection(torch.autograd.Function):
    """The fast path's autograd node: forward and backward are the op's launchers; the
    auxiliary outputs get no gradient, nor do the old policy and the bounds (as the ops)."""

    @staticmethod
    def forward(ctx, path, plan, mean, cov, old_mean, old_cov, mb, cb, mbv, cbv):
        outs, rows, aux = path.run_forward(plan, mean, cov, old_mean, old_cov, mb, cb, mbv, cbv)
        ctx.save_for_backward(*rows, mb, cb, *aux)
        ctx.set_materialize_grads(False)  # an unused output's gradient: None, no zeros made
        ctx.path, ctx.plan, ctx.bound_values = path, plan, (mbv, cbv)
        if len(outs) > 2:
            ctx.mark_non_differentiable(*outs[2:])
        return outs

    @staticmethod
    def backward(ctx, grad_mean, grad_cov, *_aux_grads):
        saved = ctx.saved_tensors
        rows, (mb, cb), aux = saved[:4], saved[4:6], saved[6:]
        with torch.no_grad():
            gm, gc = ctx.path.run_backward(ctx.plan, grad_mean, grad_cov, rows, aux, mb, cb, *ctx.bound_values)
        deps = [t for t in (grad_mean, grad_cov, rows[0], rows[1]) if t is not None and t.requires_grad]
        if torch.is_grad_enabled() and deps:
            # create_graph: these gradients depend on the inputs through a first-order
            # formula (kernels, implicit differentiation); differentiating them raises, as
            # through the operators, instead of a second derivative silently missing a term
            gm, gc = _FirstOrderOnly.apply(gm, gc, *deps)
        return None, None, gm, gc, None, None, None, None, None, None


class _FirstOrderOnly(torch.autograd.Function):
    """Passes gradients through; differentiating them raises (no double backward)."""

    @staticmethod
    def forward(ctx, grad_mean, grad_cov, *deps):
        return grad_mean.view_as(grad_mean), grad_cov.view_as(grad_cov)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "trpl_fast: the projection's backward is not differentiable (a double backward, or a "
            "gradient taken with create_graph=True differentiated again, through the projection)"
        )
