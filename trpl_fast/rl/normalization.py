"""Running statistics and the observation / reward normalizers of the original PPO code.

The statistics live in float64 numpy arrays: the collection loop updates them once per
environment step, where a dozen torch ops on 17 numbers cost more than the simulator's step
(measured: ~100 us of the rollout's per-step overhead). ``mean`` / ``var`` / ``count`` are
also readable as torch tensors (views) and the state dicts hold tensors, as before.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_float64(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.float64)  # a copy: the caller's array is not aliased


class RunningMeanStd:
    """Running mean and variance over the leading dimension, merged batch by batch
    (Chan et al.'s parallel update), in float64. State is a dict of tensors for checkpoints."""

    def __init__(self, shape=(), epsilon: float = 1e-4):
        self._mean = np.zeros(shape, dtype=np.float64)
        self._var = np.ones(shape, dtype=np.float64)
        self._count = np.array(epsilon, dtype=np.float64)

    # torch views of the statistics (assigning a tensor or an array replaces them)
    mean = property(lambda self: torch.from_numpy(self._mean), lambda self, v: setattr(self, "_mean", _as_float64(v)))
    var = property(lambda self: torch.from_numpy(self._var), lambda self, v: setattr(self, "_var", _as_float64(v)))
    count = property(
        lambda self: torch.from_numpy(self._count), lambda self, v: setattr(self, "_count", _as_float64(v))
    )

    def update(self, batch) -> None:
        """``batch``: a tensor or array (B, *shape)."""
        batch = batch.detach().cpu().numpy() if isinstance(batch, Tensor) else np.asarray(batch)
        batch = batch.astype(np.float64, copy=False)
        if batch.shape[1:] != self._mean.shape:
            raise ValueError(
                f"batch of shape {tuple(batch.shape)} does not match statistics of shape {tuple(self._mean.shape)}"
            )
        b_count = batch.shape[0]
        if b_count == 1:  # the rollout's per-step case: the same arithmetic, a third of the calls
            total = self._count + 1
            delta = batch[0] - self._mean
            # np.asarray: 0-d results come back as numpy scalars (see below)
            self._var = np.asarray((self._var * self._count + delta * delta * (self._count / total)) / total)
            self._mean = np.asarray(self._mean + delta * (1 / total))
            self._count = np.asarray(total)
            return
        b_mean = batch.mean(0)
        b_var = batch.var(0) if b_count > 1 else np.zeros_like(b_mean)
        delta = b_mean - self._mean
        total = self._count + b_count
        m2 = self._var * self._count + b_var * b_count + delta**2 * (self._count * b_count / total)
        # np.asarray: 0-d results come back as numpy scalars, which torch.from_numpy refuses
        self._mean = np.asarray(self._mean + delta * (b_count / total))
        self._var = np.asarray(m2 / total)
        self._count = np.asarray(total)

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["mean"].shape) != tuple(self._mean.shape):
            raise ValueError(
                f"statistics of shape {tuple(state['mean'].shape)} cannot be loaded into {tuple(self._mean.shape)}"
            )
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


class ObservationNormalizer:
    """``clip((obs - mean) / sqrt(var + eps), -clip, clip)`` with running statistics
    updated from rollout observations (``update=True``) and frozen otherwise."""

    def __init__(self, shape, clip: float | None = 10.0, eps: float = 1e-8):
        self.stats = RunningMeanStd(shape)
        self.clip, self.eps = clip, eps

    def _update(self, obs: np.ndarray) -> None:
        self.stats.update(obs.reshape(-1, *self.stats._mean.shape))

    def numpy(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        """The normalizer on a float32 array (the rollout's per-step path): float32, the
        same arithmetic as on a tensor."""
        if update:
            self._update(obs)
        return self._apply(obs, self.stats._mean, self.stats._var)

    def _apply(self, obs: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        out = (obs - mean.astype(obs.dtype)) / np.sqrt(var + self.eps).astype(obs.dtype)
        # = np.clip (NaN included), without its ~2 us of Python dispatch per call
        return out if self.clip is None else np.minimum(np.maximum(out, -self.clip), self.clip)

    def __call__(self, obs: Tensor, update: bool = False) -> Tensor:
        if update:
            self._update(obs.detach().cpu().numpy())
        mean = self.stats.mean.to(obs.device, obs.dtype)
        std = torch.sqrt(self.stats.var + self.eps).to(obs.device, obs.dtype)
        out = (obs - mean) / std
        return out if self.clip is None else out.clamp(-self.clip, self.clip)

    def state_dict(self) -> dict:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state)


class RewardNormalizer:
    """PPO's reward scaling: divide rewards by the running std of the discounted return
    (the return accumulator restarts at episode ends), optionally clipped."""

    def __init__(self, num_envs: int, gamma: float, clip: float | None = 10.0, eps: float = 1e-8):
        self.stats = RunningMeanStd(())
        self._ret = np.zeros(num_envs, dtype=np.float64)
        self.gamma, self.clip, self.eps = gamma, clip, eps

    ret = property(lambda self: torch.from_numpy(self._ret), lambda self, v: setattr(self, "_ret", _as_float64(v)))

    def numpy(self, rewards: np.ndarray, done: np.ndarray) -> np.ndarray:
        """``rewards`` (float64), ``done`` (bool): (N,) for one step of N environments;
        the scaled rewards as float32."""
        self._ret = self._ret * self.gamma + rewards
        self.stats.update(self._ret)
        self._ret = np.where(done, 0.0, self._ret)
        out = rewards.astype(np.float32) / np.float32(np.sqrt(self.stats._var + self.eps))
        return out if self.clip is None else np.minimum(np.maximum(out, -self.clip), self.clip)

    def __call__(self, rewards: Tensor, done: Tensor) -> Tensor:
        """Tensor version of :meth:`numpy` (in the rewards' dtype)."""
        out = self.numpy(rewards.detach().cpu().numpy().astype(np.float64), done.cpu().numpy().astype(bool))
        return torch.from_numpy(out).to(rewards.dtype)

    def state_dict(self) -> dict:
        """Statistics and the per-environment discounted-return accumulator."""
        return {"stats": self.stats.state_dict(), "ret": self.ret.clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["ret"].shape) != tuple(self._ret.shape):
            raise ValueError(
                f"reward normalizer for {state['ret'].shape[0]} environments cannot be loaded "
                f"into one for {self._ret.shape[0]}"
            )
        self.stats.load_state_dict(state["stats"])
        self.ret = state["ret"]
