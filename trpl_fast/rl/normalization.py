"""Running statistics and the observation / reward normalizers of the original PPO code."""

from __future__ import annotations

import torch
from torch import Tensor


class RunningMeanStd:
    """Running mean and variance over the leading dimension, merged batch by batch
    (Chan et al.'s parallel update), in float64. State is a dict of tensors for checkpoints."""

    def __init__(self, shape=(), epsilon: float = 1e-4):
        self.mean = torch.zeros(shape, dtype=torch.float64)
        self.var = torch.ones(shape, dtype=torch.float64)
        self.count = torch.tensor(epsilon, dtype=torch.float64)

    def update(self, batch: Tensor) -> None:
        batch = batch.detach().to(torch.float64).cpu()
        if batch.shape[1:] != self.mean.shape:
            raise ValueError(
                f"batch of shape {tuple(batch.shape)} does not match statistics of shape {tuple(self.mean.shape)}"
            )
        b_mean, b_var, b_count = batch.mean(0), batch.var(0, unbiased=False), batch.shape[0]
        delta = b_mean - self.mean
        total = self.count + b_count
        self.mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["mean"].shape) != tuple(self.mean.shape):
            raise ValueError(
                f"statistics of shape {tuple(state['mean'].shape)} cannot be loaded into {tuple(self.mean.shape)}"
            )
        self.mean, self.var, self.count = (state[k].clone().to(torch.float64) for k in ("mean", "var", "count"))


class ObservationNormalizer:
    """``clip((obs - mean) / sqrt(var + eps), -clip, clip)`` with running statistics
    updated from rollout observations (``update=True``) and frozen otherwise."""

    def __init__(self, shape, clip: float | None = 10.0, eps: float = 1e-8):
        self.stats = RunningMeanStd(shape)
        self.clip, self.eps = clip, eps

    def __call__(self, obs: Tensor, update: bool = False) -> Tensor:
        if update:
            self.stats.update(obs.reshape(-1, *self.stats.mean.shape))
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
        self.ret = torch.zeros(num_envs, dtype=torch.float64)
        self.gamma, self.clip, self.eps = gamma, clip, eps

    def __call__(self, rewards: Tensor, done: Tensor) -> Tensor:
        """``rewards``, ``done``: (N,) for one step of N environments."""
        self.ret = self.ret * self.gamma + rewards.detach().to(torch.float64).cpu()
        self.stats.update(self.ret)
        self.ret = torch.where(done.cpu().bool(), torch.zeros_like(self.ret), self.ret)
        out = rewards / float(torch.sqrt(self.stats.var + self.eps))
        return out if self.clip is None else out.clamp(-self.clip, self.clip)

    def state_dict(self) -> dict:
        """Statistics and the per-environment discounted-return accumulator."""
        return {"stats": self.stats.state_dict(), "ret": self.ret.clone()}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["ret"].shape) != tuple(self.ret.shape):
            raise ValueError(
                f"reward normalizer for {state['ret'].shape[0]} environments cannot be loaded "
                f"into one for {self.ret.shape[0]}"
            )
        self.stats.load_state_dict(state["stats"])
        self.ret = state["ret"].clone().to(torch.float64)
