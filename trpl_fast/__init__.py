"""trpl_fast: fast differentiable trust-region projection layers for Gaussian policies.

``project_diag`` / ``project_full`` are the functional API over the ``torch.ops.trpl``
operators; ``TrustRegionProjection`` is the layer with entropy control, the trust-region
regression loss and the constraint metrics; ``reference`` is the float64 oracle.
"""

from . import ops  # noqa: F401  (registers torch.ops.trpl.*)
from .functional import project_diag, project_full
from .ops.validation import pending_value_checks, raise_deferred_errors
from .projection import EntropySchedule, TrustRegionProjection


def _register_envs() -> None:
    """``trpl_fast/ReacherSparse5-v0`` in Gymnasium's registry, when Gymnasium is installed."""
    try:
        import gymnasium  # noqa: F401
    except ImportError:
        return
    from .rl.reacher import register

    register()


_register_envs()

__all__ = [
    "project_diag",
    "project_full",
    "TrustRegionProjection",
    "EntropySchedule",
    "raise_deferred_errors",
    "pending_value_checks",
]
__version__ = "0.1.0"
