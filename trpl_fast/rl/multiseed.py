"""Many seeds of one config as one batched job (``trpl-fast train --seeds 0 1 2 ...``).

The paper's MLPs are tiny (64x64): on one CPU thread a minibatch step of one seed costs
about as much as the same step for four seeds stacked, because the time goes into Python,
the dispatcher and kernel launches, not into flops. So the seeds run in lockstep with a
leading seed dimension S everywhere:

* **networks**: per-seed weights stacked, ``(S, out, in)``, and applied with one
  ``torch.baddbmm`` per layer (:class:`StackedLinear`). Measured on one CPU thread (S=4,
  minibatch 32 per seed, 17-64-64-6 MLP, forward + backward + fused Adam, best of 5, in
  units of ONE seed's ``nn.Linear`` step): ``baddbmm`` 1.34x, ``einsum`` 2.1x (it permutes
  and reshapes around its bmm), a Python loop over 4 modules 2.9x, ``vmap`` over
  ``torch.func.functional_call`` 3.8x (its batching rules and pytree handling run per op,
  in Python). ``baddbmm``'s forward is also bit-identical to ``nn.Linear``'s there.
* **one Adam** over the stacked parameters: Adam is elementwise, so it is per seed by
  construction; gradient clipping is per seed (:func:`clip_grad_norm_per_seed`). The
  learning-rate schedule is a function of the iteration only, which all seeds share.
* **losses** are per-seed weighted means, summed over seeds before ``backward``: seed k's
  parameters only see seed k's loss (a test perturbs one seed's data and checks the others'
  gradients).
* **projection**: the seed dimension is one more batch dimension of the layer (mean
  ``(S, B, d)``); entropy control gets each seed's own schedule (its own initial entropy).
* **random streams**: per seed exactly the single run's: the networks are initialized
  after ``torch.manual_seed(seed)``, the action noise comes from
  ``numpy.random.default_rng(seed)`` (as a single run's :class:`~.rollout.Actor`), minibatch
  permutations come from ``torch.Generator().manual_seed(seed)``, the environments of
  seed k are made with seed k (one vector env per seed, so EnvPool seeds its sub-envs
  seed, seed + 1, ... as a single run does).
* **normalizers**, episode bookkeeping and evaluations are per seed.

Each seed writes ``DIR/seed<k>/`` with exactly a single run's files (``config.json`` with
its own seed, ``progress.csv``, TensorBoard events, ``checkpoint.pt`` in the single-run
format), so ``trpl-fast eval``, ``plot`` and the experiment tables read them unchanged and a
seed can even be resumed alone with ``trpl-fast train --resume DIR/seed<k>``.

Not batched: ``trpo`` (a per-seed line search) and full covariances.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..projection import EntropySchedule, TrustRegionProjection
from .advantages import gae
from .checkpoint import (
    catch_sigterm,
    check_resumable,
    check_resume_config,
    check_terminated,
    read_checkpoint,
    save_checkpoint,
)
from .compiled_step import clip_by_seed_norm, compiled_step
from .config import PROJECTIONS, TrainConfig, planned_iterations
from .envs import envpool_pool, make_vec_env
from .evaluation import (
    MAX_EVAL_STEPS,
    EvaluatedRows,
    Evaluator,
    eval_seed,
    make_evaluator,
    settle_for_checkpoint,
)
from .losses import importance_ratio
from .normalization import ObservationNormalizer, RewardNormalizer, RunningMeanStd
from .policies import GaussianPolicy, ValueNetwork, run_numpy_layers
from .rollout import Actor, Rollout
from .runlog import CSV_COLUMNS, PhaseClock, RunLog, check_run_dir, read_progress, run_files
from .train import (
    CHECKPOINT_FORMAT,
    Batch,
    TrainingDiverged,
    checkpoint_due,
    device_synchronizer,
    evaluation_due,
    layer_reaches_func_grad,
    make_policy,
    resolve_device,
    set_learning_rates,
)

BATCHED_ALGOS = ("kl", "w2", "frob", "ppo", "ppo-m")
_SEED_DIR = re.compile(r"^seed(-?\d+)$")


def seed_dir(out: str | Path, seed: int) -> Path:
    return Path(out) / f"seed{seed}"


def find_seed_dirs(out: str | Path) -> list[int]:
    """The seeds of a batched run directory (its ``seed<k>/`` subdirectories holding a
    run), sorted; [] for anything else."""
    out = Path(out)
    if not out.is_dir():
        return []
    seeds = [int(m.group(1)) for p in out.iterdir() if p.is_dir() and (m := _SEED_DIR.match(p.name)) and run_files(p)]
    return sorted(seeds)


def check_batchable(cfg: TrainConfig, seeds) -> list[int]:
    """Raise naming the argument when ``cfg`` / ``seeds`` cannot be trained batched."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    if any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
        raise ValueError(f"--seeds: seeds must be integers, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: each seed at most once, got {seeds}")
    if any(not 0 <= s < 2**28 for s in seeds):  # evaluation seeds live above 2^28 (evaluation.py)
        raise ValueError(f"--seeds: seeds must be in [0, 2^28), got {seeds}")
    if cfg.algo not in BATCHED_ALGOS:
        raise ValueError(
            f"--seeds: algo {cfg.algo!r} is not supported batched (supported: {', '.join(BATCHED_ALGOS)}); "
            "train its seeds one by one (--seed) or with `trpl-fast experiment`"
        )
    if cfg.cov_form != "diag":
        raise ValueError(
            "--seeds: cov_form 'full' is not supported batched (diagonal covariances only); train its "
            "seeds one by one (--seed) or with `trpl-fast experiment`"
        )
    return seeds


# -- stacked networks ---------------------------------------------------------------------


class StackedLinear(nn.Module):
    """S linear layers applied to S batches at once: ``(S, B, in) -> (S, B, out)``.
    ``weight`` (S, out, in) and ``bias`` (S, out), so ``weight[k]`` is seed k's
    ``nn.Linear.weight`` and state dicts slice into the single-run format."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([lin.weight.detach() for lin in layers]).clone())
        self.bias = nn.Parameter(torch.stack([lin.bias.detach() for lin in layers]).clone())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # (S, in): one row per seed
            return self.forward(x.unsqueeze(1)).squeeze(1)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.mT)


def _stack_sequential(seqs: list[nn.Sequential]) -> nn.Sequential:
    """The same layer indices as the single networks (``body.0.weight``, ...)."""
    out = []
    for i, layer in enumerate(seqs[0]):
        out.append(StackedLinear([s[i] for s in seqs]) if isinstance(layer, nn.Linear) else copy.deepcopy(layer))
    return nn.Sequential(*out)


class _SeedSlices:
    """State dicts of one seed in the single network's format, and back."""

    def seed_state_dict(self, k: int) -> dict:
        return {name: t[k].clone() for name, t in self.state_dict().items()}

    @torch.no_grad()
    def load_seed_state_dict(self, k: int, state: dict) -> None:
        own = self.state_dict()
        if set(own) != set(state):
            raise ValueError(f"a state dict with keys {sorted(state)} does not fit networks with {sorted(own)}")
        for name, t in own.items():
            if tuple(state[name].shape) != tuple(t.shape[1:]):
                raise ValueError(f"{name}: shape {tuple(state[name].shape)} does not fit {tuple(t.shape[1:])}")
            t[k].copy_(state[name])


class StackedPolicy(_SeedSlices, GaussianPolicy):
    """S :class:`GaussianPolicy` of one architecture (diagonal covariance): ``forward(obs
    (S, B, obs_dim)) -> (mean (S, B, d), std (S, B, d))``. Parameters in the single
    policy's order and names with a leading seed dimension; the distribution methods
    (``log_prob``, ``entropy``, ``kl``, ``set_global_cov``) are the single policy's, which
    take any leading dimensions."""

    def __init__(self, policies: list[GaussianPolicy]):
        nn.Module.__init__(self)
        p0 = policies[0]
        if p0.cov_form != "diag":
            raise ValueError("StackedPolicy: diagonal covariances only")
        for name in ("factor", "cov_form", "cov_type", "_dist", "act_dim", "min_std", "n_diag", "n_off"):
            setattr(self, name, getattr(p0, name))
        # registration order = GaussianPolicy's, so parameters() and the optimizer state line up
        self.body = _stack_sequential([p.body for p in policies])
        self.mean_head = StackedLinear([p.mean_head for p in policies])
        if self.cov_type == "global":
            self.cov_diag = nn.Parameter(torch.stack([p.cov_diag.detach() for p in policies]).clone())
            self.cov_off = nn.Parameter(torch.stack([p.cov_off.detach() for p in policies]).clone())
        else:
            self.cov_head = StackedLinear([p.cov_head for p in policies])
        self.register_buffer("_tril_index", p0._tril_index.clone(), persistent=False)

    def _raw_cov(self, features: Tensor) -> tuple[Tensor, Tensor]:
        if self.cov_type == "global":
            shape = features.shape[:-1]  # (S, B)
            return (
                self.cov_diag.unsqueeze(1).expand(*shape, self.n_diag),
                self.cov_off.unsqueeze(1).expand(*shape, self.n_off),
            )
        return super()._raw_cov(features)

    def global_sampling_factor(self):
        """The stds (S, 1, d): they broadcast over each seed's (S, N, d) noise."""
        std = super().global_sampling_factor()
        return None if std is None else std[:, None, :]


class StackedValue(_SeedSlices, nn.Module):
    """S :class:`ValueNetwork`: ``forward(obs (S, B, obs_dim)) -> values (S, B)``."""

    def __init__(self, values: list[ValueNetwork]):
        super().__init__()
        self.body = _stack_sequential([v.body for v in values])
        self.head = StackedLinear([v.head for v in values])

    def forward(self, obs: Tensor) -> Tensor:
        return self.head(self.body(obs)).squeeze(-1)


# -- per-seed optimizer state, gradient clipping, losses ------------------------------------

_PER_ELEMENT = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def seed_optimizer_state(sd: dict, k: int) -> dict:
    """Seed k's part of the state dict ``sd`` of an Adam over stacked parameters, in the
    format of a single run's Adam (its moments sliced; the step count is shared)."""
    state = {
        i: {name: (v[k].clone() if name in _PER_ELEMENT else v.clone()) for name, v in s.items()}
        for i, s in sd["state"].items()
    }
    return {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}


def load_seed_optimizer_states(opt: torch.optim.Optimizer, states: list[dict]) -> None:
    """Stack the seeds' single-run Adam states (all at the same step) into ``opt``."""
    if not any(s["state"] for s in states):
        return  # interrupted before the first step: nothing to restore
    first = states[0]
    stacked = {}
    for i, s in first["state"].items():
        stacked[i] = {
            name: (torch.stack([st["state"][i][name] for st in states]) if name in _PER_ELEMENT else v.clone())
            for name, v in s.items()
        }
    lr_like = [g["lr"] for g in opt.param_groups]
    opt.load_state_dict({"state": stacked, "param_groups": copy.deepcopy(first["param_groups"])})
    for g, lr in zip(opt.param_groups, lr_like):  # keep a tensor lr a tensor (compiled steps)
        if isinstance(lr, Tensor) and not isinstance(g["lr"], Tensor):
            g["lr"] = lr.fill_(float(g["lr"]))


def clip_grad_norm_per_seed(params: list[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` per seed: each seed's gradients (index k of the
    leading dimension of every parameter) scaled by its own total norm. Returns the
    norms (S,)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
    return norms


def seed_mean(x: Tensor, weight: Tensor) -> Tensor:
    """Per-seed weighted mean of ``x`` (S, B) with 0 / 1 ``weight`` (S, B): (S,). As
    :func:`~trpl_fast.rl.losses.weighted_mean`, per row."""
    return (x * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)


def normalize_per_seed(adv: Tensor, weight: Tensor) -> Tensor:
    """:func:`~trpl_fast.rl.train.normalize_advantages` per seed: ``adv``, ``weight`` (S, B)."""
    count = weight.sum(-1, keepdim=True)
    mean = (weight * adv).sum(-1, keepdim=True) / count.clamp_min(1.0)
    var = (weight * (adv - mean) ** 2).sum(-1, keepdim=True) / (count - 1.0).clamp_min(1.0)
    return (adv - mean) / (var.sqrt() + 1e-8)


class _SeedSchedules:
    """Entropy targets of every seed (each from its own initial entropy) as a (S, 1)
    tensor, the shape the layer's entropy control broadcasts against its (S, B) entropies."""

    def __init__(self, schedules: list[EntropySchedule], device):
        self.schedules, self.device = schedules, device

    def __call__(self, step: int, d: int) -> Tensor:
        return torch.tensor([[s(step, d)] for s in self.schedules], device=self.device)


# -- collection ---------------------------------------------------------------------------


class StackedRewardNormalizer(RewardNormalizer):
    """:class:`RewardNormalizer` per seed: rewards and done flags (S, N)."""

    def __init__(self, seeds: int, num_envs: int, gamma: float, clip: float | None = 10.0, eps: float = 1e-8):
        super().__init__(num_envs, gamma, clip, eps)
        self.stats = RunningMeanStd((seeds,))
        self.ret = torch.zeros(seeds, num_envs, dtype=torch.float64)

    def numpy(self, rewards: np.ndarray, done: np.ndarray) -> np.ndarray:
        self._ret = self._ret * self.gamma + rewards
        self.stats.update(self._ret.T)  # (N, S): statistics over each seed's own environments
        self._ret = np.where(done, 0.0, self._ret)
        out = rewards.astype(np.float32) / np.sqrt(self.stats._var + self.eps).astype(np.float32)[:, None]
        return out if self.clip is None else np.clip(out, -self.clip, self.clip)

    def seed_state_dict(self, k: int) -> dict:
        s = self.stats
        return {
            "stats": {"mean": s.mean[k].clone(), "var": s.var[k].clone(), "count": s.count.clone()},
            "ret": self.ret[k].clone(),
        }

    def load_seed_state_dicts(self, states: list[dict]) -> None:
        self.stats.mean = torch.stack([s["stats"]["mean"] for s in states])
        self.stats.var = torch.stack([s["stats"]["var"] for s in states])
        self.stats.count = states[0]["stats"]["count"]
        self.ret = torch.stack([s["ret"] for s in states])


class StackedObservationNormalizer(ObservationNormalizer):
    """:class:`ObservationNormalizer` per seed: observations (S, N, obs_dim), statistics
    (S, obs_dim) (every seed sees the same number of observations, so one count)."""

    def __init__(self, seeds: int, obs_dim: int, clip: float | None = 10.0, eps: float = 1e-8):
        super().__init__((seeds, obs_dim), clip, eps)

    def numpy(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        if update:  # RunningMeanStd reduces over the leading dimension: each seed's N observations
            self.stats.update(obs.swapaxes(0, 1))
        return self._apply(obs, self.stats._mean[:, None, :], self.stats._var[:, None, :])

    def __call__(self, obs: Tensor, update: bool = False) -> Tensor:
        return super().__call__(obs.transpose(0, 1), update).transpose(0, 1)

    def seed_state_dict(self, k: int) -> dict:
        s = self.stats
        return {"mean": s.mean[k].clone(), "var": s.var[k].clone(), "count": s.count.clone()}

    def load_seed_state_dicts(self, states: list[dict]) -> None:
        self.stats.mean = torch.stack([s["mean"] for s in states])
        self.stats.var = torch.stack([s["var"] for s in states])
        self.stats.count = states[0]["count"]


class StackedActor(Actor):
    """Draws every seed's action noise from its own generator (``rngs[k]``: the stream seed
    k's single run draws from); observations and actions (S, N, ...)."""

    def __init__(self, policy: StackedPolicy, device: torch.device, rngs: list[np.random.Generator]):
        self.rngs = rngs
        super().__init__(policy, device, rngs[0])

    def noise(self, shape: tuple) -> np.ndarray:
        return np.stack([g.standard_normal(shape[1:], dtype=np.float32) for g in self.rngs])


class SeedEnvs:
    """Every seed's training environments: ``num_envs`` sub-environments per seed, seeded
    as its single run's (``seed``, ``seed + 1``, ...). One EnvPool for all seeds (each
    sub-env given its own seed), stepped once for all instead of once per seed -- measured
    186 vs 351 us per step for 4 HalfCheetahs on one thread -- unless the backend is
    Gymnasium: then one vector env per seed (each saves its own state). With ``auto``
    that pool is EnvPool even for one env per seed, where a single run of the same seed
    steps Gymnasium's env (``envs.make_vec_env``): give ``env_backend`` to compare the two
    bit for bit."""

    def __init__(self, cfgs: list[TrainConfig], seed_offset: int = 0):
        c0, S, N = cfgs[0], len(cfgs), cfgs[0].num_envs
        self.num_seeds, self.num_envs = S, N
        seeds = [c.seed + seed_offset + i for c in cfgs for i in range(N)]
        self.fused = envpool_pool(c0.env_id, seeds, c0.env_backend) if S > 1 else None
        self.envs: list = []
        if self.fused is None:
            try:
                for c in cfgs:
                    self.envs.append(make_vec_env(c.env_id, N, c.seed + seed_offset, backend=c.env_backend))
            except BaseException:
                self.close()
                raise
        first = self.fused if self.fused is not None else self.envs[0]
        self.obs_dim, self.act_dim, self.backend = first.obs_dim, first.act_dim, first.backend

    def reset(self) -> np.ndarray:
        """Observations (S, N, obs_dim)."""
        if self.fused is not None:
            return self.fused.reset().reshape(self.num_seeds, self.num_envs, -1)
        return np.stack([e.reset() for e in self.envs])

    def step(self, actions: np.ndarray, clip: bool):
        """``actions`` (S, N, act_dim) -> observations (S, N, obs_dim), rewards, terminated,
        truncated (S, N), as :meth:`VecEnv.step`."""
        S, N = self.num_seeds, self.num_envs
        if self.fused is not None:
            obs, rew, term, trunc = self.fused.step(actions.reshape(S * N, -1), clip=clip)
            return obs.reshape(S, N, -1), rew.reshape(S, N), term.reshape(S, N), trunc.reshape(S, N)
        out = [e.step(a, clip=clip) for e, a in zip(self.envs, actions)]
        return tuple(np.stack(x) for x in zip(*out))

    @property
    def can_save_state(self) -> bool:
        return self.fused is None and all(e.can_save_state for e in self.envs)

    def get_state(self, k: int):
        """Seed k's environment state in a single run's format, or None."""
        return self.envs[k].get_state() if self.can_save_state else None

    def set_state(self, k: int, state: dict) -> None:
        self.envs[k].set_state(state)

    def close(self) -> None:
        for e in ([self.fused] if self.fused is not None else []) + self.envs:
            e.close()


class StackedCollector:
    """:class:`~trpl_fast.rl.rollout.Collector` for S seeds in lockstep (:class:`SeedEnvs`);
    buffers (T, S, N, ...)."""

    def __init__(
        self,
        envs: SeedEnvs,
        *,
        obs_norm=None,
        rew_norm=None,
        clip_actions: bool = False,
        time_limit_terminal: bool = False,
    ):
        self.envs, self.obs_norm, self.rew_norm = envs, obs_norm, rew_norm
        self.clip_actions, self.time_limit_terminal = clip_actions, time_limit_terminal
        S, N = envs.num_seeds, envs.num_envs
        self.raw_obs = envs.reset()
        self.prev_done = np.zeros((S, N), dtype=bool)
        self.episode_return = np.zeros((S, N))
        self.finished_returns: list[list[float]] = [[] for _ in range(S)]

    def collect(self, actor: StackedActor, steps_per_env: int) -> Rollout:
        T, S, N = steps_per_env, self.envs.num_seeds, self.envs.num_envs
        obs_dim, act_dim = self.envs.obs_dim, self.envs.act_dim
        obs_buf = np.zeros((T, S, N, obs_dim), np.float32)
        next_buf = np.zeros((T, S, N, obs_dim), np.float32)
        act_buf = np.zeros((T, S, N, act_dim), np.float32)
        rew_buf = np.zeros((T, S, N), np.float32)
        term_buf, trunc_buf, valid_buf = (np.zeros((T, S, N), bool) for _ in range(3))
        norm = self.obs_norm
        for t in range(T):
            x = self.raw_obs.astype(np.float32)
            obs = norm.numpy(x, update=True) if norm else x
            action = actor.act(obs)
            raw_next, rew, te, tr = self.envs.step(action, clip=self.clip_actions)
            if self.time_limit_terminal:
                te, tr = te | tr, np.zeros_like(tr)
            valid = ~self.prev_done
            rew = np.where(valid, rew, 0.0)
            self.episode_return += rew
            done = (te | tr) & valid
            if done.any():
                for k in np.flatnonzero(done.any(1)):
                    self.finished_returns[k] += self.episode_return[k][done[k]].tolist()
                self.episode_return[done] = 0.0
            obs_buf[t], act_buf[t] = obs, action
            rew_buf[t] = self.rew_norm.numpy(rew, done) if self.rew_norm else rew
            xn = raw_next.astype(np.float32)
            next_buf[t] = norm.numpy(xn) if norm else xn
            term_buf[t], trunc_buf[t], valid_buf[t] = te & valid, tr & valid, valid
            self.prev_done = te | tr
            self.raw_obs = raw_next
        return Rollout(
            *(torch.from_numpy(a) for a in (obs_buf, next_buf, act_buf, rew_buf, term_buf, trunc_buf, valid_buf))
        )

    def seed_loop_state(self, k: int) -> dict:
        """Seed k's part, in :meth:`Collector.loop_state`'s format."""
        return {
            "raw_obs": self.raw_obs[k].copy(),
            "prev_done": self.prev_done[k].copy(),
            "episode_return": self.episode_return[k].copy(),
            "finished_returns": list(self.finished_returns[k]),
        }

    def load_seed_loop_states(self, loops: list[dict], restore_episodes: bool) -> None:
        self.finished_returns = [list(loop["finished_returns"]) for loop in loops]
        if restore_episodes:
            self.raw_obs = np.stack([loop["raw_obs"] for loop in loops])
            self.prev_done = np.stack([loop["prev_done"] for loop in loops])
            self.episode_return = np.stack([loop["episode_return"] for loop in loops])


# -- advantages, updates, metrics -----------------------------------------------------------


def _by_seed(x: Tensor) -> Tensor:
    """(T, S, N, ...) -> (S, T * N, ...): each seed's rows in a single run's order (t * N + n)."""
    T, S, N = x.shape[:3]
    # contiguous: with N = 1 reshape returns a strided view, and every minibatch gather
    # would then copy the whole batch first
    return x.transpose(0, 1).reshape(S, T * N, *x.shape[3:]).contiguous()


@torch.no_grad()
def stacked_advantages(rollout: Rollout, policy: StackedPolicy, value: StackedValue, cfg: TrainConfig, device) -> Batch:
    """:func:`~trpl_fast.rl.train.compute_advantages` per seed: a :class:`Batch` whose
    tensors are (S, T * N, ...)."""
    T, S, N = rollout.rewards.shape
    obs = _by_seed(rollout.obs).to(device)
    values = value(obs).cpu().reshape(S, T, N).transpose(0, 1)  # (T, S, N)
    next_values = value(_by_seed(rollout.next_obs).to(device)).cpu().reshape(S, T, N).transpose(0, 1)

    def flat(x):  # GAE runs down each column: one per seed's env
        return x.reshape(T, S * N)

    adv, returns = gae(
        flat(rollout.rewards),
        flat(values),
        flat(next_values),
        flat(rollout.terminated),
        flat(rollout.truncated),
        cfg.gamma,
        cfg.gae_lambda,
    )
    adv, returns = _by_seed(adv.reshape(T, S, N)).to(device), _by_seed(returns.reshape(T, S, N)).to(device)
    actions = _by_seed(rollout.actions).to(device)
    weight = _by_seed(rollout.valid).to(device=device, dtype=torch.float32)
    if cfg.advantage_normalization == "batch":
        adv = normalize_per_seed(adv, weight)
    old_mean, old_cov = policy(obs)
    return Batch(
        obs=obs,
        actions=actions,
        advantages=adv,
        returns=returns,
        values=_by_seed(values).to(device),
        weight=weight,
        old_mean=old_mean,
        old_cov=old_cov,
        old_logp=policy.log_prob(old_mean, old_cov, actions),
    )


def seed_minibatches(tensors: tuple[Tensor, ...], size: int, gens: list[torch.Generator]):
    """One epoch of per-seed minibatches of ``tensors`` (each (S, n, ...)): seed k's rows in
    the order of a fresh permutation from ``gens[k]`` (the one its single run draws),
    ``size`` rows per seed at a time, as tuples of (S, size, ...) views. One gather per
    tensor per epoch, not per minibatch."""
    S, n = tensors[0].shape[:2]
    device = tensors[0].device
    perm = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
    seed = torch.arange(S, device=device).unsqueeze(1)
    return zip(*(t[seed, perm].split(size, dim=1) for t in tensors))


def _finite_seed_losses(losses: list[Tensor], name: str, iteration: int, seeds: list[int]) -> list[list[float]]:
    """The epoch's minibatch losses per seed (one host sync): ``[seed][step]``; raise
    :class:`TrainingDiverged` naming the seed of the first non-finite one."""
    if not losses:
        return [[] for _ in seeds]
    values = torch.stack(losses).T.tolist()
    for k, per_seed in enumerate(values):
        for i, v in enumerate(per_seed):
            if not math.isfinite(v):
                raise TrainingDiverged(
                    f"seed {seeds[k]}: {name} loss is {v} at iteration {iteration} (minibatch step {i} of the epoch)"
                )
    return values


class StackedUpdater:
    """The policy's and value function's minibatch steps for all seeds at once: per-seed
    losses (S,), summed for one ``backward``; eager or compiled whole (``compile``)."""

    def __init__(
        self,
        cfg: TrainConfig,
        seeds: list[int],
        policy: StackedPolicy,
        value: StackedValue,
        opt_pi,
        opt_vf,
        layer: TrustRegionProjection | None,
        compile: bool = False,
    ):
        self.cfg, self.seeds, self.policy, self.value = cfg, seeds, policy, value
        self.opt_pi, self.opt_vf, self.layer = opt_pi, opt_vf, layer
        self.policy_step, self.value_step = self._policy_step, self._value_step
        if compile:
            torch.compiler.reset()  # as train.Updater: earlier runs' graphs only eat the recompile limit
            # as train.Updater: one graph per step where torch.func reaches (compiled_step.py)
            clip = clip_by_seed_norm(cfg.max_grad_norm) if cfg.max_grad_norm is not None else None
            w = policy.body[0].weight  # (S, out, in): a probe of one state per seed
            probe = torch.zeros(w.shape[0], 1, w.shape[2], device=w.device)
            reaches = layer is None or layer_reaches_func_grad(layer, policy, probe)
            self.policy_step = compiled_step(policy, opt_pi, self.policy_losses, self._policy_step, clip, reaches)
            self.value_step = compiled_step(value, opt_vf, self.value_losses, self._value_step, clip)

    def policy_losses(self, forward, obs, actions, adv, weight, old_mean, old_cov, old_logp, step) -> Tensor:
        """Per-seed losses (S,) of one minibatch, every argument (S, M, ...); ``forward``: the
        stacked policy (or a functional call of it)."""
        cfg, policy = self.cfg, self.policy
        if cfg.advantage_normalization == "minibatch":
            adv = normalize_per_seed(adv, weight)
        mean, cov = forward(obs)
        if self.layer is not None:
            mean_t, cov_t = self.layer(mean, cov, old_mean, old_cov, step=step) if cfg.projection else (mean, cov)
            ratio = importance_ratio(policy.log_prob(mean_t, cov_t, actions), old_logp)
            return -seed_mean(ratio * adv, weight) + self.layer.regression_weight * seed_mean(
                self.layer.regression_distance(mean, cov, mean_t, cov_t), weight
            )
        ratio = importance_ratio(policy.log_prob(mean, cov, actions), old_logp)
        clipped = ratio.clamp(1.0 - cfg.ratio_clip, 1.0 + cfg.ratio_clip)
        return -seed_mean(torch.minimum(ratio * adv, clipped * adv), weight)

    def value_losses(self, forward, obs, returns, old_values, weight) -> Tensor:
        values, clip = forward(obs), self.cfg.vf_clip
        sq = (values - returns) ** 2
        if clip is not None:
            sq = torch.maximum(sq, (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2)
        return 0.5 * seed_mean(sq, weight)

    def _step(self, losses: Tensor, module: nn.Module, opt) -> Tensor:
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # seed k's parameters only reach seed k's loss
        if self.cfg.max_grad_norm is not None:
            clip_grad_norm_per_seed(list(module.parameters()), self.cfg.max_grad_norm)
        opt.step()
        return losses.detach()

    def _policy_step(self, obs, actions, adv, weight, old_mean, old_cov, old_logp, step) -> Tensor:
        losses = self.policy_losses(self.policy, obs, actions, adv, weight, old_mean, old_cov, old_logp, step)
        return self._step(losses, self.policy, self.opt_pi)

    def _value_step(self, obs, returns, old_values, weight) -> Tensor:
        return self._step(self.value_losses(self.value, obs, returns, old_values, weight), self.value, self.opt_vf)

    def update_policy(self, b: Batch, gens, global_step: int, iteration: int) -> list[list[float]]:
        """``epochs`` passes of minibatch steps; the losses ``[seed][step]``."""
        cfg = self.cfg
        step = global_step if cfg.entropy_control is not None else None
        fields = (b.obs, b.actions, b.advantages, b.weight, b.old_mean, b.old_cov, b.old_logp)
        losses = [[] for _ in self.seeds]
        for _ in range(cfg.epochs):
            epoch = [self.policy_step(*rows, step) for rows in seed_minibatches(fields, cfg.minibatch_size, gens)]
            for k, v in enumerate(_finite_seed_losses(epoch, "policy", iteration, self.seeds)):
                losses[k] += v
        return losses

    def update_value(self, b: Batch, gens, iteration: int) -> list[list[float]]:
        fields = (b.obs, b.returns, b.values, b.weight)
        losses = [[] for _ in self.seeds]
        for _ in range(self.cfg.epochs_vf):
            epoch = [self.value_step(*rows) for rows in seed_minibatches(fields, self.cfg.minibatch_size, gens)]
            for k, v in enumerate(_finite_seed_losses(epoch, "value", iteration, self.seeds)):
                losses[k] += v
        return losses


@torch.no_grad()
def stacked_policy_metrics(
    policy: StackedPolicy, layer: TrustRegionProjection | None, b: Batch, cfg: TrainConfig, global_step: int
) -> list[dict]:
    """:func:`~trpl_fast.rl.train.policy_metrics` per seed (over each seed's valid states);
    copies each seed's projected global covariance into its policy."""
    mean, cov = policy(b.obs)
    S = mean.shape[0]
    if layer is None:
        out = []
        for k in range(S):
            v = b.valid[k]
            kl = policy.kl(mean[k][v], cov[k][v], b.old_mean[k][v], b.old_cov[k][v])
            out.append(
                {
                    "kl_mean": kl.mean().item(),
                    "kl_max": kl.max().item(),
                    "entropy_mean": policy.entropy(cov[k][v]).mean().item(),
                    "fraction_projected": 0.0,
                }
            )
        return out
    # one projection of all seeds (the entropy schedules are per seed), metrics per seed
    new_mean, new_cov = layer(mean, cov, b.old_mean, b.old_cov, step=global_step)
    converged = layer.last_converged if layer.kind == "kl" else None
    out = []
    for k in range(S):
        v = b.valid[k]
        out.append(
            layer.metrics(
                new_mean[k][v],
                new_cov[k][v],
                b.old_mean[k][v],
                b.old_cov[k][v],
                mean[k][v],
                cov[k][v],
                converged=None if converged is None else converged[k][v],
            )
        )
    if not cfg.contextual_cov:
        first = b.valid.to(torch.int8).argmax(1)  # each seed's first valid state (all states share the cov)
        policy.set_global_cov(new_cov[torch.arange(S, device=new_cov.device), first])
    return out


# -- evaluation -----------------------------------------------------------------------------


class StackedEvaluator:
    """Every seed's evaluation (as :class:`Evaluator`: ``eval_episodes`` episodes of the
    mean action, its own seed stream), stepped in lockstep with one batched forward.

    With EnvPool (``auto`` included: one pool steps several envs) all seeds' episodes run
    in one pool (S x E sub-envs, each seeded as its single run's EnvPool evaluation env),
    stepped once for all seeds: the evaluation is most of a batched iteration's simulator
    steps. (``auto`` gives a single run with ``eval_episodes=1`` Gymnasium's env instead.)
    The pool steps until every seed's episodes are done; a seed's returns count its own
    episodes only. (Its envs may then be stepped past the point a single run stops at, so
    with tasks whose episodes end early the later evaluations start elsewhere than the
    single run's -- EnvPool evaluations are not reproducible across resumes either.)
    Gymnasium: one evaluator per seed, reseeded per evaluation as the single run's, each
    seed stopping when its episodes are done."""

    def __init__(self, cfg: TrainConfig, seeds: list[int], first_iteration: int):
        E = cfg.eval_episodes
        self.episodes, self.clip_actions, self.max_steps = E, cfg.clip_actions, MAX_EVAL_STEPS
        self.evaluators, self.fused = [], None
        try:
            if len(seeds) > 1:
                env_seeds = [eval_seed(s, first_iteration, E) + i for s in seeds for i in range(E)]
                self.fused = envpool_pool(cfg.env_id, env_seeds, cfg.env_backend)
            if self.fused is None:
                for s in seeds:
                    self.evaluators.append(
                        Evaluator(
                            cfg.env_id,
                            E,
                            s,
                            backend=cfg.env_backend,
                            clip_actions=cfg.clip_actions,
                            first_iteration=first_iteration,
                        )
                    )
        except BaseException:
            self.close()
            raise
        self.num_seeds = len(seeds)

    @torch.no_grad()
    def __call__(
        self, policy: StackedPolicy, obs_norm: StackedObservationNormalizer | None, iteration: int
    ) -> list[float]:
        S, E = self.num_seeds, self.episodes
        evs = self.evaluators
        for ev in evs:
            if ev.env.backend == "gymnasium":
                ev.env.env.reset(seed=eval_seed(ev.seed, iteration, E))
        if self.fused is not None:
            obs = self.fused.reset().reshape(S, E, -1)
        else:
            obs = np.stack([ev.env.reset() for ev in evs])  # (S, E, obs_dim)
        ops = policy.numpy_mean()  # numpy per step, as Evaluator (the weights are frozen here)
        returns = np.zeros((S, E))
        done = np.zeros((S, E), dtype=bool)
        steps = 0
        while not done.all() and steps < self.max_steps:
            x = obs.astype(np.float32)
            if obs_norm is not None:
                x = obs_norm.numpy(x)
            if ops is not None:
                action = run_numpy_layers(ops, x).astype(np.float64)
            else:
                device = next(policy.parameters()).device
                action = policy.mean_action(torch.from_numpy(x).to(device)).cpu().double().numpy()
            if self.fused is not None:
                o, rew, term, trunc = self.fused.step(action.reshape(S * E, -1), clip=self.clip_actions)
                obs, rew, term, trunc = o.reshape(S, E, -1), rew.reshape(S, E), term.reshape(S, E), trunc.reshape(S, E)
                returns += np.where(done, 0.0, rew)
                done |= term | trunc
            else:
                for k, ev in enumerate(evs):
                    if done[k].all():
                        continue
                    obs[k], rew, term, trunc = ev.env.step(action[k], clip=ev.clip_actions)
                    returns[k] += np.where(done[k], 0.0, rew)
                    done[k] |= term | trunc
            steps += 1
        return returns.mean(1).tolist()

    def close(self) -> None:
        if self.fused is not None:
            self.fused.close()
        for ev in self.evaluators:
            ev.close()


# -- the loop -------------------------------------------------------------------------------


def _seed_configs(cfg: TrainConfig, seeds: list[int]) -> list[TrainConfig]:
    import dataclasses

    return [dataclasses.replace(cfg, seed=s) for s in seeds]


def train_seeds(
    cfg: TrainConfig,
    seeds,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log_tensorboard: bool = True,
    dirs=None,
) -> dict[int, list[dict]]:
    """Train ``cfg`` for every seed of ``seeds`` as one batched job into ``out_dir/seed<k>/``
    (each a single run's directory; ``cfg.seed`` is ignored), or into ``dirs`` (one per
    seed, e.g. the experiment runner's ``<env>_<algo>_s<seed>``). Returns the logged rows per
    seed. ``resume``: continue every seed from its checkpoint (all must be at the same
    iteration); ``overwrite`` as for :func:`~trpl_fast.rl.train.train`. Checkpoints,
    Ctrl-C / SIGTERM and the wall-time checkpoints behave as a single run's, for all seeds."""
    out_dir = Path(out_dir)
    cfg.validate()
    seeds = check_batchable(cfg, seeds)
    device = resolve_device(cfg.device)
    device_sync = device_synchronizer(device)
    cfgs = _seed_configs(cfg, seeds)
    if dirs is None:
        dirs = [seed_dir(out_dir, s) for s in seeds]
    elif len(dirs) != len(seeds):
        raise ValueError(f"dirs: one run directory per seed, got {len(dirs)} for {len(seeds)} seeds")
    dirs = [Path(d) for d in dirs]
    check_run_dir(out_dir)
    for d in dirs:
        check_run_dir(d)
    saved = None
    if resume:
        saved = []
        for c, d in zip(cfgs, dirs):
            if not (d / "checkpoint.pt").exists():
                what = "the run stopped before its first checkpoint" if run_files(d) else "no such run"
                raise ValueError(
                    f"no checkpoint at {d / 'checkpoint.pt'} ({what}); start the batch over with --overwrite"
                )
            state = read_checkpoint(d)
            check_resume_config(state["config"], c)
            check_resumable(state, d / "checkpoint.pt")
            saved.append(state)
        its = {s: st["iteration"] for s, st in zip(seeds, saved)}
        if len(set(its.values())) > 1:
            raise ValueError(
                f"the seeds' checkpoints are at different iterations ({its}; a kill while they were "
                f"being written); resume them one by one: trpl-fast train --resume {dirs[0]}"
            )
    else:
        held = [str(d) for d in dirs if run_files(d)]
        if held and not overwrite:
            raise ValueError(
                f"{', '.join(held)} already hold runs; resume the batch (--resume {out_dir}), start it "
                "over (--overwrite) or choose another --out"
            )
    S = len(seeds)

    # -- per seed: what a single run creates right after torch.manual_seed(seed) ------------
    envs = SeedEnvs(cfgs)
    try:
        for c, d in zip(cfgs, dirs):
            d.mkdir(parents=True, exist_ok=True)
            if not resume:
                for name in run_files(d, temporaries=True):
                    (d / name).unlink()
            (d / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
    except BaseException:
        envs.close()
        raise
    obs_dim, act_dim = envs.obs_dim, envs.act_dim
    policies, values, sample_gens, noise_rngs, h0s, np_states = [], [], [], [], [], []
    for c in cfgs:
        torch.manual_seed(c.seed)
        np.random.seed(c.seed)
        np_states.append(np.random.get_state())
        p = make_policy(c, obs_dim, act_dim)
        policies.append(p)
        values.append(ValueNetwork(obs_dim, c.hidden_vf))
        # what a single run's global generator holds from here on (its checkpoint's torch_rng)
        sample_gens.append(torch.Generator().set_state(torch.get_rng_state()))
        noise_rngs.append(np.random.default_rng(c.seed))  # a single run's action noise
        if c.entropy_control is not None:
            with torch.no_grad():
                _, cov0 = p(torch.zeros(1, obs_dim))
            h0s.append(float(p.entropy(cov0).mean()))
        else:
            h0s.append(None)
    perm_gens = [torch.Generator().manual_seed(s) for s in seeds]
    policy = StackedPolicy(policies).to(device)
    value = StackedValue(values).to(device)
    del policies, values
    lr_of = (lambda lr: torch.tensor(lr, device=device)) if cfg.compile_update and cfg.lr_decay else float
    opt_pi = torch.optim.Adam(policy.parameters(), lr=lr_of(cfg.lr), eps=1e-5, fused=True)
    opt_vf = torch.optim.Adam(value.parameters(), lr=lr_of(cfg.lr_vf), eps=1e-5, fused=True)
    obs_norm = StackedObservationNormalizer(S, obs_dim, clip=cfg.obs_clip) if cfg.normalize_obs else None
    rew_norm = (
        StackedRewardNormalizer(S, cfg.num_envs, cfg.gamma, clip=cfg.reward_clip) if cfg.normalize_rewards else None
    )
    if saved:
        h0s = [st["entropy_h0"] for st in saved]
    layer = None
    if cfg.algo in PROJECTIONS:
        schedule = None
        if cfg.entropy_control is not None:
            schedule = _SeedSchedules(
                [
                    EntropySchedule(
                        kappa=cfg.target_entropy, total_steps=cfg.total_steps, initial_entropy=h, tau=cfg.temperature
                    )
                    for h in h0s
                ],
                device,
            )
        layer = TrustRegionProjection(
            cfg.algo,
            cfg.mean_bound,
            cfg.cov_bound,
            cfg.cov_form,
            entropy_control=cfg.entropy_control,
            entropy_schedule=schedule,
            contextual_cov=cfg.contextual_cov,
            regression_weight=cfg.regression_weight,
            check_values=False,
        )

    def new_collector():
        return StackedCollector(
            envs,
            obs_norm=obs_norm,
            rew_norm=rew_norm,
            clip_actions=cfg.clip_actions,
            time_limit_terminal=cfg.time_limit_terminal,
        )

    collector = new_collector()
    start_iteration, global_step, wall_offset = 0, 0, 0.0
    if saved:
        for k, st in enumerate(saved):
            policy.load_seed_state_dict(k, st["policy"])
            value.load_seed_state_dict(k, st["value"])
            sample_gens[k].set_state(st["torch_rng"])
            perm_gens[k].set_state(st["gen_rng"])
            np_states[k] = st["numpy_rng"]
            if st.get("actor_rng") is not None:
                noise_rngs[k].bit_generator.state = st["actor_rng"]
            else:  # checkpoints before 2026-11-29: a fresh stream, as a single run takes
                noise_rngs[k] = np.random.default_rng([cfgs[k].seed, st["global_step"]])
        load_seed_optimizer_states(opt_pi, [st["opt_pi"] for st in saved])
        load_seed_optimizer_states(opt_vf, [st["opt_vf"] for st in saved])
        if obs_norm:
            obs_norm.load_seed_state_dicts([st["obs_norm"] for st in saved])
        if rew_norm:
            rew_norm.load_seed_state_dicts([st["rew_norm"] for st in saved])
        start_iteration, global_step = saved[0]["iteration"], saved[0]["global_step"]
        wall_offset = max(st["loop"]["wall_time"] for st in saved)
        exact = all(st.get("envs") is not None for st in saved) and envs.can_save_state
        if exact:
            for k, st in enumerate(saved):
                envs.set_state(k, st["envs"])
        else:
            warnings.warn(
                f"the {envs.backend} backend cannot restore its environments: the episodes that were "
                "open at the checkpoint restart (use env_backend='gymnasium' for an exact resume)",
                stacklevel=2,
            )
            envs.close()
            envs = SeedEnvs(cfgs, seed_offset=global_step)  # as a single run reseeds: seed + global_step
            collector = new_collector()
        collector.load_seed_loop_states([st["loop"] for st in saved], restore_episodes=exact)
    actor = StackedActor(policy, device, noise_rngs)
    updater = StackedUpdater(cfg, seeds, policy, value, opt_pi, opt_vf, layer, compile=cfg.compile_update)

    def snapshot(iterations_done: int) -> list[dict]:
        """Per seed, a single run's checkpoint after ``iterations_done`` iterations, copied."""
        wall = wall_offset + time.perf_counter() - t_start
        pi_sd, vf_sd = opt_pi.state_dict(), opt_vf.state_dict()
        out = []
        for k, c in enumerate(cfgs):
            out.append(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": c.to_dict(),
                    "iteration": iterations_done,
                    "global_step": global_step,
                    "interrupted": False,
                    "policy": policy.seed_state_dict(k),
                    "value": value.seed_state_dict(k),
                    "opt_pi": seed_optimizer_state(pi_sd, k),
                    "opt_vf": seed_optimizer_state(vf_sd, k),
                    "obs_norm": obs_norm.seed_state_dict(k) if obs_norm else None,
                    "rew_norm": rew_norm.seed_state_dict(k) if rew_norm else None,
                    "entropy_h0": h0s[k],
                    "torch_rng": sample_gens[k].get_state(),
                    "gen_rng": perm_gens[k].get_state(),
                    "numpy_rng": np_states[k],
                    "actor_rng": noise_rngs[k].bit_generator.state,
                    "loop": {**collector.seed_loop_state(k), "wall_time": wall},
                    "envs": envs.get_state(k),
                }
            )
        return out

    def save_all(states: list[dict], interrupted: bool = False) -> None:
        for d, st in zip(dirs, states):
            save_checkpoint(d / "checkpoint.pt", {**st, "interrupted": True} if interrupted else st)

    n_iterations = planned_iterations(cfg)
    logs, evaluator = [], None
    try:
        for k, d in enumerate(dirs):
            logs.append(
                RunLog(
                    d,
                    read_progress(d / "progress.csv", start_iteration) if saved else [],
                    total=n_iterations * cfg.rollout_steps * S,
                    done=start_iteration * cfg.rollout_steps * S,
                    tensorboard=log_tensorboard,
                    progress=progress and k == 0,
                    purge_step=global_step + 1 if saved else None,
                )
            )
        if cfg.eval_episodes > 0:  # in a worker process of its own unless eval_in_background is off
            evaluator = make_evaluator(
                functools.partial(StackedEvaluator, cfg, seeds, start_iteration), cfg.eval_in_background, policy
            )
    except BaseException:
        for log in logs:
            log.close()
        envs.close()
        raise
    t_start = time.perf_counter()

    def write_rows(rows: list[dict]) -> None:
        for k, (log, row) in enumerate(zip(logs, rows)):
            log.write(row, cfg.rollout_steps * S if k == 0 else cfg.rollout_steps)

    # its last_good: what Ctrl-C / SIGTERM write, the last iteration completed and logged
    evaluated = EvaluatedRows(evaluator, write_rows, snapshot(start_iteration))
    last_saved = t_start
    restore_sigterm = catch_sigterm()
    try:
        for iteration in range(start_iteration, n_iterations):
            check_terminated()
            clock = PhaseClock(sync=device_sync)

            set_learning_rates(cfg, opt_pi, opt_vf, iteration, n_iterations)
            rollout = collector.collect(actor, cfg.rollout_steps // cfg.num_envs)
            global_step += cfg.rollout_steps
            t_collect = clock.lap()
            batch = stacked_advantages(rollout, policy, value, cfg, device)
            t_advantages = clock.lap()
            pi_losses = updater.update_policy(batch, perm_gens, global_step, iteration)
            metrics = stacked_policy_metrics(policy, layer, batch, cfg, global_step)
            actor.sync()
            t_policy = clock.lap()
            check_terminated()
            vf_losses = updater.update_value(batch, perm_gens, iteration)
            t_value = clock.lap()
            evals = [math.nan] * S
            check_terminated()
            evaluated.settle()  # the previous rows, if their evaluation ran in the background
            if evaluator is not None and evaluation_due(cfg, iteration, n_iterations):
                evals = evaluated.evaluate(policy, obs_norm, iteration) or evals
            t_eval = clock.lap()
            rows = []
            elapsed = clock.total
            for k in range(S):
                recent = collector.finished_returns[k][-20:]
                # steps_per_second: each seed's own rate (its steps over the batch's time),
                # comparable with a single run's; the batch trains S times as many
                row = {
                    "iteration": iteration,
                    "global_step": global_step,
                    "train_return_mean": float(np.mean(recent)) if recent else math.nan,
                    "eval_return_mean": evals[k],
                    "episodes": len(collector.finished_returns[k]),
                    "policy_loss": float(np.mean(pi_losses[k])),
                    "value_loss": float(np.mean(vf_losses[k])),
                    "steps_per_second": cfg.rollout_steps / elapsed,
                    "wall_time": wall_offset + time.perf_counter() - t_start,
                    "time_collect": t_collect,
                    "time_advantages": t_advantages,
                    "time_policy": t_policy,
                    "time_value": t_value,
                    "time_eval": t_eval,
                }
                row.update({c: metrics[k].get(c, math.nan) for c in CSV_COLUMNS if c in metrics[k]})
                rows.append(row)
            evaluated.log(rows, snapshot(iteration + 1))
            if checkpoint_due(cfg, iteration, n_iterations, time.perf_counter() - last_saved):
                evaluated.settle()  # a checkpoint holds a logged iteration: wait for its evaluation
                save_all(evaluated.last_good)
                last_saved = time.perf_counter()
        evaluated.settle()
        check_terminated()  # a SIGTERM whose raise was lost in the last iteration
    except KeyboardInterrupt:
        settle_for_checkpoint(evaluated)
        save_all(evaluated.last_good, interrupted=True)
        raise
    finally:
        restore_sigterm()
        for log in logs:
            log.close()
        envs.close()
        if evaluator is not None:
            evaluator.close()
    return {s: log.rows for s, log in zip(seeds, logs)}
