"""Mean projection (MATH.md "Mean projection"), as Triton helpers fused into every
diagonal projection kernel. Tiles are (BLOCK_ROWS, BLOCK_D); padded lanes must hold
``delta = 0`` and ``old_var = 1`` so they add nothing to the row sums."""

import triton
import triton.language as tl


@triton.jit
def mean_project_fwd(mean, old_mean, old_var, eps):
    """``mu_t = mu_o + sqrt(eps / m) (mu - mu_o)`` where ``m = maha > eps``, else ``mu``.

    ``eps`` is per row; the KL kernels pass ``2 eps_mu`` (their bound is on ``0.5 m``).
    """
    delta = mean - old_mean
    m = tl.sum(delta * delta / old_var, axis=1)
    active = m > eps
    scale = tl.sqrt(eps / tl.where(active, m, eps))
    projected = old_mean + scale[:, None] * delta
    return tl.where(active[:, None], projected, mean)


@triton.jit
def mean_project_bwd(grad, mean, old_mean, old_var, eps):
    """Gradient of :func:`mean_project_fwd` w.r.t. ``mean``:
    ``b g - (b / m) <g, delta> L_o delta`` on active rows (``b = sqrt(eps / m)``), ``g`` else."""
    delta = mean - old_mean
    prec_delta = delta / old_var
    m = tl.sum(delta * prec_delta, axis=1)
    active = m > eps
    m_safe = tl.where(active, m, eps)
    scale = tl.sqrt(eps / m_safe)
    g_dot = tl.sum(grad * delta, axis=1)
    g = scale[:, None] * grad - (scale * g_dot / m_safe)[:, None] * prec_delta
    return tl.where(active[:, None], g, grad)
