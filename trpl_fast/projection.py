"""The user-facing trust-region projection layer (paper section 4; MATH.md).

``TrustRegionProjection`` projects a Gaussian policy's per-state mean and covariance onto
the trust region around the old policy (``frob``, ``w2`` or ``kl``), optionally followed by
entropy control, and provides the trust-region regression loss (paper Eq. 12) and the
per-epoch constraint metrics (paper Figure 2).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import distances as D
from .functional import project
from .ops import in_torch_func_mode
from .ops.validation import FORMS, check_kind, check_mode

__all__ = ["TrustRegionProjection", "EntropySchedule"]


@dataclass(frozen=True)
class EntropySchedule:
    """Target entropy ``beta(step)`` for entropy control (MATH.md "Entropy control").

    ``exp``:    ``beta = d kappa + (H_0 - d kappa) * tau ** (10 step / total_steps)``
    ``linear``: ``beta = H_0 + (d kappa - H_0) * min(1, step / total_steps)``

    ``kappa`` is the target entropy per action dimension, ``tau`` the temperature,
    ``initial_entropy`` (``H_0``) the entropy of the initial policy (whole distribution).
    """

    kappa: float
    total_steps: int
    initial_entropy: float
    tau: float = 0.5
    kind: str = "exp"

    def __post_init__(self):
        for name in ("kappa", "initial_entropy", "tau"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not isinstance(self.total_steps, numbers.Integral) or isinstance(self.total_steps, bool):
            raise ValueError(f"total_steps must be an int, got {self.total_steps!r}")
        if self.kind not in ("exp", "linear"):
            raise ValueError(f"entropy schedule kind must be 'exp' or 'linear', got {self.kind!r}")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {self.total_steps}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau (temperature) must be in (0, 1], got {self.tau}")

    def __call__(self, step: int, d: int) -> float:
        final = d * self.kappa
        if self.kind == "exp":
            return final + (self.initial_entropy - final) * self.tau ** (10.0 * step / self.total_steps)
        frac = min(1.0, max(0.0, step / self.total_steps))
        return self.initial_entropy + (final - self.initial_entropy) * frac


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class TrustRegionProjection(nn.Module):
    """Differentiable trust-region projection of Gaussian policies.

    Args:
        kind: ``"frob"``, ``"w2"`` or ``"kl"``.
        mean_bound, cov_bound: trust-region sizes (floats > 0, or per-state tensors passed
            at call time through ``forward(..., mean_bound=, cov_bound=)``).
        cov_form: ``"diag"`` (``cov`` is the std, (..., d)) or ``"full"`` (``cov`` is a
            (..., d, d) factor: lower Cholesky for frob / kl, symmetric root for w2).
        entropy_control: None, ``"ineq"`` (raise the entropy to ``beta`` if below) or
            ``"eq"`` (set it to ``beta``), applied after the projection.
        entropy_schedule: an :class:`EntropySchedule` giving ``beta(step)``; required with
            entropy control.
        contextual_cov: whether the covariance depends on the state; decides the form of
            the regression loss (MATH.md "Training with the layer").
        regression_weight: ``alpha`` of the regression loss.
        check_values: the value checks of the functional API (``True``: deferred on CUDA,
            at once on the CPU; ``"sync"``, ``"deferred"``, ``False``; see
            :func:`trpl_fast.project_diag`).
    """

    def __init__(
        self,
        kind: str,
        mean_bound: float,
        cov_bound: float,
        cov_form: str = "diag",
        *,
        entropy_control: str | None = None,
        entropy_schedule: EntropySchedule | None = None,
        contextual_cov: bool = False,
        regression_weight: float = 1.0,
        check_values: bool | str = True,
    ):
        super().__init__()
        self.kind = check_kind(kind)
        if cov_form not in FORMS:
            raise ValueError(f"cov_form must be one of {FORMS}, got {cov_form!r}")
        if entropy_control not in (None, "ineq", "eq"):
            raise ValueError(f"entropy_control must be None, 'ineq' or 'eq', got {entropy_control!r}")
        if entropy_control is not None and entropy_schedule is None:
            raise ValueError("entropy_schedule is required when entropy_control is set")
        if entropy_schedule is not None and (isinstance(entropy_schedule, str) or not callable(entropy_schedule)):
            raise ValueError(
                f"entropy_schedule must be an EntropySchedule (or a callable (step, d) -> "
                f"target entropy), got {entropy_schedule!r}"
            )
        for name, b in (("mean_bound", mean_bound), ("cov_bound", cov_bound)):
            if not (isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < math.inf):
                raise ValueError(f"{name} must be a finite float > 0, got {b!r}")
        if not (_is_real(regression_weight) and 0 <= regression_weight < math.inf):
            raise ValueError(f"regression_weight must be a finite number >= 0, got {regression_weight!r}")
        self.mean_bound, self.cov_bound = float(mean_bound), float(cov_bound)
        self.cov_form = cov_form
        self.entropy_control = entropy_control
        self.entropy_schedule = entropy_schedule
        self.contextual_cov = contextual_cov
        self.regression_weight = float(regression_weight)
        check_mode(check_values, torch.device("cpu"))  # a bad value fails here, not at the first call
        self.check_values = check_values
        # KL only: per-state Newton convergence flags of the last forward (no host sync),
        # and weak references to the outputs they belong to (see ``metrics``)
        self.last_converged: Tensor | None = None
        self._last_outputs: tuple | None = None

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, mean_bound={self.mean_bound}, cov_bound={self.cov_bound}, "
            f"cov_form={self.cov_form!r}, entropy_control={self.entropy_control!r}"
        )

    # -- projection ---------------------------------------------------------------------
    def forward(
        self,
        mean: Tensor,
        cov: Tensor,
        old_mean: Tensor,
        old_cov: Tensor,
        *,
        step: int | None = None,
        mean_bound=None,
        cov_bound=None,
    ) -> tuple[Tensor, Tensor]:
        """Project ``(mean, cov)`` onto the trust region around ``(old_mean, old_cov)``.

        Shapes: mean (..., d); cov (..., d) or (..., d, d) per ``cov_form``. ``step`` is
        the training step for the entropy schedule; per-state bounds (tensors of the batch
        shape) override the constructor's floats.
        """
        out = project(
            self.cov_form,
            mean,
            cov,
            old_mean,
            old_cov,
            kind=self.kind,
            mean_bound=self.mean_bound if mean_bound is None else mean_bound,
            cov_bound=self.cov_bound if cov_bound is None else cov_bound,
            check_values=self.check_values,
            return_aux=True,
        )
        mean_t, cov_t = out[0], out[1]
        # the flags for metrics(): not inside a torch.func step (its tensors stay inside)
        stash = self.kind == "kl" and not in_torch_func_mode()
        if stash:
            self.last_converged = out[3]
        if self.entropy_control is not None:
            if step is None:
                raise ValueError("step is required when entropy_control is set")
            cov_t = self.control_entropy(cov_t, self.entropy_schedule(step, mean.shape[-1]))
        if stash:
            self._last_outputs = (weakref.ref(mean_t), weakref.ref(cov_t))
        return mean_t, cov_t

    def _converged_for(self, mean_t, cov_t, old_mean, old_cov, mean, cov, mean_bound, cov_bound):
        """The KL convergence flags of the batch ``metrics`` is given, or None when they
        cannot be known: those of the last forward if ``mean_t, cov_t`` are its very
        outputs, else recomputed from the unprojected ``mean, cov`` when given."""
        last = self._last_outputs
        if last is not None and last[0]() is mean_t and last[1]() is cov_t:
            return self.last_converged
        if mean is None or cov is None:
            return None
        return project(
            self.cov_form,
            mean,
            cov,
            old_mean,
            old_cov,
            kind=self.kind,
            mean_bound=mean_bound,
            cov_bound=cov_bound,
            check_values=False,
            return_aux=True,
        )[3]

    def control_entropy(self, cov: Tensor, target: float) -> Tensor:
        """Scale the std / factor by ``exp((beta - H) / d)`` where ``H < beta`` (``ineq``)
        or everywhere (``eq``), so the entropy becomes ``beta`` (paper section 4.2)."""
        d = cov.shape[-1]
        h = D.entropy(self.kind, self.cov_form, cov)
        log_scale = (target - h) / d
        if self.entropy_control == "ineq":
            log_scale = torch.clamp(log_scale, min=0.0)
        scale = torch.exp(log_scale)
        return cov * (scale.unsqueeze(-1) if self.cov_form == "diag" else scale[..., None, None])

    # -- loss ---------------------------------------------------------------------------
    def trust_region_loss(
        self, mean: Tensor, cov: Tensor, mean_t: Tensor, cov_t: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        """``alpha * mean(d(p, stopgrad(p_t)))`` (paper Eq. 12): pulls the network output
        towards its projection so that the unprojected policy stays in the region too.

        Only the mean part when the covariance is not contextual (the projected global
        covariance is copied into the policy instead); for Frobenius with a contextual
        covariance the covariance part is the squared difference of the std factors.
        ``weight`` (batch shape): per-state weights of the mean (e.g. a 0 / 1 mask of padded
        states), ``sum(w d) / sum(w)``.
        """
        dist = self.regression_distance(mean, cov, mean_t, cov_t)
        if weight is None:
            return self.regression_weight * dist.mean()
        return self.regression_weight * (dist * weight).sum() / weight.sum().clamp_min(1.0)

    def regression_distance(self, mean: Tensor, cov: Tensor, mean_t: Tensor, cov_t: Tensor) -> Tensor:
        """Per-state ``d(p, stopgrad(p_t))`` of :meth:`trust_region_loss`, shape (...) (the
        batch shape), before weighting and averaging (a caller can average per group, e.g.
        per seed of a batched multi-seed run)."""
        mean_t, cov_t = mean_t.detach(), cov_t.detach()
        dist = D.mean_part(self.kind, self.cov_form, mean, mean_t, cov_t)
        if self.contextual_cov:
            if self.kind == "frob":
                diff = cov - cov_t if self.cov_form == "diag" else cov.tril() - cov_t.tril()
                dist = dist + (diff * diff).flatten(mean.dim() - 1).sum(-1)
            else:
                dist = dist + D.cov_part(self.kind, self.cov_form, cov, cov_t)
        return dist

    # -- metrics ------------------------------------------------------------------------
    @torch.no_grad()
    def metrics(
        self,
        mean_t: Tensor,
        cov_t: Tensor,
        old_mean: Tensor,
        old_cov: Tensor,
        mean: Tensor | None = None,
        cov: Tensor | None = None,
        *,
        mean_bound=None,
        cov_bound=None,
        converged: Tensor | None = None,
    ) -> dict[str, float]:
        """Per-batch constraint metrics (paper Figure 2), as Python floats (one host sync).

        Shapes as in ``forward``: ``mean_t`` (..., d), ``cov_t`` (..., d) or (..., d, d), the
        old and unprojected policies alike; any float dtype (computed in it, MATH.md
        "Training with the layer").

        ``kl_mean`` / ``kl_max``: KL(projected || old); ``constraint_mean_*`` /
        ``constraint_cov_*``: the projection's own mean and covariance parts between the
        projected and the old policy; ``entropy_mean``; and, when the unprojected
        ``mean, cov`` are given, ``fraction_projected``: the fraction of states whose
        unprojected policy violates either bound (``mean_bound`` / ``cov_bound``: the
        per-state bounds of the forward call, floats or tensors of the batch shape; the
        layer's floats by default).

        For ``kl``, ``nonconverged_states``: states of THIS batch whose Newton solve missed
        its tolerance (a warning is issued when there are any). The flags are ``converged``
        when given; else those of the last forward if ``mean_t, cov_t`` are its very output
        tensors; else recomputed by projecting ``mean, cov`` again (no gradient); else
        unknown and the entry is left out. An empty batch gives NaN statistics.
        """
        k, f = self.kind, self.cov_form
        mb = self.mean_bound if mean_bound is None else mean_bound
        cb = self.cov_bound if cov_bound is None else cov_bound
        if k == "kl" and converged is None:
            converged = self._converged_for(mean_t, cov_t, old_mean, old_cov, mean, cov, mb, cb)
        names = [
            "kl_mean",
            "kl_max",
            "constraint_mean_mean",
            "constraint_mean_max",
            "constraint_cov_mean",
            "constraint_cov_max",
            "entropy_mean",
        ]
        if mean is not None and cov is not None:
            names.append("fraction_projected")
        batch_empty = mean_t.shape[:-1].numel() == 0
        if batch_empty:
            out = {n: math.nan for n in names}
            if converged is not None:
                out["nonconverged_states"] = 0.0
            return out
        kl = D.kl(k, f, mean_t, cov_t, old_mean, old_cov)
        mpart = D.mean_part(k, f, mean_t, old_mean, old_cov)
        cpart = D.cov_part(k, f, cov_t, old_cov)
        ent = D.entropy(k, f, cov_t)
        values = [kl.mean(), kl.max(), mpart.mean(), mpart.max(), cpart.mean(), cpart.max(), ent.mean()]
        if mean is not None and cov is not None:
            violated = (D.mean_part(k, f, mean, old_mean, old_cov) > _as_bound(mb, kl)) | (
                D.cov_part(k, f, cov, old_cov) > _as_bound(cb, kl)
            )
            values.append(violated.to(kl.dtype).mean())
        if converged is not None:
            names.append("nonconverged_states")
            values.append((~converged).sum())
        out = dict(zip(names, torch.stack([v.to(torch.float64) for v in values]).tolist()))
        if out.get("nonconverged_states", 0) > 0:
            warnings.warn(
                f"KL projection: the Newton solve did not converge for "
                f"{int(out['nonconverged_states'])} states (they are returned inside the "
                f"trust region, but not on its bound)",
                RuntimeWarning,
                stacklevel=2,
            )
        return out


def _as_bound(bound, like: Tensor):
    """A float or per-state tensor bound, comparable with the (batch,) tensor ``like``."""
    return bound.to(like.dtype) if isinstance(bound, Tensor) else bound
