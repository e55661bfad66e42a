"""Gaussian MLP policies and the value network.

Covariance forms (``cov_form``) and, for full covariances, the factor the network outputs
(``factor``), matching what the projection layer takes:

* ``diag``: std vector, ``std = softplus(raw) + min_std``.
* ``full`` + ``factor="cholesky"`` (Frobenius, KL, and the baselines): lower Cholesky
  factor, softplus on the diagonal.
* ``full`` + ``factor="sqrt"`` (W2): symmetric positive-definite square root
  ``Q = B B^T + min_std I`` built from a Cholesky-like ``B`` (the W2 projection
  interpolates roots).

The policy owns its distribution: :meth:`GaussianPolicy.sample`, :meth:`~GaussianPolicy.log_prob`,
:meth:`~GaussianPolicy.entropy` and :meth:`~GaussianPolicy.kl` take the ``(mean, cov)`` it
(or a projection of it) produced.

``cov_type``: ``global`` (state independent: a parameter) or ``contextual`` (a head of the
network). Initialization as in the original PPO code: orthogonal weights, gain sqrt(2) on
hidden layers, 0.01 on the mean head, 1 on the value head, zero biases.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .. import distances as D

COV_TYPES = ("global", "contextual")
FACTORS = ("cholesky", "sqrt")
# the factor each projection takes for a full covariance (README "Use")
FACTOR_OF_PROJECTION = {"frob": "cholesky", "kl": "cholesky", "w2": "sqrt"}


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def mlp(in_dim: int, hidden: tuple[int, ...], activation=nn.Tanh) -> tuple[nn.Sequential, int]:
    layers, last = [], in_dim
    for h in hidden:
        lin = nn.Linear(last, h)
        nn.init.orthogonal_(lin.weight, math.sqrt(2.0))
        nn.init.zeros_(lin.bias)
        layers += [lin, activation()]
        last = h
    return nn.Sequential(*layers), last


def numpy_layers(modules) -> list | None:
    """``modules`` (Linear-like layers with ``weight`` (out, in) or stacked (S, out, in), and
    Tanh / ReLU) as float32 numpy ops for :func:`run_numpy_layers`; None if one is
    something else. The arrays are copies: rebuild after the weights change."""
    ops = []
    for m in modules:
        if isinstance(m, nn.Tanh):
            ops.append(np.tanh)
        elif isinstance(m, nn.ReLU):
            ops.append(_relu)
        elif hasattr(m, "weight") and hasattr(m, "bias") and m.bias is not None and m.weight.dim() in (2, 3):
            w = m.weight.detach().cpu().float()
            b = m.bias.detach().cpu().float()
            # (in, out) or (S, in, out); the bias broadcasts over the batch rows
            ops.append((w.mT.contiguous().numpy(), (b.unsqueeze(-2) if w.dim() == 3 else b).numpy().copy()))
        else:
            return None
    return ops


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0.0))


def run_numpy_layers(ops: list, x: np.ndarray) -> np.ndarray:
    """``x`` (..., in) float32 through :func:`numpy_layers` ops: a few microseconds for the
    paper's 64x64 MLPs on one row, where torch's per-op overhead costs tens."""
    for op in ops:
        x = x @ op[0] + op[1] if isinstance(op, tuple) else op(x)
    return x


def _head(in_dim: int, out_dim: int, gain: float) -> nn.Linear:
    lin = nn.Linear(in_dim, out_dim)
    nn.init.orthogonal_(lin.weight, gain)
    nn.init.zeros_(lin.bias)
    return lin


class GaussianPolicy(nn.Module):
    """``forward(obs) -> (mean (..., d), cov)`` with ``cov`` the std (..., d) or the factor
    (..., d, d) of the parametrization described in the module docstring."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        *,
        factor: str = "cholesky",
        cov_form: str = "diag",
        cov_type: str = "global",
        hidden: tuple[int, ...] = (64, 64),
        init_std: float = 1.0,
        min_std: float = 1e-5,
        activation=nn.Tanh,
    ):
        super().__init__()
        if cov_form not in ("diag", "full"):
            raise ValueError(f"cov_form must be 'diag' or 'full', got {cov_form!r}")
        if cov_type not in COV_TYPES:
            raise ValueError(f"cov_type must be one of {COV_TYPES}, got {cov_type!r}")
        if factor not in FACTORS:
            raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
        if not init_std > min_std:
            raise ValueError(f"init_std must be > min_std ({min_std}), got {init_std}")
        self.factor, self.cov_form, self.cov_type = factor, cov_form, cov_type
        # trpl_fast.distances names a full factor by the projection that takes it
        self._dist = "w2" if (factor == "sqrt" and cov_form == "full") else "kl"
        self.act_dim, self.min_std = act_dim, min_std
        self.body, width = mlp(obs_dim, hidden, activation)
        self.mean_head = _head(width, act_dim, 0.01)
        self.n_diag = act_dim
        self.n_off = act_dim * (act_dim - 1) // 2 if cov_form == "full" else 0
        # W2's root Q = B B^T + min_std I has diag ~ b^2: start from b = sqrt(init_std)
        diag_target = math.sqrt(init_std - min_std) if self._dist == "w2" else init_std - min_std
        diag_init = _inv_softplus(diag_target)
        if cov_type == "global":
            self.cov_diag = nn.Parameter(torch.full((act_dim,), diag_init))
            self.cov_off = nn.Parameter(torch.zeros(self.n_off))
        else:
            self.cov_head = _head(width, self.n_diag + self.n_off, 0.01)
            nn.init.constant_(self.cov_head.bias[: self.n_diag], diag_init)
        self.register_buffer("_tril_index", torch.tril_indices(act_dim, act_dim, -1), persistent=False)

    def _raw_cov(self, features: Tensor) -> tuple[Tensor, Tensor]:
        if self.cov_type == "global":
            shape = features.shape[:-1]
            return self.cov_diag.expand(*shape, self.n_diag), self.cov_off.expand(*shape, self.n_off)
        raw = self.cov_head(features)
        return raw[..., : self.n_diag], raw[..., self.n_diag :]

    def cov_from_raw(self, diag_raw: Tensor, off_raw: Tensor) -> Tensor:
        diag = nn.functional.softplus(diag_raw)
        if self.cov_form == "diag":
            return diag + self.min_std
        d = self.act_dim
        factor = torch.diag_embed(diag + (0.0 if self._dist == "w2" else self.min_std))
        factor = factor.clone()
        factor[..., self._tril_index[0], self._tril_index[1]] = off_raw
        if self._dist == "w2":
            eye = torch.eye(d, dtype=factor.dtype, device=factor.device)
            return factor @ factor.mT + self.min_std * eye
        return factor

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(obs)
        return self.mean_head(features), self.cov_from_raw(*self._raw_cov(features))

    def mean_action(self, obs: Tensor) -> Tensor:
        """The deterministic action (the mean), without computing the covariance."""
        return self.mean_head(self.body(obs))

    # -- the distribution of (mean, cov): this policy's or a projection of it -------------
    def sample(
        self, mean: Tensor, cov: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """Actions (..., d) drawn from N(mean, cov); ``noise``: the standard normal draws
        (..., d) to use instead of drawing them (the rollout draws them in numpy)."""
        return D.sample(self._dist, self.cov_form, mean, cov, generator=generator, noise=noise)

    # -- the rollout's numpy path -----------------------------------------------------------
    def numpy_mean(self) -> list | None:
        """The mean network as numpy ops (:func:`numpy_layers`), or None."""
        return numpy_layers([*self.body, self.mean_head])

    @torch.no_grad()
    def global_sampling_factor(self) -> np.ndarray | None:
        """For a state-independent covariance, what a sample multiplies the noise by: the
        std (d,) for a diagonal one, else the lower Cholesky factor (d, d) of the
        covariance (float32); None for a contextual covariance."""
        if self.cov_type != "global":
            return None
        cov = self.cov_from_raw(self.cov_diag, self.cov_off)
        if self.cov_form == "full":
            cov = D.cholesky_of(self._dist, self.cov_form, cov)
        return cov.detach().cpu().float().numpy().copy()

    def numpy_distribution(self):
        """The policy as numpy ops for the rollout's per-step forward: a function ``obs
        (..., obs_dim) float32 -> (mean (..., d), factor)``, ``factor`` the std (broadcasting
        against the mean) for a diagonal covariance, else the lower Cholesky factor (d, d)
        of a global full one; None where numpy does not reach (a contextual full covariance,
        layers other than Linear / Tanh / ReLU). The weights are copied: call it again after
        an update."""
        body, head = numpy_layers(list(self.body)), numpy_layers([self.mean_head])
        if body is None or head is None:
            return None
        if self.cov_type == "global":
            factor = self.global_sampling_factor()
            return lambda obs: (run_numpy_layers(head, run_numpy_layers(body, obs)), factor)
        if self.cov_form != "diag":
            return None
        cov_head, d, min_std = numpy_layers([self.cov_head]), self.n_diag, np.float32(self.min_std)

        def forward(obs):
            features = run_numpy_layers(body, obs)
            raw = run_numpy_layers(cov_head, features)[..., :d]
            return run_numpy_layers(head, features), np.logaddexp(np.float32(0.0), raw) + min_std  # softplus

        return forward

    def log_prob(self, mean: Tensor, cov: Tensor, actions: Tensor) -> Tensor:
        """log N(actions; mean, cov), shape (...)."""
        return D.log_prob(self._dist, self.cov_form, mean, cov, actions)

    def entropy(self, cov: Tensor) -> Tensor:
        """Differential entropy per state, shape (...)."""
        return D.entropy(self._dist, self.cov_form, cov)

    def kl(self, mean: Tensor, cov: Tensor, old_mean: Tensor, old_cov: Tensor) -> Tensor:
        """KL(N(mean, cov) || N(old_mean, old_cov)) per state, shape (...)."""
        return D.kl(self._dist, self.cov_form, mean, cov, old_mean, old_cov)

    @torch.no_grad()
    def set_global_cov(self, cov: Tensor) -> None:
        """Copy a (projected) state-independent covariance into the global parameters:
        ``cov`` is one std vector (d,) or one factor (d, d) of this parametrization."""
        if self.cov_type != "global":
            raise ValueError("set_global_cov needs cov_type='global'")
        if self.cov_form == "diag":
            self.cov_diag.copy_(_softplus_inv_tensor(cov - self.min_std))
            return
        if self._dist == "w2":  # recover B from Q - min_std I = B B^T by Cholesky
            eye = torch.eye(self.act_dim, dtype=cov.dtype, device=cov.device)
            b = torch.linalg.cholesky(0.5 * (cov + cov.mT) - self.min_std * eye)
            self.cov_diag.copy_(_softplus_inv_tensor(b.diagonal()))
        else:
            b = cov
            self.cov_diag.copy_(_softplus_inv_tensor(b.diagonal() - self.min_std))
        self.cov_off.copy_(b[self._tril_index[0], self._tril_index[1]])


def _softplus_inv_tensor(y: Tensor) -> Tensor:
    y = y.clamp_min(1e-12)
    return y + torch.log(-torch.expm1(-y))


class ValueNetwork(nn.Module):
    def __init__(self, obs_dim: int, hidden: tuple[int, ...] = (64, 64), activation=nn.Tanh):
        super().__init__()
        self.body, width = mlp(obs_dim, hidden, activation)
        self.head = _head(width, 1, 1.0)

    def forward(self, obs: Tensor) -> Tensor:
        return self.head(self.body(obs)).squeeze(-1)
