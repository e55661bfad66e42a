"""On-policy training with trust-region projection layers (paper Algorithm 2) and the PPO /
PPO-M / TRPO baselines, in one loop that reads top to bottom.

Per iteration, in named phases:

1. **collect** ``rollout_steps`` environment steps with the current policy (:mod:`.rollout`);
2. **advantages**: GAE (terminated vs truncated) and the old policy's outputs on the batch;
3. **policy update**: ``epochs`` passes of fixed-size minibatch steps -- through the
   projection layer and the trust-region regression loss (paper Eq. 12) for ``kl`` / ``w2``
   / ``frob``, PPO's clipped ratio for ``ppo`` / ``ppo-m``; or one TRPO step;
4. **value update**: ``epochs_vf`` passes with the value function's own optimizer;
5. **evaluate** (every ``eval_every`` iterations) and **log** one row (:mod:`.runlog`);
   with ``eval_in_background`` the evaluation runs in a worker process beside the next
   iteration and its row is written when it is in (:class:`.evaluation.EvaluatedRows`);
6. **checkpoint** atomically (:mod:`.checkpoint`) the last iteration whose row is written.

A minibatch step does no host sync (losses are checked once per epoch) and has static
shapes (reset steps ride along with weight 0), so ``compile_update`` can hand it to
``torch.compile`` whole: forward, projection, loss, backward and optimizer step.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..projection import EntropySchedule, TrustRegionProjection
from .advantages import gae
from .checkpoint import (  # noqa: F401
    RESUMABLE_CHANGES,
    Terminated,
    catch_sigterm,
    check_resumable,
    check_resume_config,
    check_terminated,
    read_checkpoint,
    save_checkpoint,
)
from .compiled_step import clip_by_total_norm, compiled_step, func_grad_reaches
from .config import ALGOS, PROJECTIONS, TrainConfig, planned_iterations  # noqa: F401  (re-exported)
from .envs import make_vec_env
from .evaluation import EvaluatedRows, Evaluator, make_evaluator, settle_for_checkpoint
from .losses import ppo_clip_loss, surrogate_loss, value_loss
from .normalization import ObservationNormalizer, RewardNormalizer
from .policies import FACTOR_OF_PROJECTION, GaussianPolicy, ValueNetwork
from .rollout import Actor, Collector, Rollout
from .runlog import CSV_COLUMNS, PhaseClock, RunLog, check_run_dir, read_progress, run_files  # noqa: F401  (re-exported)
from .trpo import trpo_step

CHECKPOINT_FORMAT = 2


class TrainingDiverged(RuntimeError):
    """A loss became NaN / inf; the last good checkpoint is kept."""


def shuffled_minibatches(tensors: tuple[Tensor, ...], size: int, gen: torch.Generator):
    """One epoch of minibatches: the rows of ``tensors`` (each (n, ...)) in the order of a
    fresh random permutation, ``size`` rows at a time, as tuples of views. One gather per
    tensor per epoch instead of one per minibatch (each index op costs a few microseconds,
    several per step at the paper's sizes)."""
    perm = torch.randperm(len(tensors[0]), generator=gen).to(tensors[0].device)
    return zip(*(t[perm].split(size) for t in tensors))


def normalize_advantages(adv: Tensor, weight: Tensor | None = None) -> Tensor:
    """``(A - mean) / (std + 1e-8)`` over the given advantages (a minibatch, as the original
    does inside its surrogate loss, or the whole batch), the unbiased std; with ``weight``
    (0 / 1 per row) over the rows it marks. One advantage has no spread: it becomes 0 (no
    NaN from an unbiased std of one value). No host sync."""
    w = torch.ones_like(adv) if weight is None else weight
    count = w.sum()
    mean = (w * adv).sum() / count.clamp_min(1.0)
    var = (w * (adv - mean) ** 2).sum() / (count - 1.0).clamp_min(1.0)
    return (adv - mean) / (var.sqrt() + 1e-8)


def _finite_losses(losses: list, name: str, iteration: int) -> list[float]:
    """The epoch's minibatch losses as floats (one host sync); raise
    :class:`TrainingDiverged` naming the first non-finite one."""
    if not losses:
        return []
    values = torch.stack(losses).tolist()
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise TrainingDiverged(f"{name} loss is {v} at iteration {iteration} (minibatch step {i} of the epoch)")
    return values


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda[:N]`` (or ``mps``); raise naming the device when this machine
    lacks it, before anything is created (torch would fail only at the first tensor moved)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {name!r} is not supported (--device: auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} requested but CUDA is not available here (torch {torch.__version__}); "
                "use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} requested but MPS is not available here; use --device cpu or auto")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported (--device: auto, cpu, cuda or cuda:N)")
    return device


def device_synchronizer(device: torch.device):
    """What the phase clock calls before reading the time: the device's ``synchronize`` on
    CUDA (kernels run asynchronously to the host), nothing on the CPU."""
    return functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None


def make_policy(cfg: TrainConfig, obs_dim: int, act_dim: int) -> GaussianPolicy:
    """The policy of ``cfg``: for a full covariance the factor its projection takes (the
    symmetric root for W2, else the Cholesky factor; the baselines use Cholesky)."""
    return GaussianPolicy(
        obs_dim,
        act_dim,
        factor=FACTOR_OF_PROJECTION.get(cfg.algo, "cholesky"),
        cov_form=cfg.cov_form,
        cov_type="contextual" if cfg.contextual_cov else "global",
        hidden=cfg.hidden,
        init_std=cfg.init_std,
        min_std=cfg.min_std,
    )


def load_policy(checkpoint_path: str | Path, device="cpu"):
    """``(config, policy, obs_normalizer or None)`` from a checkpoint written by :func:`train`."""
    state = read_checkpoint(checkpoint_path, device)
    cfg = TrainConfig.from_dict(state["config"])
    env = make_vec_env(cfg.env_id, 1, cfg.seed, backend=cfg.env_backend)
    policy = make_policy(cfg, env.obs_dim, env.act_dim).to(device)
    env.close()
    try:
        policy.load_state_dict(state["policy"])
        obs_norm = None
        if state.get("obs_norm") is not None:
            obs_norm = ObservationNormalizer((policy.body[0].in_features,), clip=cfg.obs_clip)
            obs_norm.load_state_dict(state["obs_norm"])
    except (RuntimeError, KeyError, TypeError) as exc:  # networks that do not fit its own config
        raise ValueError(f"{checkpoint_path}: the checkpoint's networks do not match its config ({exc})") from exc
    return cfg, policy, obs_norm


# -- phase 2: advantages ------------------------------------------------------------------


@dataclass
class Batch:
    """One iteration's training batch on the device, flattened to T * N rows. Reset steps
    stay in with ``weight`` 0: every minibatch has the same size (static shapes; the
    original splits its valid steps into rollout / minibatch_size equal parts) and
    filtering needs no host sync. ``old_*``: the policy before the update (the trust
    region's centre; PPO's ratio denominator)."""

    obs: Tensor
    actions: Tensor
    advantages: Tensor
    returns: Tensor
    values: Tensor
    weight: Tensor
    old_mean: Tensor
    old_cov: Tensor
    old_logp: Tensor

    @property
    def valid(self) -> Tensor:
        return self.weight > 0


@torch.no_grad()
def compute_advantages(rollout: Rollout, policy, value, cfg: TrainConfig, device) -> Batch:
    """GAE over the rollout (terminated vs truncated; invalid reset steps sit right after a
    done step, whose recursion is already cut, so they feed no other step) and the old
    policy's outputs; advantages normalized over the batch if ``advantage_normalization``
    says ``batch`` (``minibatch``: in the policy update)."""
    values = value(rollout.obs.to(device)).cpu()
    next_values = value(rollout.next_obs.to(device)).cpu()
    adv, returns = gae(
        rollout.rewards, values, next_values, rollout.terminated, rollout.truncated, cfg.gamma, cfg.gae_lambda
    )
    obs = rollout.obs.reshape(-1, rollout.obs.shape[-1]).to(device)
    actions = rollout.actions.reshape(-1, rollout.actions.shape[-1]).to(device)
    weight = rollout.valid.reshape(-1).to(device=device, dtype=torch.float32)
    adv = adv.reshape(-1).to(device)
    if cfg.advantage_normalization == "batch":
        adv = normalize_advantages(adv, weight)
    old_mean, old_cov = policy(obs)
    return Batch(
        obs=obs,
        actions=actions,
        advantages=adv,
        returns=returns.reshape(-1).to(device),
        values=values.reshape(-1).to(device),
        weight=weight,
        old_mean=old_mean,
        old_cov=old_cov,
        old_logp=policy.log_prob(old_mean, old_cov, actions),
    )


# -- phases 3 and 4: the minibatch steps ----------------------------------------------------


def layer_reaches_func_grad(layer: TrustRegionProjection, policy, obs: Tensor) -> bool:
    """``torch.func.grad`` differentiates through the projection (see
    :func:`~.compiled_step.func_grad_reaches`), probed with the policy's outputs for
    ``obs`` (a state or a few, on the training device)."""
    with torch.no_grad():
        mean, cov = policy(obs)
    return func_grad_reaches(lambda m, c: layer(m, c, mean + 0.1, cov, step=0)[0], mean, cov)


class Updater:
    """The policy's and the value function's minibatch steps (each: forward, loss, backward,
    optimizer step), eager or compiled whole with ``torch.compile`` (``compile``)."""

    def __init__(
        self,
        cfg: TrainConfig,
        policy,
        value,
        opt_pi,
        opt_vf,
        layer: TrustRegionProjection | None,
        compile: bool = False,
    ):
        self.cfg, self.policy, self.value, self.opt_pi, self.opt_vf, self.layer = (
            cfg,
            policy,
            value,
            opt_pi,
            opt_vf,
            layer,
        )
        self.policy_step, self.value_step = self._policy_step, self._value_step
        if compile:
            # where a step falls back to compiling the eager step (graph breaks at zero_grad /
            # backward), its graphs guard on this run's modules: a previous run's graphs in
            # the same process (experiment workers, benchmarks) would only count towards
            # dynamo's recompile limit, after which it silently runs eager
            torch.compiler.reset()
            # each step one graph: loss, gradient, clipping and Adam (compiled_step.py;
            # LeanRL's recipe, GPU.md section 3)
            clip = clip_by_total_norm(cfg.max_grad_norm) if cfg.max_grad_norm is not None else None
            probe = torch.zeros(1, policy.body[0].in_features, device=next(policy.parameters()).device)
            reaches = layer is None or layer_reaches_func_grad(layer, policy, probe)
            self.policy_step = compiled_step(policy, opt_pi, self.policy_loss, self._policy_step, clip, reaches)
            self.value_step = compiled_step(value, opt_vf, self.value_loss, self._value_step, clip)

    def policy_loss(self, forward, obs, actions, adv, weight, old_mean, old_cov, old_logp, step) -> Tensor:
        """The policy's minibatch loss; ``forward``: the policy network (or a functional
        call of it with the parameters being differentiated)."""
        cfg, policy = self.cfg, self.policy
        if cfg.advantage_normalization == "minibatch":
            adv = normalize_advantages(adv, weight)
        mean, cov = forward(obs)
        if self.layer is not None:
            mean_t, cov_t = self.layer(mean, cov, old_mean, old_cov, step=step) if cfg.projection else (mean, cov)
            logp = policy.log_prob(mean_t, cov_t, actions)
            return surrogate_loss(logp, old_logp, adv, weight) + self.layer.trust_region_loss(
                mean, cov, mean_t, cov_t, weight
            )
        return ppo_clip_loss(policy.log_prob(mean, cov, actions), old_logp, adv, cfg.ratio_clip, weight)

    def value_loss(self, forward, obs, returns, old_values, weight) -> Tensor:
        return value_loss(forward(obs), returns, old_values, self.cfg.vf_clip, weight)

    def _policy_step(self, obs, actions, adv, weight, old_mean, old_cov, old_logp, step) -> Tensor:
        loss = self.policy_loss(self.policy, obs, actions, adv, weight, old_mean, old_cov, old_logp, step)
        self.opt_pi.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
        self.opt_pi.step()
        return loss.detach()

    def _value_step(self, obs, returns, old_values, weight) -> Tensor:
        loss = self.value_loss(self.value, obs, returns, old_values, weight)
        self.opt_vf.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.value.parameters(), self.cfg.max_grad_norm)
        self.opt_vf.step()
        return loss.detach()

    def update_policy(self, b: Batch, gen: torch.Generator, global_step: int, iteration: int) -> list[float]:
        """``epochs`` passes of minibatch steps (or one TRPO step); the losses."""
        cfg = self.cfg
        if cfg.algo == "trpo":  # one natural-gradient step on the whole batch: its valid rows
            adv = (
                normalize_advantages(b.advantages, b.weight)
                if cfg.advantage_normalization == "minibatch"
                else b.advantages
            )
            k = b.valid
            info = trpo_step(
                self.policy,
                b.obs[k],
                b.actions[k],
                adv[k],
                b.old_logp[k],
                b.old_mean[k],
                b.old_cov[k],
                max_kl=cfg.trpo_max_kl,
            )
            return [-info["improvement"]]
        # the entropy schedule's step; None without entropy control (a changing int would
        # make a compiled step recompile every iteration)
        step = global_step if cfg.entropy_control is not None else None
        losses: list[float] = []
        fields = (b.obs, b.actions, b.advantages, b.weight, b.old_mean, b.old_cov, b.old_logp)
        for _ in range(cfg.epochs):
            epoch = [self.policy_step(*rows, step) for rows in shuffled_minibatches(fields, cfg.minibatch_size, gen)]
            # one host sync per epoch, not per minibatch (it would stall a GPU's queue);
            # a NaN is still caught before the iteration can be checkpointed
            losses += _finite_losses(epoch, "policy", iteration)
        return losses

    def update_value(self, b: Batch, gen: torch.Generator, iteration: int) -> list[float]:
        losses: list[float] = []
        for _ in range(self.cfg.epochs_vf):
            epoch = [
                self.value_step(*rows)
                for rows in shuffled_minibatches((b.obs, b.returns, b.values, b.weight), self.cfg.minibatch_size, gen)
            ]
            losses += _finite_losses(epoch, "value", iteration)
        return losses


@torch.no_grad()
def policy_metrics(policy, layer: TrustRegionProjection | None, b: Batch, cfg: TrainConfig, global_step: int) -> dict:
    """KL to the old policy, constraint parts, entropy and the fraction of states projected,
    over the batch's valid states (one host sync). For a global covariance the projection's
    covariance is copied into the policy (it is not regressed, paper section 4.3)."""
    k = b.valid
    old_mean, old_cov = b.old_mean[k], b.old_cov[k]
    mean, cov = policy(b.obs[k])
    if layer is None:
        kl = policy.kl(mean, cov, old_mean, old_cov)
        return {
            "kl_mean": kl.mean().item(),
            "kl_max": kl.max().item(),
            "entropy_mean": policy.entropy(cov).mean().item(),
            "fraction_projected": 0.0,
        }
    new_mean, new_cov = layer(mean, cov, old_mean, old_cov, step=global_step)
    metrics = layer.metrics(new_mean, new_cov, old_mean, old_cov, mean, cov)
    if not cfg.contextual_cov:
        policy.set_global_cov(new_cov[0])
    return metrics


def set_learning_rates(cfg: TrainConfig, opt_pi, opt_vf, iteration: int, n_iterations: int) -> None:
    """With ``lr_decay``: both learning rates linearly to 0 (as the original PPO code)."""
    if cfg.lr_decay:
        frac = 1.0 - iteration / n_iterations
        for opt, lr in ((opt_pi, cfg.lr), (opt_vf, cfg.lr_vf)):
            for group in opt.param_groups:
                if isinstance(group["lr"], Tensor):  # compiled steps: changed in place, no recompile
                    group["lr"].fill_(lr * frac)
                else:
                    group["lr"] = lr * frac


def evaluation_due(cfg: TrainConfig, iteration: int, n_iterations: int) -> bool:
    """Evaluate after ``iteration`` (0-based): every ``eval_every`` iterations and the last."""
    return cfg.eval_episodes > 0 and (iteration == n_iterations - 1 or (iteration + 1) % cfg.eval_every == 0)


def checkpoint_due(cfg: TrainConfig, iteration: int, n_iterations: int, seconds_since_last: float) -> bool:
    """Write a checkpoint after ``iteration``: every ``checkpoint_every`` iterations, after
    ``checkpoint_seconds`` of wall time (a kill early in a long run must not lose
    everything), and at the end."""
    return (
        iteration == n_iterations - 1
        or (iteration + 1) % cfg.checkpoint_every == 0
        or seconds_since_last >= cfg.checkpoint_seconds
    )


# -- the loop -----------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log_tensorboard: bool = True,
) -> list[dict]:
    """Train ``cfg`` and write ``config.json``, ``progress.csv``, TensorBoard events and
    ``checkpoint.pt`` into ``run_dir``. Returns the logged rows (all of the run's, when resumed).

    ``resume``: continue the run in ``run_dir`` from its checkpoint (networks, optimizers,
    normalizers, random generators, step count, open episodes). With the Gymnasium backend the
    environments' state is restored too, so the resumed run is bit-for-bit the uninterrupted
    one on CPU; EnvPool cannot save its simulators, so there the episodes in flight restart.
    An existing run is never overwritten unless ``overwrite``.

    Checkpoints always hold the state at the end of a completed iteration: every
    ``checkpoint_every`` iterations or ``checkpoint_seconds`` of wall time, whichever comes
    first, and at the end. Ctrl-C and SIGTERM write the last one (marked ``interrupted``), so
    at most the iteration in progress is trained again; a SIGKILL loses at most the time since
    the last checkpoint. ``total_steps`` is rounded up to whole iterations of ``rollout_steps``.
    """
    # -- setup: checks before anything is created -----------------------------------------
    run_dir = Path(run_dir)
    cfg.validate()
    device = resolve_device(cfg.device)
    device_sync = device_synchronizer(device)
    check_run_dir(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    saved = None
    if resume:
        if not ckpt_path.exists() and run_files(run_dir):
            raise ValueError(
                f"no checkpoint at {ckpt_path}: the run stopped before its first checkpoint; "
                "start it over with --overwrite"
            )
        saved = read_checkpoint(run_dir)
        check_resume_config(saved["config"], cfg)
        check_resumable(saved, ckpt_path)
    elif run_files(run_dir) and not overwrite:
        raise ValueError(
            f"{run_dir} already holds a run ({', '.join(run_files(run_dir))}); resume it (--resume), "
            "start it over (--overwrite) or choose another --out"
        )
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    # the environments before the run directory: an unknown id or backend leaves nothing behind
    envs = make_vec_env(cfg.env_id, cfg.num_envs, cfg.seed, backend=cfg.env_backend)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # --overwrite: the old run's events would mix into the new curves
            for name in run_files(run_dir, temporaries=True):
                (run_dir / name).unlink()
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    except BaseException:
        envs.close()
        raise

    # -- networks, optimizers, normalizers, the layer ---------------------------------------
    obs_dim, act_dim = envs.obs_dim, envs.act_dim
    policy = make_policy(cfg, obs_dim, act_dim).to(device)
    value = ValueNetwork(obs_dim, cfg.hidden_vf).to(device)
    # fused Adam: one kernel per step instead of a loop over parameters; measured 1.8x
    # faster per minibatch step for the paper's 64x64 MLPs on one CPU thread
    # (a compiled step guards on a float learning rate: a decaying one would recompile it
    # every iteration, a tensor one does not)
    lr_of = (lambda lr: torch.tensor(lr, device=device)) if cfg.compile_update and cfg.lr_decay else float
    opt_pi = torch.optim.Adam(policy.parameters(), lr=lr_of(cfg.lr), eps=1e-5, fused=True)
    opt_vf = torch.optim.Adam(value.parameters(), lr=lr_of(cfg.lr_vf), eps=1e-5, fused=True)
    obs_norm = ObservationNormalizer((obs_dim,), clip=cfg.obs_clip) if cfg.normalize_obs else None
    rew_norm = RewardNormalizer(cfg.num_envs, cfg.gamma, clip=cfg.reward_clip) if cfg.normalize_rewards else None
    layer, h0 = None, None
    if cfg.algo in PROJECTIONS:
        schedule = None
        if cfg.entropy_control is not None:
            with torch.no_grad():
                _, cov0 = policy(torch.zeros(1, obs_dim, device=device))
            # the initial policy's entropy: from the checkpoint when resuming (the policy has moved)
            h0 = saved["entropy_h0"] if saved else float(policy.entropy(cov0).mean())
            schedule = EntropySchedule(
                kappa=cfg.target_entropy, total_steps=cfg.total_steps, initial_entropy=h0, tau=cfg.temperature
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
    collector = Collector(
        envs,
        obs_norm=obs_norm,
        rew_norm=rew_norm,
        clip_actions=cfg.clip_actions,
        time_limit_terminal=cfg.time_limit_terminal,
    )

    # -- loop state: fresh, or everything the checkpoint holds ------------------------------
    start_iteration, global_step, wall_offset = 0, 0, 0.0
    if saved:
        policy.load_state_dict(saved["policy"])
        value.load_state_dict(saved["value"])
        opt_pi.load_state_dict(saved["opt_pi"])
        opt_vf.load_state_dict(saved["opt_vf"])
        if obs_norm:
            obs_norm.load_state_dict(saved["obs_norm"])
        if rew_norm:
            rew_norm.load_state_dict(saved["rew_norm"])
        torch.set_rng_state(saved["torch_rng"])
        gen.set_state(saved["gen_rng"])
        np.random.set_state(saved["numpy_rng"])
        start_iteration, global_step = saved["iteration"], saved["global_step"]
        wall_offset = saved["loop"]["wall_time"]
        exact = saved.get("envs") is not None and envs.can_save_state
        if exact:
            envs.set_state(saved["envs"])
        else:
            warnings.warn(
                f"the {envs.backend} backend cannot restore its environments: the episodes that were "
                "open at the checkpoint restart (use env_backend='gymnasium' for an exact resume)",
                stacklevel=2,
            )
            envs.close()
            envs = make_vec_env(cfg.env_id, cfg.num_envs, cfg.seed + global_step, backend=cfg.env_backend)
            collector = Collector(
                envs,
                obs_norm=obs_norm,
                rew_norm=rew_norm,
                clip_actions=cfg.clip_actions,
                time_limit_terminal=cfg.time_limit_terminal,
            )
        collector.load_loop_state(saved["loop"], restore_episodes=exact)
    # the rollout's action noise: its own stream (numpy: drawn per environment step)
    actor = Actor(policy, device, np.random.default_rng(cfg.seed))
    if saved:  # checkpoints before 2026-11-29 (torch noise) have none: a fresh stream
        if saved.get("actor_rng") is not None:
            actor.rng.bit_generator.state = saved["actor_rng"]
        else:
            actor.rng = np.random.default_rng([cfg.seed, global_step])
    updater = Updater(cfg, policy, value, opt_pi, opt_vf, layer, compile=cfg.compile_update)

    def snapshot(iterations_done: int) -> dict:
        """Everything needed to continue after ``iterations_done`` iterations, copied."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "iteration": iterations_done,
            "global_step": global_step,
            "interrupted": False,
            "policy": copy.deepcopy(policy.state_dict()),
            "value": copy.deepcopy(value.state_dict()),
            "opt_pi": copy.deepcopy(opt_pi.state_dict()),
            "opt_vf": copy.deepcopy(opt_vf.state_dict()),
            "obs_norm": obs_norm.state_dict() if obs_norm else None,
            "rew_norm": rew_norm.state_dict() if rew_norm else None,
            "entropy_h0": h0,
            "torch_rng": torch.get_rng_state(),
            "gen_rng": gen.get_state(),
            "numpy_rng": np.random.get_state(),
            "actor_rng": actor.rng.bit_generator.state,
            "loop": {**collector.loop_state(), "wall_time": wall_offset + time.perf_counter() - t_start},
            "envs": envs.get_state() if envs.can_save_state else None,
        }

    n_iterations = planned_iterations(cfg)
    log = RunLog(
        run_dir,
        read_progress(run_dir / "progress.csv", start_iteration) if saved else [],
        total=n_iterations * cfg.rollout_steps,
        done=start_iteration * cfg.rollout_steps,
        tensorboard=log_tensorboard,
        progress=progress,
        purge_step=global_step + 1 if saved else None,
    )  # drops an interrupted run's later events
    # one batched evaluation env for the run (in a worker process of its own unless
    # eval_in_background is off); new start states for every evaluation
    evaluator = (
        make_evaluator(
            functools.partial(
                Evaluator,
                cfg.env_id,
                cfg.eval_episodes,
                cfg.seed,
                backend=cfg.env_backend,
                clip_actions=cfg.clip_actions,
                first_iteration=start_iteration,
            ),
            cfg.eval_in_background,
            policy,
        )
        if cfg.eval_episodes > 0
        else None
    )
    t_start = time.perf_counter()
    # its last_good: what Ctrl-C / SIGTERM write, the last iteration completed and logged
    evaluated = EvaluatedRows(evaluator, lambda rows: log.write(rows[0], cfg.rollout_steps), snapshot(start_iteration))
    last_saved = t_start
    restore_sigterm = catch_sigterm()
    try:
        for iteration in range(start_iteration, n_iterations):
            check_terminated()
            clock = PhaseClock(sync=device_sync)

            set_learning_rates(cfg, opt_pi, opt_vf, iteration, n_iterations)

            # -- 1. collect ---------------------------------------------------------------
            rollout = collector.collect(actor, cfg.rollout_steps // cfg.num_envs)
            global_step += cfg.rollout_steps
            t_collect = clock.lap()

            # -- 2. advantages ------------------------------------------------------------
            batch = compute_advantages(rollout, policy, value, cfg, device)
            t_advantages = clock.lap()

            # -- 3. policy update ---------------------------------------------------------
            pi_losses = updater.update_policy(batch, gen, global_step, iteration)
            metrics = policy_metrics(policy, layer, batch, cfg, global_step)
            actor.sync()
            t_policy = clock.lap()
            check_terminated()

            # -- 4. value update ----------------------------------------------------------
            vf_losses = updater.update_value(batch, gen, iteration)
            t_value = clock.lap()

            # -- 5. evaluate and log --------------------------------------------------------
            # (an evaluation in the background completes the previous row here, and this
            # iteration's row waits for its own)
            eval_return = math.nan
            check_terminated()
            evaluated.settle()
            if evaluator is not None and evaluation_due(cfg, iteration, n_iterations):
                eval_return = evaluated.evaluate(policy, obs_norm, iteration)  # None: in the background
            t_eval = clock.lap()
            recent = collector.finished_returns[-20:]
            row = {
                "iteration": iteration,
                "global_step": global_step,
                "train_return_mean": float(np.mean(recent)) if recent else math.nan,
                "eval_return_mean": eval_return,
                "episodes": len(collector.finished_returns),
                "policy_loss": float(np.mean(pi_losses)),
                "value_loss": float(np.mean(vf_losses)),
                "steps_per_second": cfg.rollout_steps / clock.total,
                "wall_time": wall_offset + time.perf_counter() - t_start,
                "time_collect": t_collect,
                "time_advantages": t_advantages,
                "time_policy": t_policy,
                "time_value": t_value,
                "time_eval": t_eval,
            }
            row.update({k: metrics.get(k, math.nan) for k in CSV_COLUMNS if k in metrics})
            evaluated.log([row], snapshot(iteration + 1))

            # -- 6. checkpoint ----------------------------------------------------------------
            if checkpoint_due(cfg, iteration, n_iterations, time.perf_counter() - last_saved):
                evaluated.settle()  # a checkpoint holds a logged iteration: wait for its evaluation
                save_checkpoint(ckpt_path, evaluated.last_good)
                last_saved = time.perf_counter()
        evaluated.settle()
        check_terminated()  # a SIGTERM whose raise was lost in the last iteration
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (Terminated)
        # the networks may be mid-iteration: write the end of the last completed one
        settle_for_checkpoint(evaluated)
        save_checkpoint(ckpt_path, {**evaluated.last_good, "interrupted": True})
        raise
    finally:
        restore_sigterm()
        log.close()
        envs.close()
        if evaluator is not None:
            evaluator.close()
    return log.rows
