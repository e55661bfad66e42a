"""Collecting experience: the actor the rollout acts with, the per-iteration rollout, and
the environments' episode bookkeeping that a checkpoint must carry.

Environments autoreset *next-step* (``envs.py``): the step after an episode's end only
resets, so it is marked invalid (``valid`` False) and later enters the losses with weight 0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class Actor:
    """The policy the rollout acts with, in numpy: per environment step the mean network
    as numpy ops (:meth:`GaussianPolicy.numpy_distribution`) and ``mean + L z`` with noise
    ``z`` from ``rng`` (a ``numpy.random.Generator``; checkpointed). Torch's per-op overhead
    (~10 us an op) would cost more than the simulator's step for the paper's 64x64 MLPs. A
    contextual full covariance (or layers numpy does not run) goes through the torch
    policy, with the same noise.

    On an accelerator it acts with a CPU copy of the policy, synced once per iteration
    (:meth:`sync`): one transfer of the weights instead of a device round trip per
    environment step (the envs live on the CPU). The numpy weights are rebuilt by
    :meth:`sync` too: call it after every update."""

    def __init__(self, policy, device: torch.device, rng: np.random.Generator):
        self.policy, self.rng = policy, rng
        self.local = policy if device.type == "cpu" else copy.deepcopy(policy).to("cpu")
        self._rebuild()

    @property
    def separate(self) -> bool:
        return self.local is not self.policy

    @torch.no_grad()
    def sync(self) -> None:
        if self.separate:
            for dst, src in zip(self.local.state_dict().values(), self.policy.state_dict().values()):
                dst.copy_(src)
        self._rebuild()

    def _rebuild(self) -> None:
        self._forward = self.local.numpy_distribution()

    def noise(self, shape: tuple) -> np.ndarray:
        """Standard normal draws (float32) of ``shape`` = (..., d)."""
        return self.rng.standard_normal(shape, dtype=np.float32)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Sampled actions (..., act_dim) float32 for observations (..., obs_dim) float32."""
        z = self.noise((*obs.shape[:-1], self.local.act_dim))
        if self._forward is not None:
            mean, factor = self._forward(obs)
            if self.local.cov_form == "diag":
                return mean + factor * z
            return mean + (z[..., None, :] @ factor.swapaxes(-1, -2))[..., 0, :]
        with torch.no_grad():
            mean, cov = self.local(torch.from_numpy(obs))
            return self.local.sample(mean, cov, noise=torch.from_numpy(z)).numpy()


@dataclass
class Rollout:
    """One iteration's experience, each (T, N, ...) for T steps of N environments.
    ``obs`` / ``next_obs`` are normalized as the policy saw them (``next_obs``: the
    observation the step returned, before any reset; for a truncated step the final one)."""

    obs: Tensor
    next_obs: Tensor
    actions: Tensor
    rewards: Tensor
    terminated: Tensor
    truncated: Tensor
    valid: Tensor


class Collector:
    """Steps ``envs`` with an :class:`Actor`, normalizing observations (``obs_norm``,
    updated on every observation acted on) and rewards (``rew_norm``), and keeps the
    episodes open across iterations (returns of finished episodes in ``finished_returns``)."""

    def __init__(
        self, envs, *, obs_norm=None, rew_norm=None, clip_actions: bool = False, time_limit_terminal: bool = False
    ):
        self.envs, self.obs_norm, self.rew_norm = envs, obs_norm, rew_norm
        self.clip_actions, self.time_limit_terminal = clip_actions, time_limit_terminal
        self.raw_obs = envs.reset()
        self.prev_done = np.zeros(envs.num_envs, dtype=bool)
        self.episode_return = np.zeros(envs.num_envs)
        self.finished_returns: list[float] = []

    def collect(self, actor: Actor, steps_per_env: int) -> Rollout:
        """``steps_per_env`` steps of every environment, in numpy (one conversion to tensors
        at the end; per step a few microseconds besides the simulator)."""
        T, N = steps_per_env, self.envs.num_envs
        obs_dim, act_dim = self.envs.obs_dim, self.envs.act_dim
        obs_buf = np.zeros((T, N, obs_dim), np.float32)
        next_buf = np.zeros((T, N, obs_dim), np.float32)
        act_buf = np.zeros((T, N, act_dim), np.float32)
        rew_buf = np.zeros((T, N), np.float32)
        term_buf, trunc_buf, valid_buf = (np.zeros((T, N), bool) for _ in range(3))
        norm = self.obs_norm
        for t in range(T):
            x = self.raw_obs.astype(np.float32)
            obs = norm.numpy(x, update=True) if norm else x
            action = actor.act(obs)
            raw_next, rew, term, trunc = self.envs.step(action, clip=self.clip_actions)
            if self.time_limit_terminal:
                term, trunc = term | trunc, np.zeros_like(trunc)
            valid = ~self.prev_done  # a step right after an episode end only resets
            rew = np.where(valid, rew, 0.0)
            self.episode_return += rew
            done = (term | trunc) & valid
            if done.any():
                self.finished_returns += self.episode_return[done].tolist()
                self.episode_return[done] = 0.0
            obs_buf[t], act_buf[t] = obs, action
            rew_buf[t] = self.rew_norm.numpy(rew, done) if self.rew_norm else rew
            xn = raw_next.astype(np.float32)
            next_buf[t] = norm.numpy(xn) if norm else xn
            term_buf[t], trunc_buf[t], valid_buf[t] = term & valid, trunc & valid, valid
            self.prev_done = term | trunc
            self.raw_obs = raw_next
        return Rollout(
            *(torch.from_numpy(a) for a in (obs_buf, next_buf, act_buf, rew_buf, term_buf, trunc_buf, valid_buf))
        )

    # -- checkpoint ---------------------------------------------------------------------
    def loop_state(self) -> dict:
        return {
            "raw_obs": self.raw_obs.copy(),
            "prev_done": self.prev_done.copy(),
            "episode_return": self.episode_return.copy(),
            "finished_returns": list(self.finished_returns),
        }

    def load_loop_state(self, loop: dict, restore_episodes: bool) -> None:
        """``restore_episodes``: the environments' own state was restored too, so the open
        episodes continue; otherwise they restart (only the returns logged so far are kept)."""
        self.finished_returns = list(loop["finished_returns"])
        if restore_episodes:
            self.raw_obs, self.prev_done = loop["raw_obs"].copy(), loop["prev_done"].copy()
            self.episode_return = loop["episode_return"].copy()
