"""On-policy training with trust-region projection layers (paper Algorithm 2) and the PPO /
PPO-M baselines, in one loop that reads top to bottom.

Per iteration: collect ``rollout_steps`` environment steps with the current policy, record
its outputs as the old policy, compute GAE advantages, then ``epochs`` passes of minibatch
policy updates -- through the projection layer and the trust-region regression loss (paper
Eq. 12) for ``kl`` / ``w2`` / ``frob``, or PPO's clipped ratio -- followed by ``epochs_vf``
passes of value-function updates with its own optimizer. Logs one CSV row (and TensorBoard
scalars) per iteration and writes checkpoints atomically.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import distances as D
from ..projection import EntropySchedule, TrustRegionProjection
from .advantages import gae
from .checkpoint import (RESUMABLE_CHANGES, Terminated, catch_sigterm, check_resumable,  # noqa: F401
                         check_resume_config, read_checkpoint, save_checkpoint)
from .config import ALGOS, PROJECTIONS, TrainConfig, planned_iterations  # noqa: F401  (re-exported)
from .envs import make_vec_env
from .evaluation import Evaluator
from .losses import ppo_clip_loss, surrogate_loss, value_loss
from .normalization import ObservationNormalizer, RewardNormalizer
from .policies import GaussianPolicy, ValueNetwork
from .trpo import trpo_step

CSV_COLUMNS = ["iteration", "global_step", "train_return_mean", "eval_return_mean", "episodes",
               "policy_loss", "value_loss", "kl_mean", "kl_max", "constraint_mean_mean",
               "constraint_mean_max", "constraint_cov_mean", "constraint_cov_max", "entropy_mean",
               "fraction_projected", "steps_per_second", "wall_time"]


CHECKPOINT_FORMAT = 2


class TrainingDiverged(RuntimeError):
    """A loss became NaN / inf; the last good checkpoint is kept."""


def minibatches(n: int, size: int, gen: torch.Generator, device):
    """Index tensors of a fresh random permutation of ``range(n)``, ``size`` at a time."""
    perm = torch.randperm(n, generator=gen).to(device)
    for start in range(0, n, size):
        yield perm[start:start + size]


def normalize_advantages(adv: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
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
            raise ValueError(f"device {name!r} requested but CUDA is not available here (torch {torch.__version__}); "
                             "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} requested but MPS is not available here; use --device cpu or auto")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported (--device: auto, cpu, cuda or cuda:N)")
    return device


def load_policy(checkpoint_path: str | Path, device="cpu"):
    """``(config, policy, obs_normalizer or None)`` from a checkpoint written by :func:`train`."""
    state = read_checkpoint(checkpoint_path, device)
    cfg = TrainConfig.from_dict(state["config"])
    env = make_vec_env(cfg.env_id, 1, cfg.seed, backend=cfg.env_backend)
    kind = cfg.algo if cfg.algo in PROJECTIONS else "kl"
    policy = GaussianPolicy(env.obs_dim, env.act_dim, kind=kind, cov_form=cfg.cov_form,
                            cov_type="contextual" if cfg.contextual_cov else "global",
                            hidden=cfg.hidden, init_std=cfg.init_std, min_std=cfg.min_std).to(device)
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


def _read_progress(path: Path, iterations: int) -> list[dict]:
    """The first ``iterations`` rows of ``progress.csv`` as floats (rows logged after the
    checkpoint belong to iterations that are trained again)."""
    if not path.exists():
        return []
    try:
        with open(path, newline="") as f:
            rows = [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()} for r in csv.DictReader(f)]
    except (ValueError, TypeError, csv.Error) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); fix or remove it to resume") from exc
    for r in rows:
        for k in ("iteration", "global_step", "episodes"):
            if k in r and r[k] == r[k]:
                r[k] = int(r[k])
    return [r for r in rows if r.get("iteration", math.inf) < iterations]


# what makes a directory hold a run (never reused without --resume or --overwrite)
_RUN_FILES = ("config.json", "progress.csv", "checkpoint.pt")


def _run_files(run_dir: Path, temporaries: bool = False) -> list[str]:
    """The names of a run's files in ``run_dir`` (with ``temporaries``: also half-written ones)."""
    if not run_dir.is_dir():
        return []
    names = _RUN_FILES + (("checkpoint.pt.tmp", "progress.csv.tmp") if temporaries else ())
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name in names or p.name.startswith("events.out.tfevents."))


def _check_run_dir(run_dir: Path) -> None:
    """Raise naming ``run_dir`` if it cannot become a run directory (checked before anything
    is created, so a failed start leaves nothing behind)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory (--out) {run_dir} is a file, not a directory")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"run directory (--out) {run_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == run_dir else f": {existing}"
        raise ValueError(f"run directory (--out) {run_dir}{where} is not writable")


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, log_tensorboard: bool = True) -> list[dict]:
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
    run_dir = Path(run_dir)
    if cfg.algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {cfg.algo!r}")
    if cfg.total_steps < 1:
        raise ValueError(f"total_steps (--steps) must be >= 1, got {cfg.total_steps}")
    if cfg.num_envs < 1:
        raise ValueError(f"num_envs (--num-envs) must be >= 1, got {cfg.num_envs}")
    if cfg.rollout_steps < 1 or cfg.rollout_steps % cfg.num_envs:
        raise ValueError(f"rollout_steps ({cfg.rollout_steps}) must be a positive multiple of num_envs ({cfg.num_envs})")
    if cfg.checkpoint_every < 1 or not cfg.checkpoint_seconds >= 0:
        raise ValueError(f"checkpoint_every must be >= 1 and checkpoint_seconds >= 0, got {cfg.checkpoint_every} "
                         f"and {cfg.checkpoint_seconds}")
    device = resolve_device(cfg.device)
    _check_run_dir(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    saved = None
    if resume:
        if not ckpt_path.exists() and _run_files(run_dir):
            raise ValueError(f"no checkpoint at {ckpt_path}: the run stopped before its first checkpoint; "
                             "start it over with --overwrite")
        saved = read_checkpoint(run_dir)
        check_resume_config(saved["config"], cfg)
        check_resumable(saved, ckpt_path)
    elif _run_files(run_dir) and not overwrite:
        raise ValueError(f"{run_dir} already holds a run ({', '.join(_run_files(run_dir))}); resume it (--resume), "
                         "start it over (--overwrite) or choose another --out")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    # the environments before the run directory: an unknown id or backend leaves nothing behind
    envs = make_vec_env(cfg.env_id, cfg.num_envs, cfg.seed, backend=cfg.env_backend)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # --overwrite: the old run's events would mix into the new curves
            for name in _run_files(run_dir, temporaries=True):
                (run_dir / name).unlink()
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    except BaseException:
        envs.close()
        raise

    # -- environments, networks, optimizers ---------------------------------------------
    obs_dim, act_dim = envs.obs_dim, envs.act_dim
    projected = cfg.algo in PROJECTIONS
    kind = cfg.algo if projected else "kl"  # the parametrization of the baselines' policy
    policy = GaussianPolicy(obs_dim, act_dim, kind=kind, cov_form=cfg.cov_form,
                            cov_type="contextual" if cfg.contextual_cov else "global",
                            hidden=cfg.hidden, init_std=cfg.init_std, min_std=cfg.min_std).to(device)
    value = ValueNetwork(obs_dim, cfg.hidden_vf).to(device)
    # fused Adam: one kernel per step instead of a loop over parameters; measured 1.8x
    # faster per minibatch step for the paper's 64x64 MLPs on one CPU thread
    opt_pi = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5, fused=True)
    opt_vf = torch.optim.Adam(value.parameters(), lr=cfg.lr_vf, eps=1e-5, fused=True)
    obs_norm = ObservationNormalizer((obs_dim,), clip=cfg.obs_clip) if cfg.normalize_obs else None
    rew_norm = RewardNormalizer(cfg.num_envs, cfg.gamma, clip=cfg.reward_clip) if cfg.normalize_rewards else None
    layer, h0 = None, None
    if projected:
        schedule = None
        if cfg.entropy_control is not None:
            with torch.no_grad():
                _, cov0 = policy(torch.zeros(1, obs_dim, device=device))
            # the initial policy's entropy: from the checkpoint when resuming (the policy has moved)
            h0 = saved["entropy_h0"] if saved else float(D.entropy(kind, cfg.cov_form, cov0).mean())
            schedule = EntropySchedule(kappa=cfg.target_entropy, total_steps=cfg.total_steps,
                                       initial_entropy=h0, tau=cfg.temperature)
        layer = TrustRegionProjection(kind, cfg.mean_bound, cfg.cov_bound, cfg.cov_form,
                                      entropy_control=cfg.entropy_control, entropy_schedule=schedule,
                                      contextual_cov=cfg.contextual_cov,
                                      regression_weight=cfg.regression_weight, check_values=False)

    # -- loop state: fresh, or everything the checkpoint holds ----------------------------
    start_iteration, global_step, wall_offset = 0, 0, 0.0
    raw_obs = envs.reset()
    prev_done = np.zeros(cfg.num_envs, dtype=bool)
    episode_return = np.zeros(cfg.num_envs)
    finished_returns: list[float] = []
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
        loop = saved["loop"]
        start_iteration, global_step, wall_offset = saved["iteration"], saved["global_step"], loop["wall_time"]
        finished_returns = list(loop["finished_returns"])
        if saved.get("envs") is not None and envs.can_save_state:
            envs.set_state(saved["envs"])
            raw_obs, prev_done = loop["raw_obs"].copy(), loop["prev_done"].copy()
            episode_return = loop["episode_return"].copy()
        else:
            warnings.warn(f"the {envs.backend} backend cannot restore its environments: the episodes that were "
                          "open at the checkpoint restart (use env_backend='gymnasium' for an exact resume)")
            envs.close()
            envs = make_vec_env(cfg.env_id, cfg.num_envs, cfg.seed + global_step, backend=cfg.env_backend)
            raw_obs = envs.reset()

    def snapshot(iterations_done: int) -> dict:
        """Everything needed to continue after ``iterations_done`` iterations, copied."""
        return {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "iteration": iterations_done,
                "global_step": global_step, "interrupted": False,
                "policy": copy.deepcopy(policy.state_dict()), "value": copy.deepcopy(value.state_dict()),
                "opt_pi": copy.deepcopy(opt_pi.state_dict()), "opt_vf": copy.deepcopy(opt_vf.state_dict()),
                "obs_norm": obs_norm.state_dict() if obs_norm else None,
                "rew_norm": rew_norm.state_dict() if rew_norm else None, "entropy_h0": h0,
                "torch_rng": torch.get_rng_state(), "gen_rng": gen.get_state(), "numpy_rng": np.random.get_state(),
                "loop": {"raw_obs": raw_obs.copy(), "prev_done": prev_done.copy(),
                         "episode_return": episode_return.copy(), "finished_returns": list(finished_returns),
                         "wall_time": wall_offset + time.perf_counter() - t_start},
                "envs": envs.get_state() if envs.can_save_state else None}

    steps_per_env = cfg.rollout_steps // cfg.num_envs
    n_iterations = planned_iterations(cfg)
    # progress.csv: the rows up to the checkpoint, then one per iteration (rewritten
    # atomically first, so a crash here cannot lose the logged history)
    rows = _read_progress(run_dir / "progress.csv", start_iteration) if saved else []
    csv_tmp = run_dir / "progress.csv.tmp"
    with open(csv_tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows({k: r.get(k, math.nan) for k in CSV_COLUMNS} for r in rows)
    os.replace(csv_tmp, run_dir / "progress.csv")
    csv_file = open(run_dir / "progress.csv", "a", newline="")
    writer = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS)
    tb = None
    if log_tensorboard and start_iteration < n_iterations:  # a no-op resume adds no event file
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged after the checkpoint by the interrupted run
            tb = SummaryWriter(str(run_dir), purge_step=global_step + 1 if saved else None)
        except ImportError:
            tb = None
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=n_iterations * cfg.rollout_steps, initial=start_iteration * cfg.rollout_steps,
                       unit="step", dynamic_ncols=True)
        except ImportError:
            bar = None

    # one batched evaluation env for the run; new start states for every evaluation
    evaluator = Evaluator(cfg.env_id, cfg.eval_episodes, cfg.seed, backend=cfg.env_backend,
                          clip_actions=cfg.clip_actions, first_iteration=start_iteration) if cfg.eval_episodes > 0 else None
    t_start = time.perf_counter()
    last_good = snapshot(start_iteration)  # what Ctrl-C / SIGTERM write: the last completed iteration
    last_saved = t_start
    restore_sigterm = catch_sigterm()
    try:
        for iteration in range(start_iteration, n_iterations):
            t_iter = time.perf_counter()
            if cfg.lr_decay:  # both optimizers, linearly to 0 (as the original PPO code)
                frac = 1.0 - iteration / n_iterations
                for opt, lr in ((opt_pi, cfg.lr), (opt_vf, cfg.lr_vf)):
                    for group in opt.param_groups:
                        group["lr"] = lr * frac

            # -- rollout ------------------------------------------------------------------
            T, N = steps_per_env, cfg.num_envs
            buf_obs = torch.zeros(T, N, obs_dim)
            buf_next_obs = torch.zeros(T, N, obs_dim)
            buf_act = torch.zeros(T, N, act_dim)
            buf_rew = torch.zeros(T, N)
            buf_term = torch.zeros(T, N, dtype=torch.bool)
            buf_trunc = torch.zeros(T, N, dtype=torch.bool)
            buf_valid = torch.zeros(T, N, dtype=torch.bool)
            for t in range(T):
                x = torch.as_tensor(raw_obs, dtype=torch.float32)
                obs = obs_norm(x, update=True) if obs_norm else x
                with torch.no_grad():
                    mean, cov = policy(obs.to(device))
                    action = D.sample(kind, cfg.cov_form, mean, cov, generator=None).cpu()
                raw_next, rew, term, trunc = envs.step(action.double().numpy(), clip=cfg.clip_actions)
                if cfg.time_limit_terminal:
                    term, trunc = term | trunc, np.zeros_like(trunc)
                valid = ~prev_done  # a step right after an episode end only resets
                episode_return += np.where(valid, rew, 0.0)
                done = (term | trunc) & valid
                finished_returns += episode_return[done].tolist()
                episode_return[done] = 0.0
                rew_t = torch.as_tensor(np.where(valid, rew, 0.0), dtype=torch.float32)
                if rew_norm:
                    rew_t = rew_norm(rew_t, torch.as_tensor(done)).float()
                xn = torch.as_tensor(raw_next, dtype=torch.float32)
                buf_obs[t], buf_act[t], buf_rew[t] = obs, action.float(), rew_t
                buf_next_obs[t] = obs_norm(xn) if obs_norm else xn
                buf_term[t] = torch.as_tensor(term & valid)
                buf_trunc[t] = torch.as_tensor(trunc & valid)
                buf_valid[t] = torch.as_tensor(valid)
                prev_done = term | trunc
                raw_obs = raw_next
            global_step += T * N

            # -- advantages (GAE; terminated vs truncated) ----------------------------------
            with torch.no_grad():
                values = value(buf_obs.to(device)).cpu()
                next_values = value(buf_next_obs.to(device)).cpu()
            adv, returns = gae(buf_rew, values, next_values, buf_term, buf_trunc, cfg.gamma, cfg.gae_lambda)
            # Invalid (reset) steps sit right after a done step, whose recursion is already
            # cut, so they feed no other step's advantage. They stay in the batch with weight
            # 0: every minibatch has the same size (static shapes; the original splits its
            # valid steps into rollout / minibatch_size equal parts) and nothing syncs the host.
            keep = buf_valid.reshape(-1)
            b_obs = buf_obs.reshape(-1, obs_dim).to(device)
            b_act = buf_act.reshape(-1, act_dim).to(device)
            b_adv = adv.reshape(-1).to(device)
            b_ret = returns.reshape(-1).to(device)
            b_val = values.reshape(-1).to(device)
            b_w = keep.to(device=device, dtype=torch.float32)
            if cfg.advantage_normalization == "batch":
                b_adv = normalize_advantages(b_adv, b_w)
            with torch.no_grad():
                old_mean, old_cov = policy(b_obs)
                old_logp = D.log_prob(kind, cfg.cov_form, old_mean, old_cov, b_act)
            n = b_obs.shape[0]

            # -- policy update ------------------------------------------------------------
            pi_losses = []
            if cfg.algo == "trpo":  # one natural-gradient step on the whole batch
                adv_all = normalize_advantages(b_adv, b_w) if cfg.advantage_normalization == "minibatch" else b_adv
                k = keep.to(device)  # the whole batch at once: its valid rows
                info = trpo_step(policy, b_obs[k], b_act[k], adv_all[k], old_logp[k], old_mean[k], old_cov[k],
                                 kind=kind, form=cfg.cov_form, max_kl=cfg.trpo_max_kl)
                pi_losses.append(-info["improvement"])
            for _ in range(cfg.epochs if cfg.algo != "trpo" else 0):
                epoch_losses = []
                for idx in minibatches(n, cfg.minibatch_size, gen, device):
                    adv_mb, w_mb = b_adv[idx], b_w[idx]
                    if cfg.advantage_normalization == "minibatch":
                        adv_mb = normalize_advantages(adv_mb, w_mb)
                    mean, cov = policy(b_obs[idx])
                    if projected:
                        mean_t, cov_t = (layer(mean, cov, old_mean[idx], old_cov[idx], step=global_step)
                                         if cfg.projection else (mean, cov))
                        logp = D.log_prob(kind, cfg.cov_form, mean_t, cov_t, b_act[idx])
                        loss = surrogate_loss(logp, old_logp[idx], adv_mb, w_mb) + \
                            layer.trust_region_loss(mean, cov, mean_t, cov_t, w_mb)
                    else:
                        logp = D.log_prob(kind, cfg.cov_form, mean, cov, b_act[idx])
                        loss = ppo_clip_loss(logp, old_logp[idx], adv_mb, cfg.ratio_clip, w_mb)
                    opt_pi.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                    opt_pi.step()
                    epoch_losses.append(loss.detach())
                # one host sync per epoch, not two per minibatch (they stall a GPU's queue);
                # a NaN is still caught before the iteration can be checkpointed
                pi_losses += _finite_losses(epoch_losses, "policy", iteration)
            with torch.no_grad():  # metrics over the valid states (once per iteration)
                k = keep.to(device)
                old_mean, old_cov = old_mean[k], old_cov[k]
                raw_mean, raw_cov = policy(b_obs[k])
                if projected:
                    new_mean, new_cov = layer(raw_mean, raw_cov, old_mean, old_cov, step=global_step)
                    metrics = layer.metrics(new_mean, new_cov, old_mean, old_cov, raw_mean, raw_cov)
                    if not cfg.contextual_cov:
                        # a global covariance is not regressed: copy its projection in
                        policy.set_global_cov(new_cov[0])
                else:
                    kl = D.kl(kind, cfg.cov_form, raw_mean, raw_cov, old_mean, old_cov)
                    metrics = {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
                               "entropy_mean": D.entropy(kind, cfg.cov_form, raw_cov).mean().item(),
                               "fraction_projected": 0.0}

            # -- value update -------------------------------------------------------------
            vf_losses = []
            for _ in range(cfg.epochs_vf):
                epoch_losses = []
                for idx in minibatches(n, cfg.minibatch_size, gen, device):
                    vloss = value_loss(value(b_obs[idx]), b_ret[idx], b_val[idx], cfg.vf_clip, b_w[idx])
                    opt_vf.zero_grad(set_to_none=True)
                    vloss.backward()
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(value.parameters(), cfg.max_grad_norm)
                    opt_vf.step()
                    epoch_losses.append(vloss.detach())
                vf_losses += _finite_losses(epoch_losses, "value", iteration)

            # -- log, evaluate, checkpoint ------------------------------------------------
            last = iteration == n_iterations - 1
            eval_return = math.nan
            if evaluator is not None and (last or (iteration + 1) % cfg.eval_every == 0):
                eval_return = evaluator(policy, obs_norm, iteration)
            recent = finished_returns[-20:]
            row = {"iteration": iteration, "global_step": global_step,
                   "train_return_mean": float(np.mean(recent)) if recent else math.nan,
                   "eval_return_mean": eval_return, "episodes": len(finished_returns),
                   "policy_loss": float(np.mean(pi_losses)), "value_loss": float(np.mean(vf_losses)),
                   "steps_per_second": T * N / (time.perf_counter() - t_iter),
                   "wall_time": wall_offset + time.perf_counter() - t_start}
            row.update({k: metrics.get(k, math.nan) for k in CSV_COLUMNS if k in metrics})
            writer.writerow({k: row.get(k, math.nan) for k in CSV_COLUMNS})
            csv_file.flush()
            rows.append(row)
            if tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                        tb.add_scalar(k, v, global_step)
            if bar is not None:
                bar.update(T * N)
                bar.set_postfix(ret=f"{row['train_return_mean']:.1f}", kl=f"{row.get('kl_mean', math.nan):.2e}")
            last_good = snapshot(iteration + 1)
            # by wall time too: a kill (SIGKILL, OOM) early in a long run must not lose everything
            if (last or (iteration + 1) % cfg.checkpoint_every == 0
                    or time.perf_counter() - last_saved >= cfg.checkpoint_seconds):
                save_checkpoint(ckpt_path, last_good)
                last_saved = time.perf_counter()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (Terminated)
        # the networks may be mid-iteration: write the end of the last completed one
        save_checkpoint(ckpt_path, {**last_good, "interrupted": True})
        raise
    finally:
        restore_sigterm()
        csv_file.close()
        envs.close()
        if evaluator is not None:
            evaluator.close()
        if tb is not None:
            tb.close()
        if bar is not None:
            bar.close()
    return rows
