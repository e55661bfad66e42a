"""A minibatch step compiled whole: loss, gradient, clipping and Adam as one graph.

``torch.compile`` of the usual step (``zero_grad``, ``loss.backward()``, ``opt.step()``)
breaks the graph at ``Optimizer.zero_grad`` and at ``Tensor.backward`` (dynamo does not
trace the autograd engine): two or three compiled pieces glued by Python and the autograd
engine per step. For the paper's 64x64 MLPs and 32-64-state minibatches the glue is the
step's cost: measured on one CPU thread (loaded machine), a value step took 0.26-0.37 ms
eager and 0.71-0.81 ms compiled that way.

:class:`CompiledAdamStep` writes the step as a pure function instead -- the gradient by
``torch.func.grad`` over ``torch.func.functional_call``, then Adam written out on the
optimizer's own state tensors -- which dynamo traces into one graph (0.23 ms for the same
value step). The ``torch.optim.Adam`` object stays the owner of the state: checkpoints,
learning-rate schedules and the eager step keep working on it unchanged, and the eager
step is the oracle the tests compare this one with.
"""

from __future__ import annotations

import inspect
import itertools
import types
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

from ..ops import torch_func_mode


def supports(opt: torch.optim.Optimizer) -> bool:
    """``opt`` is an Adam this step reproduces: one parameter group, no weight decay,
    AMSGrad, maximization or complex parameters."""
    if not isinstance(opt, torch.optim.Adam) or len(opt.param_groups) != 1:
        return False
    g = opt.param_groups[0]
    return (
        not g["amsgrad"]
        and not g["maximize"]
        and g["weight_decay"] == 0
        and not any(p.is_complex() for p in g["params"])
    )


class CompiledAdamStep:
    """``step(*batch) -> losses``: one minibatch step of ``module`` with ``opt`` (an Adam
    over ``module.parameters()``), compiled whole.

    Args:
        module: the network whose parameters ``opt`` updates.
        opt: ``torch.optim.Adam`` (see :func:`supports`); its ``lr`` may be a float or a
            0-d tensor (changed in place by a schedule without recompiling).
        loss: ``loss(forward, *batch) -> losses``: ``forward(*args)`` runs ``module`` with
            the parameters being differentiated; ``losses`` a scalar or one loss per seed
            (S,) -- the gradient is that of their sum.
        clip: optional pure function ``grads -> grads`` (gradient-norm clipping).
    """

    def __init__(
        self,
        module: nn.Module,
        opt: torch.optim.Optimizer,
        loss: Callable[..., Tensor],
        clip: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ):
        if not supports(opt):
            raise ValueError("CompiledAdamStep needs a torch.optim.Adam with one group, no weight decay or amsgrad")
        named = list(module.named_parameters())
        if [id(p) for _, p in named] != [id(p) for p in opt.param_groups[0]["params"]]:
            raise ValueError("CompiledAdamStep: opt must hold exactly module.parameters(), in order")
        self.module, self.opt, self.loss, self.clip = module, opt, loss, clip
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._lr_tensor: Tensor | None = None
        self._lr_value: float | None = None
        # fullgraph: the guard filter drops every guard on ``self``, which is sound for the
        # one graph of this step's own code object; a graph break would compile other
        # frames (shared code, other locals) under the same filter -- an error instead
        self._compiled = torch.compile(
            _own_code(self._step), fullgraph=True, options=_compile_options(self.params[0].device)
        )

    def _state(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The optimizer's moment and step tensors, created as Adam creates them on its
        first step (a loaded state dict replaces them: looked up on every call)."""
        exp_avgs, exp_avg_sqs, steps = [], [], []
        fused = bool(self.opt.param_groups[0].get("fused"))
        for p in self.params:
            s = self.opt.state[p]
            if not s:
                s["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(s["exp_avg"])
            exp_avg_sqs.append(s["exp_avg_sq"])
            steps.append(s["step"])
        return exp_avgs, exp_avg_sqs, steps

    def _lr(self) -> Tensor:
        """The learning rate as a one-element tensor input. Not 0-d: dynamo traces a 0-d
        float64 tensor input as a symbolic Python float too, which its scalar pass then
        specializes by restarting the whole trace -- measured on the KL policy step (CPU,
        warm caches, torch 2.13), 8.1 s of compilation with the restart, 5.7 s without."""
        lr = self.opt.param_groups[0]["lr"]
        if isinstance(lr, Tensor):
            return lr.view(1)  # a view: a schedule's in-place change still reaches the step
        # a float lr as a tensor input: a new value must not recompile the step (compared
        # as Python floats: no device sync)
        if self._lr_tensor is None or self._lr_value != lr:
            self._lr_value = lr
            self._lr_tensor = torch.tensor([lr], dtype=torch.float64, device=self.params[0].device)
        return self._lr_tensor

    def __call__(self, *batch) -> Tensor:
        exp_avgs, exp_avg_sqs, steps = self._state()
        params = [p.detach() for p in self.params]  # the same storage: updated in place
        with torch_func_mode():  # the projection layers differentiable by torch.func (ops)
            return self._compiled(params, exp_avgs, exp_avg_sqs, steps, self._lr(), *batch)

    def _step(self, params, exp_avgs, exp_avg_sqs, steps, lr, *batch) -> Tensor:
        def objective(ps):
            def forward(*args):
                return functional_call(self.module, dict(zip(self.names, ps)), args)

            losses = self.loss(forward, *batch)
            return losses.sum(), losses.detach()

        grads, losses = grad(objective, has_aux=True)(params)
        if self.clip is not None:
            grads = self.clip(grads)
        group = self.opt.param_groups[0]
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        with torch.no_grad():
            # torch.optim.Adam's update (its single-tensor form), on its own state tensors
            for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                step.add_(1)
                bias1 = 1 - beta1**step
                bias2 = 1 - beta2**step
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / bias2.sqrt()).add_(eps)
                p.sub_((lr[0] / bias1).to(p.dtype) * m / denom)
        return losses


def _own_code(method):
    """``method`` bound to a copy of its function with a code object of its own: dynamo
    keeps its compiled graphs per code object, so every step gets a cache of its own and
    no graph can be looked up for another step's arguments (which is what lets
    :func:`_guard_on_arguments` drop the guards on ``self``)."""
    fn = method.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_step_ids)}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, method.__self__)


_step_ids = itertools.count()


def _guard_on_arguments(guards) -> list[bool]:
    """Dynamo guard filter for a step: keep the guards on its arguments (shapes, dtypes,
    list lengths, a Python ``int`` such as the entropy schedule's step) and on global
    torch state (grad mode, functorch stack); drop those on ``self`` and on module globals
    -- the network's structure, the optimizer's hyperparameters, the loss function and what
    it reads (the run's config and projection layer, the operators' modules) are fixed for
    the life of a :class:`CompiledAdamStep`, and a changed learning rate arrives as a
    tensor argument. Checking the ~250 dropped guards cost ~35 us of a 32-state KL
    step's ~170 on the CPU (one thread)."""
    return [g.name == "" or g.name.split(".")[0].split("[")[0] in _STEP_ARGUMENTS for g in guards]


def _compile_options(device: torch.device) -> dict:
    """``torch.compile`` options of a step. On the CPU the graph's wrapper is generated as
    C++ (``cpp_wrapper``) without per-call size asserts: the Python wrapper's ~85 buffer
    allocations and ~37 asserts per call took ~35 us of the KL step (measured, one thread)."""
    options = {}
    if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):  # guard filters exist (torch >= 2.7)
        options["guard_filter_fn"] = _guard_on_arguments
    if device.type == "cpu":
        options.update(cpp_wrapper=True, size_asserts=False)
    return options


def compiled_step(module, opt, loss, eager_step, clip=None, reaches: bool = True):
    """The step ``torch.compile`` gets: :class:`CompiledAdamStep` where it applies (``opt``
    :func:`supports`, and ``torch.func`` ``reaches`` through the loss), else ``eager_step``
    compiled around the autograd engine (graph breaks at ``zero_grad`` / ``backward``)."""
    if supports(opt) and reaches:
        return CompiledAdamStep(module, opt, loss, clip)
    return torch.compile(eager_step)


def func_grad_reaches(fn: Callable[..., Tensor], *args: Tensor) -> bool:
    """Whether ``torch.func.grad`` differentiates ``fn(*args)`` (w.r.t. the first argument)
    in eager mode, under :func:`~trpl_fast.ops.torch_func_mode` as the compiled step runs
    it: the projection operators on CUDA tensors do not (their torch.library autograd
    lacks ``setup_context`` on the torch versions this was written with,
    pytorch/pytorch#170834), so there the step takes the autograd-engine path."""
    try:
        with torch_func_mode():
            grad(lambda x: fn(x, *args[1:]).sum())(args[0])
    except RuntimeError:
        return False
    return True


def clip_by_total_norm(max_norm: float) -> Callable[[list[Tensor]], list[Tensor]]:
    """``torch.nn.utils.clip_grad_norm_`` as a pure function of the gradients."""

    def clip(grads: list[Tensor]) -> list[Tensor]:
        norm = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        return [g * coef for g in grads]

    return clip


def clip_by_seed_norm(max_norm: float) -> Callable[[list[Tensor]], list[Tensor]]:
    """Per-seed total-norm clipping (gradients with a leading seed dimension S), as
    :func:`trpl_fast.rl.multiseed.clip_grad_norm_per_seed` does in place."""

    def clip(grads: list[Tensor]) -> list[Tensor]:
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        return [g * coef.view(-1, *([1] * (g.dim() - 1))) for g in grads]

    return clip


# the names of CompiledAdamStep._step's arguments (the roots of the guards kept)
_STEP_ARGUMENTS = frozenset(list(inspect.signature(CompiledAdamStep._step).parameters)[1:])
