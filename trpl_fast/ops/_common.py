"""Helpers shared by the operator definitions: dtypes, flattening, metadata checks and the
operator factory that wires forward op, backward op, CPU kernel and autograd together."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ._compiled_cpu import wants_compiled
from ._eager import EagerPath, takes_fast_path

HALF_DTYPES = (torch.float16, torch.bfloat16)

# Device types whose tensors the ops hand to their Triton launchers (the tests add "cpu" to
# run the kernels through the ops under TRITON_INTERPRET).
KERNEL_DEVICE_TYPES = ("cuda",)

# Set by :func:`torch_func_mode`: the ops are being differentiated by ``torch.func.grad``.
_TORCH_FUNC = False


def in_torch_func_mode() -> bool:
    """Inside :func:`torch_func_mode` (callers skip side effects such as stashing outputs
    for later: a tensor kept past ``torch.func.grad`` would be one of its wrappers)."""
    return _TORCH_FUNC


@contextlib.contextmanager
def torch_func_mode():
    """Within: :meth:`ProjectionOp.apply` on CPU tensors (diagonal covariances: the ops
    with a Triton launcher, whose bodies are traced anyway) takes a ``torch.autograd.Function``
    with ``setup_context`` around the same forward / backward implementations, which
    ``torch.func.grad`` (and dynamo tracing it) can differentiate. The ``torch.library``
    operators cannot be, on the torch versions this was written with: their generated
    autograd wrapper has no ``setup_context`` (pytorch/pytorch#170834). A flag set by the
    caller, because neither ``maybe_current_level`` nor ``is_functorch_wrapped_tensor``
    can be traced by dynamo. CUDA tensors keep the operators (and their kernels)."""
    global _TORCH_FUNC
    before, _TORCH_FUNC = _TORCH_FUNC, True
    try:
        yield
    finally:
        _TORCH_FUNC = before


SUPPORTED_DTYPES = (torch.float32, torch.float64) + HALF_DTYPES


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16 / fp16 are computed in float32; float32 and float64 in themselves."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def to_float64(*tensors):
    """``tensors`` (None allowed) in float64: the ops that need the range or the precision
    of float64 for float32 inputs compute in it and round once at the end."""
    return [None if t is None else t.to(torch.float64) for t in tensors]


class Aux(NamedTuple):
    """A per-state auxiliary output of a forward op: ``name``, ``rank`` (0: one value per
    state; 1: a (d,) vector; 2: a (d, d) matrix) and ``dtype`` (``"compute"``: the op's
    compute dtype, :func:`compute_dtype` of the input's; or a fixed ``torch.dtype``). The
    op's fake kernel allocates exactly these; they get no gradient."""

    name: str
    rank: int
    dtype: str | torch.dtype

    def empty(self, batch, d: int, input_dtype: torch.dtype, device) -> Tensor:
        dtype = compute_dtype(input_dtype) if self.dtype == "compute" else self.dtype
        return torch.empty(tuple(batch) + (d,) * self.rank, dtype=dtype, device=device)


def check_metadata(names, tensors, event_dims: int, bounds) -> tuple:
    """Shape / dtype / device checks that need no data (safe under tracing).

    ``names`` and ``tensors`` are the distribution inputs, all of the same shape
    ``(*batch, d)`` for means and ``(*batch, d[, d])`` for the covariance parameters;
    ``event_dims`` is a parallel tuple (1 or 2). ``bounds`` are (name, tensor-or-None)
    pairs that must broadcast to ``batch``. Returns ``(batch_shape, d)``.
    """
    first = tensors[0]
    if first.dim() < 1:
        raise ValueError(f"{names[0]} must have at least 1 dimension (..., d), got a scalar")
    d = first.shape[-1]
    batch = first.shape[:-1]
    if d < 1:
        raise ValueError(f"{names[0]} must have a non-empty last dimension, got shape {tuple(first.shape)}")
    for name, t, ed in zip(names, tensors, event_dims):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {names[0]} has {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {first.device}")
        want = tuple(batch) + (d,) * ed
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want} (batch {tuple(batch)}, d={d}), got {tuple(t.shape)}")
    for name, b in bounds:
        if b is None:
            continue
        if b.device != first.device:
            raise ValueError(f"{name} is on {b.device} but {names[0]} is on {first.device}")
        if not b.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {b.dtype}")
        try:
            ok = torch.broadcast_shapes(b.shape, batch) == batch
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} of shape {tuple(b.shape)} does not broadcast to the batch shape {tuple(batch)}")
    return batch, d


def flat_bound(bound: Tensor | None, batch, dtype) -> Tensor | None:
    """A per-state bound as a contiguous (rows,) tensor in the compute dtype, or None."""
    if bound is None:
        return None
    return bound.to(dtype).expand(batch).reshape(-1).contiguous()


def _rows(t: Tensor, d: int, event_dims: int, dtype, contiguous: bool) -> Tensor:
    r = t.reshape((-1,) + (d,) * event_dims)
    if dtype is not None:
        r = r.to(dtype)
    return r.contiguous() if contiguous else r


def _empty(like: Tensor) -> Tensor:
    """A contiguous allocation of ``like``'s shape (outputs are contiguous whatever the
    inputs' strides; ``empty_like`` would copy a transposed input's)."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


class ProjectionOp:
    """Defines the operators ``trpl::<name>`` and ``trpl::<name>_backward`` (``triton_op``s
    when there is a Triton launcher, opaque ``custom_op``s otherwise; see ``_make_op``).

    Forward schema: ``(mean, cov, old_mean, old_cov, mean_bound?, cov_bound?,
    mean_bound_value, cov_bound_value) -> (mean_t, cov_t, *aux)``, a fixed tuple, where
    ``cov`` is the covariance parameter (std (..., d) or a factor (..., d, d)), bounds are
    optional per-state tensors broadcastable to the batch shape (else the float values are
    used), and ``aux`` are the per-state extras the op declares (:class:`Aux`: the KL dual
    variable, convergence flags, ...) that get no gradient but are handed to the backward.
    Fake kernels only allocate these outputs.

    Backward schema: ``(grad_mean_t, grad_cov_t, mean, cov, old_mean, old_cov, aux,
    bounds...) -> [grad_mean, grad_cov]``. The old policy is a constant: no gradient.

    ``impl`` / ``impl_backward`` are the vectorized-torch implementations on flattened rows
    ((rows, d) and (rows, d[, d]) tensors in float32/float64, (rows,) bounds or None, then
    the two float values); they run on CPU, and on every device when there is no launcher.
    ``launch`` / ``launch_backward`` are the Triton launchers used on CUDA (same arguments,
    contiguous, in the input dtype: the kernels upcast half precision themselves).
    ``eager``: further ``(forward, backward, takes(mean))`` backends of the eager fast path
    with the launchers' arguments (the fused full-KL kernel); the launchers come first, the
    CPU implementations last (:meth:`eager_path`).
    """

    def __init__(
        self,
        name: str,
        cov_event_dims: int,
        impl: Callable,
        impl_backward: Callable,
        launch: Callable | None = None,
        launch_backward: Callable | None = None,
        aux: tuple[Aux, ...] = (),
        large_batch: tuple[Callable, Callable] | None = None,
        eager: tuple[tuple[Callable, Callable, Callable[[Tensor], bool]], ...] = (),
    ):
        self.name = name
        self.cov_name = "std" if cov_event_dims == 1 else "factor"
        self.cov_event_dims = cov_event_dims
        self.impl, self.impl_backward = impl, impl_backward
        self.launch, self.launch_backward = launch, launch_backward
        # aux outputs, per state (KL: the dual variable, a bool flag, and what its backward
        # reuses). Their impls also take ``early_exit``.
        if not all(isinstance(a, Aux) for a in aux):
            raise TypeError("aux must be a tuple of Aux(name, rank, dtype)")
        self.aux = tuple(aux)
        # (forward, backward) for large batches of real CPU tensors, same arguments as the
        # impls: compiled kernels (``_compiled_cpu``)
        self.large_batch = large_batch
        # the eager fast path's backends (``_eager``), first applicable first: the Triton
        # launchers, the op's other ``(forward, backward, takes(mean))`` with the
        # launchers' arguments (a fused kernel), and on the CPU the implementations the
        # op's CPU kernel runs (the KL ones pick their C kernels themselves)
        backends = ((launch, launch_backward, self._kernel_device),) if launch is not None else ()
        backends += tuple(eager) + ((self._cpu_forward, impl_backward, self._cpu_implementation),)
        self.eager = tuple(EagerPath(self, *b) for b in backends)
        self.forward_op = self._define_forward()
        self.backward_op = self._define_backward()
        self._register_autograd()
        self._function = self._define_function()

    def apply(self, mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv):
        """The forward op; or the eager fast path (``_eager``: an eager call one of the
        op's backends takes -- its Triton kernels, a fused kernel, its CPU implementation --
        run without the dispatcher; the same code, the same outputs); or
        under :func:`torch_func_mode` on CPU the same computation as a
        ``torch.func``-differentiable ``autograd.Function`` (same outputs, same backward)
        -- for the ops whose body ``torch.compile`` traces anyway (those with a Triton
        launcher); the opaque ones stay opaque (see ``_make_op``)."""
        path = self.eager_path(mean, cov)
        if path is not None:
            out = path(mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv)
            if out is not None:
                return out
        if _TORCH_FUNC and self.launch is not None and mean.device.type == "cpu":
            return self._function.apply(self, mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv)
        return self.forward_op(mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv)

    def check(self, mean, cov, old_mean, old_cov, mean_bound, cov_bound):
        names = ("mean", self.cov_name, "old_mean", f"old_{self.cov_name}")
        ev = (1, self.cov_event_dims, 1, self.cov_event_dims)
        return check_metadata(
            names, (mean, cov, old_mean, old_cov), ev, [("mean_bound", mean_bound), ("cov_bound", cov_bound)]
        )

    def eager_path(self, mean: Tensor, cov: Tensor) -> EagerPath | None:
        """The eager fast path's backend for this call (chosen here), or None: the call
        goes through the operator (traced, switched off, or no backend takes it)."""
        if not self.eager or not takes_fast_path(mean, cov):
            return None
        return next((path for path in self.eager if path.applies(mean)), None)

    def _cpu_forward(self, mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv):
        """The implementation as the op's CPU kernel calls it (iterative solves stop early:
        the tensors are real)."""
        kw = {"early_exit": True} if self.aux else {}
        return self.impl(mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv, **kw)

    def _cpu_implementation(self, mean: Tensor) -> bool:
        """The fast path's test for the CPU implementations: float32 / float64 CPU tensors
        (half precision goes through the op, which computes it in float32) of a batch the
        compiled large-batch implementations (where the op has them) do not want."""
        return (
            mean.device.type == "cpu"
            and mean.dtype in (torch.float32, torch.float64)
            and not (self.large_batch is not None and wants_compiled(mean))
        )

    @staticmethod
    def _kernel_device(mean: Tensor) -> bool:
        return mean.device.type in KERNEL_DEVICE_TYPES

    def uses_kernel(self, mean: Tensor, allow_kernel: bool, backward: bool) -> bool:
        """The backend, chosen here only: the Triton launcher for CUDA tensors when the op
        has one (and the caller allows it), else the vectorized-torch implementation.
        (The eager fast path, ``self.eager``, launches the same kernels for the same
        tensors; an opaque op's implementation picks its fused kernel itself.)"""
        launch = self.launch_backward if backward else self.launch
        return allow_kernel and launch is not None and self._kernel_device(mean)

    def uses_large_batch_path(self, rows: Tensor, real_cpu: bool) -> bool:
        """Whether real CPU (rows, d[, d]) tensors take the compiled large-batch
        implementations (``_compiled_cpu``: the op has them and the batch is large)."""
        return real_cpu and self.large_batch is not None and rows.device.type == "cpu" and wants_compiled(rows)

    def _to_rows(self, tensors, d, use_kernel, cdt):
        # (mean-like, cov-like) pairs: event dims alternate 1, cov_event_dims
        ev = [1 if i % 2 == 0 else self.cov_event_dims for i in range(len(tensors))]
        return [_rows(t, d, e, None if use_kernel else cdt, use_kernel) for t, e in zip(tensors, ev)]

    def run_forward(
        self,
        mean,
        cov,
        old_mean,
        old_cov,
        mean_bound,
        cov_bound,
        mbv,
        cbv,
        allow_kernel: bool,
        early_exit: bool = False,
    ):
        """``allow_kernel``: use the Triton launcher for CUDA tensors. ``early_exit``: the
        tensors are real CPU tensors, so iterative solves may stop on a host check."""
        batch, d = self.check(mean, cov, old_mean, old_cov, mean_bound, cov_bound)
        cdt = compute_dtype(mean.dtype)
        use_kernel = self.uses_kernel(mean, allow_kernel, backward=False)
        rows = self._to_rows([mean, cov, old_mean, old_cov], d, use_kernel, cdt)
        mb, cb = flat_bound(mean_bound, batch, cdt), flat_bound(cov_bound, batch, cdt)
        if use_kernel and rows[0].shape[0] == 0:  # no zero-sized grids
            outs = [rows[0].clone(), rows[1].clone()] + [a.empty((0,), d, mean.dtype, mean.device) for a in self.aux]
        elif use_kernel:
            outs = self.launch(*rows, mb, cb, float(mbv), float(cbv))
        else:
            kw = {"early_exit": early_exit} if self.aux else {}
            impl = self.large_batch[0] if self.uses_large_batch_path(rows[1], early_exit) else self.impl
            outs = impl(*rows, mb, cb, float(mbv), float(cbv), **kw)
        # contiguous, as the fake kernel allocates them (a QR-built factor comes out transposed)
        aux = [a.reshape(tuple(batch) + tuple(a.shape[1:])).contiguous() for a in outs[2:]]
        return (
            outs[0].to(mean.dtype).reshape(mean.shape).contiguous(),
            outs[1].to(mean.dtype).reshape(cov.shape).contiguous(),
            *aux,
        )

    def fake_forward(self, mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv):
        """The forward's outputs as allocations only (metadata checks, no data)."""
        batch, d = self.check(mean, cov, old_mean, old_cov, mean_bound, cov_bound)
        return (_empty(mean), _empty(cov), *[a.empty(batch, d, mean.dtype, mean.device) for a in self.aux])

    def fake_backward(self, grad_mean, grad_cov, mean, cov, old_mean, old_cov, aux, mean_bound, cov_bound, mbv, cbv):
        self.check(mean, cov, old_mean, old_cov, mean_bound, cov_bound)
        return _empty(mean), _empty(cov)

    def run_backward(
        self,
        grad_mean,
        grad_cov,
        mean,
        cov,
        old_mean,
        old_cov,
        aux,
        mean_bound,
        cov_bound,
        mbv,
        cbv,
        allow_kernel: bool,
        real_cpu: bool = False,
    ):
        """``real_cpu``: the tensors are real CPU tensors (the CPU kernel), not traced."""
        batch, d = self.check(mean, cov, old_mean, old_cov, mean_bound, cov_bound)
        if grad_mean.shape != mean.shape or grad_cov.shape != cov.shape:
            raise ValueError("grad_mean / grad_cov must have the shapes of mean / cov")
        cdt = compute_dtype(mean.dtype)
        use_kernel = self.uses_kernel(mean, allow_kernel, backward=True)
        rows = self._to_rows(
            [grad_mean.to(mean.dtype), grad_cov.to(mean.dtype), mean, cov, old_mean, old_cov], d, use_kernel, cdt
        )
        n_batch = len(mean.shape) - 1
        aux_rows = [a.reshape((-1,) + tuple(a.shape[n_batch:])).contiguous() for a in aux]
        mb, cb = flat_bound(mean_bound, batch, cdt), flat_bound(cov_bound, batch, cdt)
        if use_kernel and rows[0].shape[0] == 0:
            outs = [rows[0].clone(), rows[1].clone()]
        elif use_kernel:
            outs = self.launch_backward(*rows, *aux_rows, mb, cb, float(mbv), float(cbv))
        else:
            impl = self.large_batch[1] if self.uses_large_batch_path(rows[3], real_cpu) else self.impl_backward
            outs = impl(*rows, *aux_rows, mb, cb, float(mbv), float(cbv))
        return (
            outs[0].to(mean.dtype).reshape(mean.shape).contiguous(),
            outs[1].to(mean.dtype).reshape(cov.shape).contiguous(),
        )

    def _make_op(self, qualname, body, fake):
        """A ``triton_op`` when there is a Triton launcher (its body traces under
        ``torch.compile`` and branches on the device); an opaque ``custom_op`` with a fake
        kernel otherwise (pure batched linear algebra: inductor decomposing it produced
        wrong gradients for the full-covariance Frobenius op on torch 2.13 CPU)."""
        if self.launch is not None:
            return torch.library.triton_op(qualname, body, mutates_args=())
        op = torch.library.custom_op(qualname, body, mutates_args=())
        op.register_fake(fake)
        return op

    def _define_forward(self):
        spec = self

        def forward(
            mean: Tensor,
            cov: Tensor,
            old_mean: Tensor,
            old_cov: Tensor,
            mean_bound: Tensor | None,
            cov_bound: Tensor | None,
            mean_bound_value: float,
            cov_bound_value: float,
        ):
            # a triton_op body may be traced (torch.compile): no host checks there; an
            # opaque custom_op body always runs on real tensors
            eager_cpu = spec.launch is None and mean.device.type == "cpu"
            return spec.run_forward(
                mean,
                cov,
                old_mean,
                old_cov,
                mean_bound,
                cov_bound,
                mean_bound_value,
                cov_bound_value,
                allow_kernel=True,
                early_exit=eager_cpu,
            )

        # the schema's fixed output tuple: mean_t, cov_t and the declared aux outputs
        forward.__annotations__["return"] = tuple.__class_getitem__((Tensor,) * (2 + len(self.aux)))
        op = self._make_op(f"trpl::{self.name}", forward, spec.fake_forward)

        # real CPU tensors: the torch implementation (the Triton launcher only where the
        # tests add "cpu" to KERNEL_DEVICE_TYPES, under TRITON_INTERPRET)
        @op.register_kernel("cpu")
        def _(mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv):
            return spec.run_forward(
                mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv, allow_kernel=True, early_exit=True
            )

        return op

    def _define_backward(self):
        spec = self

        def backward(
            grad_mean: Tensor,
            grad_cov: Tensor,
            mean: Tensor,
            cov: Tensor,
            old_mean: Tensor,
            old_cov: Tensor,
            aux: list[Tensor],
            mean_bound: Tensor | None,
            cov_bound: Tensor | None,
            mean_bound_value: float,
            cov_bound_value: float,
        ) -> tuple[Tensor, Tensor]:
            return spec.run_backward(
                grad_mean,
                grad_cov,
                mean,
                cov,
                old_mean,
                old_cov,
                aux,
                mean_bound,
                cov_bound,
                mean_bound_value,
                cov_bound_value,
                allow_kernel=True,
            )

        op = self._make_op(f"trpl::{self.name}_backward", backward, spec.fake_backward)

        @op.register_kernel("cpu")
        def _(grad_mean, grad_cov, mean, cov, old_mean, old_cov, aux, mean_bound, cov_bound, mbv, cbv):
            return spec.run_backward(
                grad_mean,
                grad_cov,
                mean,
                cov,
                old_mean,
                old_cov,
                aux,
                mean_bound,
                cov_bound,
                mbv,
                cbv,
                allow_kernel=True,
                real_cpu=True,
            )

        return op

    def _define_function(self):
        # the op travels as an argument, not a closure: dynamo traces the Function's
        # forward and backward only through objects it can name (a closure cell it cannot)
        class Projection(torch.autograd.Function):
            @staticmethod
            def forward(spec, mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv):
                out = spec.run_forward(
                    mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv, allow_kernel=False
                )
                return tuple(o.clone() for o in out)

            @staticmethod
            def setup_context(ctx, inputs, output):
                inputs[0]._setup_context(ctx, inputs[1:], output)
                ctx.spec = inputs[0]

            @staticmethod
            def backward(ctx, *grads):
                return (None, *ctx.spec._backward(ctx, *grads, through_op=False))

        Projection.__name__ = Projection.__qualname__ = f"{self.name}_function"
        return Projection

    @staticmethod
    def _setup_context(ctx, inputs, output):
        mean, cov, old_mean, old_cov, mean_bound, cov_bound, mbv, cbv = inputs
        ctx.save_for_backward(mean, cov, old_mean, old_cov, mean_bound, cov_bound, *output[2:])
        ctx.bound_values = (mbv, cbv)
        if len(output) > 2:
            ctx.mark_non_differentiable(*output[2:])

    def _backward(self, ctx, grad_mean, grad_cov, *_aux_grads, through_op: bool = True):
        """The forward op's registered backward (through the backward op), or the
        ``autograd.Function``'s (``through_op=False``: the implementation itself, as its
        forward). Aux outputs get no gradient; neither does the old policy."""
        mean, cov, old_mean, old_cov, mean_bound, cov_bound, *aux = ctx.saved_tensors
        if grad_mean is None:
            grad_mean = torch.zeros_like(mean)
        if grad_cov is None:
            grad_cov = torch.zeros_like(cov)
        args = (grad_mean, grad_cov, mean, cov, old_mean, old_cov, aux, mean_bound, cov_bound, *ctx.bound_values)
        gm, gc = self.backward_op(*args) if through_op else self.run_backward(*args, allow_kernel=False)
        return gm, gc, None, None, None, None, None, None

    def _register_autograd(self):
        self.forward_op.register_autograd(self._backward, setup_context=self._setup_context)
