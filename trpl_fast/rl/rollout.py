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
    """The policy the rollout acts with. On the CPU the policy itself; on an accelerator a
    CPU copy, synced once per iteration (:meth:`sync`): one transfer of the weights instead
    of a device round trip per environment step (the envs live on the CPU)."""

    def __init__(self, policy, device: torch.device):
        self.policy = policy
        self.local = policy if device.type == "cpu" else copy.deepcopy(policy).to("cpu")

    @property
    def separate(self) -> bool:
        return self.local is not self.policy

    @torch.no_grad()
    def sync(self) -> None:
        if self.separate:
            for dst, src in zip(self.local.state_dict().values(), self.policy.state_dict().values()):
                dst.copy_(src)

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """Sampled actions (N, act_dim) for observations (N, obs_dim) on the CPU."""
        mean, cov = self.local(obs)
        return self.local.sample(mean, cov)


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
        T, N = steps_per_env, self.envs.num_envs
        obs_dim, act_dim = self.envs.obs_dim, self.envs.act_dim
        buf = Rollout(
            obs=torch.zeros(T, N, obs_dim),
            next_obs=torch.zeros(T, N, obs_dim),
            actions=torch.zeros(T, N, act_dim),
            rewards=torch.zeros(T, N),
            terminated=torch.zeros(T, N, dtype=torch.bool),
            truncated=torch.zeros(T, N, dtype=torch.bool),
            valid=torch.zeros(T, N, dtype=torch.bool),
        )
        norm = self.obs_norm
        for t in range(T):
            x = torch.as_tensor(self.raw_obs, dtype=torch.float32)
            obs = norm(x, update=True) if norm else x
            action = actor.act(obs)
            raw_next, rew, term, trunc = self.envs.step(action.double().numpy(), clip=self.clip_actions)
            if self.time_limit_terminal:
                term, trunc = term | trunc, np.zeros_like(trunc)
            valid = ~self.prev_done  # a step right after an episode end only resets
            self.episode_return += np.where(valid, rew, 0.0)
            done = (term | trunc) & valid
            self.finished_returns += self.episode_return[done].tolist()
            self.episode_return[done] = 0.0
            rew_t = torch.as_tensor(np.where(valid, rew, 0.0), dtype=torch.float32)
            if self.rew_norm:
                rew_t = self.rew_norm(rew_t, torch.as_tensor(done)).float()
            xn = torch.as_tensor(raw_next, dtype=torch.float32)
            buf.obs[t], buf.actions[t], buf.rewards[t] = obs, action.float(), rew_t
            buf.next_obs[t] = norm(xn) if norm else xn
            buf.terminated[t] = torch.as_tensor(term & valid)
            buf.truncated[t] = torch.as_tensor(trunc & valid)
            buf.valid[t] = torch.as_tensor(valid)
            self.prev_done = term | trunc
            self.raw_obs = raw_next
        return buf

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
