"""Deterministic evaluation (the paper's protocol) and the summaries it feeds.

The paper evaluates the policy's mean action for five episodes after every iteration and
reports, per run, the mean of the last 20 evaluations ("final") and of the 20 evaluations
after 20% of training ("20%"), then the mean and 95% interval over seeds (its Table 1).

:class:`Evaluator` keeps one batched environment of ``episodes`` sub-environments for the
whole run (EnvPool's HalfCheetah takes ~250 ms to build, more than an evaluation) and
draws new start states for every evaluation from a seed stream disjoint from the training
environments': with the Gymnasium backend each evaluation reseeds with
:func:`eval_seed` ``(seed, iteration)`` (so a resumed run evaluates exactly as the
uninterrupted one), EnvPool (which cannot reseed) continues its own stream.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .envs import make_vec_env
from .policies import run_numpy_layers

# Evaluation seeds live in [2^28, 2^28 + 2^30), training seeds below (run seeds are small
# integers, EnvPool seeds its sub-environments seed, seed + 1, ..., and a resumed EnvPool
# run reseeds with seed + global_step < 2^28 for any budget this code trains); < 2^31 for
# EnvPool's int32 seed.
EVAL_SEED_OFFSET = 1 << 28
_EVAL_SEED_SPAN = 1 << 30
# the paper's summaries: 20 evaluations, at 20% of training and at the end
SUMMARY_WINDOW = 20
EARLY_FRACTION = 0.2


# an evaluation stops after this many steps even if an episode has not ended
MAX_EVAL_STEPS = 100_000


def eval_seed(seed: int, iteration: int, episodes: int) -> int:
    """Seed of the evaluation after ``iteration`` of run ``seed`` (its sub-environments
    get this seed + 0 .. episodes - 1): distinct per evaluation, never a training seed."""
    return EVAL_SEED_OFFSET + ((seed * 100_003 + iteration) * max(1, episodes)) % _EVAL_SEED_SPAN


class Evaluator:
    """Mean undiscounted return of the deterministic policy (its mean action) over
    ``episodes`` parallel episodes; ``__call__(policy, obs_norm, iteration) -> float``."""

    def __init__(
        self,
        env_id: str,
        episodes: int,
        seed: int,
        *,
        backend: str = "auto",
        clip_actions: bool = False,
        first_iteration: int = 0,
        max_steps: int = MAX_EVAL_STEPS,
    ):
        if episodes < 1:
            raise ValueError(f"eval episodes must be >= 1, got {episodes}")
        self.env_id, self.episodes, self.seed = env_id, episodes, seed
        self.clip_actions, self.max_steps = clip_actions, max_steps
        self.env = make_vec_env(env_id, episodes, eval_seed(seed, first_iteration, episodes), backend=backend)

    @torch.no_grad()
    def __call__(self, policy, obs_norm, iteration: int) -> float:
        env = self.env
        if env.backend == "gymnasium":
            env.env.reset(seed=eval_seed(self.seed, iteration, self.episodes))
        obs = env.reset()
        act = _numpy_mean_action(policy, obs_norm)  # the weights are frozen during an evaluation
        returns = np.zeros(self.episodes)
        done = np.zeros(self.episodes, dtype=bool)
        steps = 0
        while not done.all() and steps < self.max_steps:
            obs, rew, term, trunc = env.step(act(obs), clip=self.clip_actions)
            returns += np.where(done, 0.0, rew)
            done |= term | trunc
            steps += 1
        return float(returns.mean())

    def close(self) -> None:
        self.env.close()


def _numpy_mean_action(policy, obs_norm):
    """``obs (N, obs_dim) float64 -> mean action (N, d) float64`` of ``policy`` with the
    normalizer's current statistics, in numpy: the evaluation's 1,000 small forward passes
    per episode cost a few microseconds each instead of torch's per-op overhead (float32,
    as the policy computes). Falls back to torch for layers other than Linear / Tanh / ReLU."""
    ops = policy.numpy_mean()
    if ops is None:
        return _torch_mean_action(policy, obs_norm)

    def act(obs):
        x = obs.astype(np.float32)
        if obs_norm is not None:
            x = obs_norm.numpy(x)
        return run_numpy_layers(ops, x).astype(np.float64)

    return act


def _torch_mean_action(policy, obs_norm):
    device = next(policy.parameters()).device

    @torch.no_grad()
    def act(obs):
        x = torch.as_tensor(obs, dtype=torch.float32, device=device)
        if obs_norm is not None:
            x = obs_norm(x)
        return policy.mean_action(x).cpu().double().numpy()

    return act


def evaluate(
    policy,
    obs_norm,
    env_id: str,
    episodes: int,
    seed: int,
    device=None,
    *,
    backend: str = "auto",
    clip_actions: bool = False,
) -> float:
    """One evaluation of ``episodes`` deterministic episodes (``trpl-fast eval``)."""
    ev = Evaluator(env_id, episodes, seed, backend=backend, clip_actions=clip_actions)
    try:
        return ev(policy, obs_norm, 0)
    finally:
        ev.close()


def run_summary(
    iterations: np.ndarray, evals: np.ndarray, n_iterations: int, finished_after: int | None = None
) -> dict:
    """``{"early": mean return of the "20%" window, "final": of the last 20 evaluations,
    "evaluations": how many were logged}`` from a run's ``progress.csv`` columns
    ``iteration`` and ``eval_return_mean`` (NaN where an iteration was not evaluated);
    NaN where the run has not reached a window yet. ``n_iterations``: the run's planned
    iterations; ``finished_after`` (default: the same): how many count as finished (runs
    of versions before 2026-11-29 rounded their budget down to whole iterations)."""
    if finished_after is not None:
        n_done = min(n_iterations, finished_after)
    else:
        n_done = n_iterations
    iterations = np.asarray(iterations, dtype=np.int64)
    evals = np.asarray(evals, dtype=np.float64)
    have = {int(i): float(v) for i, v in zip(iterations, evals) if v == v}
    start = int(math.floor(EARLY_FRACTION * n_iterations))
    early_its = sorted(i for i in have if i >= start)[:SUMMARY_WINDOW]
    done = max(have) + 1 if have else 0
    early = (
        float(np.mean([have[i] for i in early_its]))
        if len(early_its) == SUMMARY_WINDOW or (early_its and done >= n_done)
        else math.nan
    )
    final_its = sorted(have)[-SUMMARY_WINDOW:]
    final = float(np.mean([have[i] for i in final_its])) if final_its and done >= n_done else math.nan
    return {"early": early, "final": final, "evaluations": len(have)}
