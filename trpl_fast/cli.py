"""The ``trpl-fast`` command.

``trpl-fast demo``: project a batch of random Gaussian policies with every kind and
covariance form, check every row against its bound and against the float64 reference,
and time the operator against the reference on this machine.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__})")
    return torch.device(name)


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


# the float64 reference is dense and unoptimized (KL by bisection): timing it on the default
# 4,096 rows took 3-5 minutes with no output, so it is timed on at most this many rows
DEMO_REF_ROWS = 256


def _spd_root(s):
    """The symmetric positive-definite square root of ``s`` (..., d, d)."""
    e, u = torch.linalg.eigh(s)
    return u @ torch.diag_embed(e.sqrt()) @ u.mT


def demo(args) -> int:
    import trpl_fast
    from trpl_fast import distances as D
    from trpl_fast import reference as R
    from trpl_fast.ops import OPS

    for opt in ("batch", "dim", "repeats"):
        if getattr(args, opt) < 1:
            raise ValueError(f"--{opt} must be >= 1, got {getattr(args, opt)}")
    for opt in ("mean_bound", "cov_bound"):
        if not getattr(args, opt) > 0:
            raise ValueError(f"--{opt.replace('_', '-')} must be > 0, got {getattr(args, opt)}")
    device = _device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    n, d = args.batch, args.dim
    m = min(n, DEMO_REF_ROWS)
    print(
        f"trpl_fast {trpl_fast.__version__} | torch {torch.__version__} | device {device} | "
        f"batch {n} x d {d} | float32 | mean_bound {args.mean_bound} cov_bound {args.cov_bound}"
    )
    print(
        f"(every row checked against the float64 reference; op timed on all {n} rows, "
        f"float64 reference timed on {m} of the {n} rows)",
        flush=True,
    )
    print(
        f"{'kind':5s} {'form':5s} {'projected':>9s} {'max mean/bound':>15s} {'max cov/bound':>14s} "
        f"{'rel.err vs ref':>15s} {'op ms':>8s} {f'ref ms/{m}':>10s}",
        flush=True,
    )
    ok = True
    for kind, form in sorted(OPS):
        old_mean = torch.randn(n, d, generator=gen)
        mean = old_mean + 0.3 * torch.randn(n, d, generator=gen)
        if form == "diag":
            old_cov = torch.exp(0.3 * torch.randn(n, d, generator=gen))
            cov = old_cov * torch.exp(0.2 * torch.randn(n, d, generator=gen))
        else:
            a = torch.eye(d) + 0.1 * torch.randn(n, d, d, generator=gen)
            s_old = torch.eye(d) + 0.05 * (lambda b: b @ b.mT)(torch.randn(n, d, d, generator=gen))
            s_new = a @ s_old @ a.mT
            if kind == "w2":
                cov, old_cov = _spd_root(s_new), _spd_root(s_old)
                cov, old_cov = 0.5 * (cov + cov.mT), 0.5 * (old_cov + old_cov.mT)
            else:
                cov, old_cov = torch.linalg.cholesky(s_new), torch.linalg.cholesky(s_old)
        tensors = [t.to(device) for t in (mean, cov, old_mean, old_cov)]
        kw = dict(kind=kind, mean_bound=args.mean_bound, cov_bound=args.cov_bound)
        api = trpl_fast.project_diag if form == "diag" else trpl_fast.project_full
        ref = R.project_diag if form == "diag" else R.project_full
        mean_t, cov_t = api(*tensors, **kw)
        r_mean, r_cov = ref(*[t.cpu().double() for t in tensors], **kw)
        err = max(
            ((mean_t.cpu().double() - r_mean).abs().max() / r_mean.abs().max()).item(),
            ((cov_t.cpu().double() - r_cov).abs().max() / r_cov.abs().max()).item(),
        )
        mp = D.mean_part(kind, form, mean_t.double(), tensors[2].double(), tensors[3].double())
        cp = D.cov_part(kind, form, cov_t.double(), tensors[3].double())
        before = (
            D.mean_part(kind, form, *[t.double() for t in (tensors[0], tensors[2], tensors[3])]) > args.mean_bound
        ) | (D.cov_part(kind, form, tensors[1].double(), tensors[3].double()) > args.cov_bound)
        t_op = _time(functools.partial(api, *tensors, check_values=False, **kw), args.repeats)
        t_ref = _time(functools.partial(ref, *[t[:m] for t in tensors], **kw), max(1, args.repeats // 3))
        row_ok = mp.max() <= args.mean_bound * 1.001 and cp.max() <= args.cov_bound * 1.001 and err < 1e-4
        ok &= bool(row_ok)
        print(
            f"{kind:5s} {form:5s} {before.float().mean().item():9.1%} {mp.max().item() / args.mean_bound:15.6f} "
            f"{cp.max().item() / args.cov_bound:14.6f} {err:15.2e} {1e3 * t_op:8.2f} {1e3 * t_ref:10.2f}"
            + ("" if row_ok else "  <-- FAILED"),
            flush=True,
        )
    print("all rows inside their trust regions, outputs match the float64 reference" if ok else "FAILED")
    return 0 if ok else 1


# `trpl-fast train` option -> TrainConfig field, for the options that set one
_TRAIN_FIELDS = {
    "env": "env_id",
    "algo": "algo",
    "steps": "total_steps",
    "seed": "seed",
    "device": "device",
    "num_envs": "num_envs",
    "env_backend": "env_backend",
    "checkpoint_seconds": "checkpoint_seconds",
}
# (no env default here: the preset's -- HalfCheetah-v5, or Humanoid-v5 for `humanoid`)
_TRAIN_DEFAULTS = {"algo": "kl", "steps": 1_000_000, "seed": 0, "device": "auto", "preset": "mujoco"}


def _config_file_fields(path) -> dict:
    """The fields a ``--config`` JSON file sets (all of a run's ``config.json``, or a few)."""
    import json
    from pathlib import Path

    from .rl.config import TrainConfig

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {path}: not valid JSON ({exc})") from None
    try:
        TrainConfig.from_dict({**TrainConfig().to_dict(), **data} if isinstance(data, dict) else data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--config {path}: {exc}") from None
    return {k: tuple(v) if k in ("hidden", "hidden_vf") and isinstance(v, list) else v for k, v in data.items()}


def _batched_resume_seeds(args) -> list[int] | None:
    """The seeds of ``--resume DIR`` when DIR holds a batched run (``seed<k>/`` subdirectories
    and no run of its own), else None; ``--seeds`` given with it must name the same seeds."""
    from pathlib import Path

    from .rl.multiseed import find_seed_dirs

    found = [] if (Path(args.resume) / "checkpoint.pt").exists() else find_seed_dirs(args.resume)
    if args.seeds is not None and sorted(args.seeds) != found:
        raise ValueError(
            f"--seeds {' '.join(map(str, args.seeds))} with --resume {args.resume}: "
            + (
                f"the batch there has seeds {' '.join(map(str, found))}"
                if found
                else "it holds no batched run (seed<k>/ directories)"
            )
        )
    return found or None


def train_cmd(args) -> int:
    import dataclasses

    from .rl.config import TrainConfig, parse_overrides, preset
    from .rl.train import Terminated, TrainingDiverged, planned_iterations, read_checkpoint, train

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.seeds is not None and args.seed is not None:
        raise ValueError("--seed and --seeds: give one of them (--seeds trains several seeds as one batched job)")
    given = {opt: getattr(args, opt) for opt in _TRAIN_FIELDS if getattr(args, opt) is not None}
    sets = parse_overrides(args.set or [])
    seeds = _batched_resume_seeds(args) if args.resume else args.seeds
    if args.resume and seeds:
        from .rl.multiseed import seed_dir

        out = args.resume
        if args.out is not None and args.out != args.resume:
            raise ValueError(
                f"--out {args.out} and --resume {args.resume} name different runs; a run resumes in its own directory"
            )
        if args.preset is not None or args.config is not None:
            raise ValueError(
                "--preset and --config cannot be combined with --resume (the run's config is in its checkpoint)"
            )
        cfg = TrainConfig.from_dict(read_checkpoint(seed_dir(out, seeds[0]))["config"])
        cfg = dataclasses.replace(cfg, **{_TRAIN_FIELDS[k]: v for k, v in given.items()}, **sets)
    elif args.resume:
        # the run's own config; options given on the command line must agree with it
        # (train() names any that do not, except the few a resumed run may change)
        out = args.resume
        if args.out is not None and args.out != args.resume:
            raise ValueError(
                f"--out {args.out} and --resume {args.resume} name different runs; a run resumes in its own directory"
            )
        if args.preset is not None or args.config is not None:
            raise ValueError(
                "--preset and --config cannot be combined with --resume (the run's config is in its checkpoint)"
            )
        cfg = TrainConfig.from_dict(read_checkpoint(out)["config"])
        cfg = dataclasses.replace(cfg, **{_TRAIN_FIELDS[k]: v for k, v in given.items()}, **sets)
    else:
        # precedence, lowest first: the preset, --config FILE, the named options, --set
        from_file = _config_file_fields(args.config) if args.config else {}
        opts = {**_TRAIN_DEFAULTS, **{k: v for k, v in vars(args).items() if k in _TRAIN_DEFAULTS and v is not None}}
        algo = sets.get("algo", given.get("algo", from_file.get("algo", opts["algo"])))
        named = {
            _TRAIN_FIELDS[k]: v
            for k, v in {**opts, **given}.items()
            if k in _TRAIN_FIELDS and k != "algo" and (k in given or _TRAIN_FIELDS[k] not in from_file)
        }
        overrides = {**from_file, **named, **sets}
        overrides.pop("algo", None)
        cfg = preset(opts["preset"], algo, **overrides)
        out = args.out or (
            f"runs/{cfg.env_id.replace('/', '_')}_{cfg.algo}_s{cfg.seed}"
            if seeds is None
            else f"runs/{cfg.env_id.replace('/', '_')}_{cfg.algo}_seeds"
        )
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        # measured on 2 cores: torch's 2 threads beside two other runs ran the KL preset at
        # 8 steps/s, one thread per run at ~600
        torch.set_num_threads(args.threads)
    verb = "resuming" if args.resume else "training"
    budget = f"{cfg.total_steps} steps"
    if cfg.rollout_steps >= 1 and cfg.total_steps >= 1 and cfg.total_steps % cfg.rollout_steps:
        n = planned_iterations(cfg)
        budget += f" (rounded up to {n} iterations of {cfg.rollout_steps}: {n * cfg.rollout_steps} steps)"
    if seeds:
        budget += f" per seed, seeds {' '.join(map(str, seeds))} batched"
    print(f"{verb} {cfg.algo} on {cfg.env_id} for {budget} -> {out}")
    try:
        if seeds:
            from .rl.multiseed import train_seeds

            per_seed = train_seeds(
                cfg, seeds, out, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress
            )
            for seed, rows in per_seed.items():
                print(f"seed {seed}: {rows[-1]['global_step']} steps, eval return {rows[-1]['eval_return_mean']:.1f}")
            last = next(iter(per_seed.values()))[-1]
            print(
                f"done: {len(seeds)} seeds x {last['global_step']} steps, "
                f"{len(seeds) * last['steps_per_second']:.0f} steps/s in all"
            )
            return 0
        rows = train(cfg, out, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress)
    except TrainingDiverged as exc:
        print(f"error: {exc}; the last good checkpoint is in {out}", file=sys.stderr)
        return 2
    except Terminated:
        print(
            f"\nterminated (SIGTERM): the last completed iteration is checkpointed in {out}; "
            f"continue with: trpl-fast train --resume {out}",
            file=sys.stderr,
        )
        return 143
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: the last completed iteration is checkpointed in {out}; "
            f"continue with: trpl-fast train --resume {out}",
            file=sys.stderr,
        )
        return 130
    last = rows[-1]
    print(
        f"done: {last['global_step']} steps, eval return {last['eval_return_mean']:.1f}, "
        f"{last['steps_per_second']:.0f} steps/s"
    )
    return 0


def eval_cmd(args) -> int:
    from .rl.evaluation import evaluate
    from .rl.train import load_policy, resolve_device

    device = resolve_device(args.device)
    cfg, policy, obs_norm = load_policy(args.checkpoint, device)
    ret = evaluate(
        policy,
        obs_norm,
        cfg.env_id,
        args.episodes,
        args.seed,
        device,
        backend=cfg.env_backend,
        clip_actions=cfg.clip_actions,
    )
    print(f"{cfg.env_id} {cfg.algo}: mean deterministic return over {args.episodes} episodes: {ret:.2f}")
    return 0


def plot_cmd(args) -> int:
    from .rl.plotting import plot_runs

    for path in plot_runs(args.run_dirs, args.out):
        print(f"wrote {path}")
    return 0


def experiment_cmd(args) -> int:
    from .rl.config import parse_overrides
    from .rl.experiment import REACHER_ALGOS, mujoco_experiment, reacher_experiment

    overrides = parse_overrides(args.set or [])
    if args.normalize_rewards:
        overrides["normalize_rewards"] = True
    common = dict(
        steps=args.steps,
        seeds=args.seeds,
        device=args.device,
        jobs=args.jobs,
        tensorboard=args.tensorboard,
        batch_seeds=not args.no_batch_seeds,
        report_only=args.report_only,
    )
    if args.name == "reacher" and (args.envs is not None or args.preset is not None):
        raise ValueError(
            "--envs and --preset are for `experiment mujoco`; the Reacher experiment has its own (table 4)"
        )
    out = args.out or ("runs/reacher" if args.name == "reacher" else "runs/table1")
    try:
        if args.name == "reacher":
            reacher_experiment(out, algos=args.algos or list(REACHER_ALGOS), **common, **overrides)
        else:
            mujoco_experiment(
                out,
                envs=args.envs or ["Hopper-v5", "HalfCheetah-v5"],
                algos=args.algos or ["kl", "ppo"],
                preset_name=args.preset or "mujoco",
                **common,
                **overrides,
            )
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM
        print(
            f"\n{'terminated' if type(exc).__name__ == 'Terminated' else 'interrupted'}: every run in progress "
            f"checkpointed its last completed iteration in {out}; run the same command to continue",
            file=sys.stderr,
        )
        return 143 if type(exc).__name__ == "Terminated" else 130
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="trpl-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="project random policies with every op; check and time them")
    p.add_argument("--batch", type=int, default=4096, help="states per batch (default 4096)")
    p.add_argument("--dim", type=int, default=7, help="action dimension d (default 7)")
    p.add_argument("--mean-bound", type=float, default=0.03)
    p.add_argument("--cov-bound", type=float, default=0.001)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--repeats", type=int, default=10, help="timing repeats, >= 1 (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    t = sub.add_parser(
        "train",
        help="train a policy (kl, w2, frob, ppo, ppo-m, trpo) on a Gymnasium / EnvPool env",
        description="Train with a preset of the paper's hyperparameters (--preset), changed by "
        "--config FILE.json and --set KEY=VALUE (every TrainConfig field; e.g. a sweep: "
        "for lr in 3e-5 5e-5 1e-4; do trpl-fast train --set lr=$lr --out runs/lr$lr; done).",
    )
    t.add_argument("--env", default=None, help="environment id (default HalfCheetah-v5)")
    t.add_argument("--algo", default=None, help="kl, w2, frob, ppo, ppo-m or trpo (default kl)")
    t.add_argument(
        "--steps",
        type=int,
        default=None,
        help="environment steps, >= 1 (default 1,000,000); rounded up to whole iterations of the "
        "preset's rollout (2,048 steps for mujoco, 16,384 for humanoid and throughput)",
    )
    t.add_argument("--seed", type=int, default=None, help="default 0")
    t.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="train these seeds as one batched job (stacked networks, one process): each seed writes "
        "OUT/seed<k>/ with a single run's files; --resume OUT resumes the batch (kl, w2, frob, ppo, "
        "ppo-m; diagonal covariances)",
    )
    t.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    t.add_argument("--preset", default=None, help="mujoco (paper table 2, default), humanoid (table 3) or throughput")
    t.add_argument("--num-envs", type=int, default=None, help="parallel environments (default: the preset's)")
    t.add_argument(
        "--env-backend",
        default=None,
        help="auto (EnvPool where it has the task; default), envpool or "
        "gymnasium (slower, but --resume restores its environments exactly)",
    )
    t.add_argument("--out", default=None, help="run directory (default runs/<env>_<algo>_s<seed>)")
    t.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint (--steps may extend it)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run in --out (a directory holding a run is otherwise refused)",
    )
    t.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=None,
        help="also checkpoint after this much wall time (default 60; checkpoints are written every "
        "checkpoint_every iterations or this often, whichever comes first, and at the end)",
    )
    t.add_argument("--no-progress", action="store_true")
    t.add_argument(
        "--config",
        default=None,
        metavar="FILE.json",
        help="config fields from a JSON file (all of a run's own config.json, or any subset), applied "
        "over the preset; the named options and --set override it",
    )
    t.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="set any TrainConfig field (repeatable; applied last), typed and checked: "
        "--set lr=1e-4 --set hidden=128,128 --set max_grad_norm=none --set clip_actions=true. "
        "An unknown key or a bad value is an error naming it. The fields and their meaning: "
        "trpl_fast/rl/config.py or any run's config.json",
    )
    t.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core); 1 is fastest for the paper presets' "
        "small minibatches and avoids oversubscription when several runs share the cores",
    )
    t.set_defaults(func=train_cmd)
    e = sub.add_parser("eval", help="evaluate a checkpoint's deterministic policy")
    e.add_argument("checkpoint", help="checkpoint.pt or its run directory")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=eval_cmd)
    pl = sub.add_parser("plot", help="learning curves (mean, 95%% interval over seeds) and mean KL per iteration")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("--out", default="plots/curves.png", help="output prefix (default plots/curves.png)")
    pl.set_defaults(func=plot_cmd)
    x = sub.add_parser(
        "experiment",
        help="multi-seed experiments with the paper's protocol (Table 1; Figure 2 right)",
        description="Train every env x algorithm x seed (one run directory each; finished runs are "
        "skipped, unfinished ones resumed), evaluating after every iteration, then write the "
        "table ('20%%' and 'final' returns with 95%% intervals over seeds, KL, wall time) and "
        "the learning curves. mujoco: table1.md/.csv and curves_<env>.png; reacher: "
        "results.md/.csv and figure2_right_*.png.",
    )
    x.add_argument(
        "name",
        choices=["mujoco", "reacher"],
        help="mujoco: paper Table 1 (--envs, --algos; table-2 or --preset humanoid table-3 "
        "hyperparameters); reacher: PPO, W2, KL, Frobenius x global / contextual covariance on "
        "trpl_fast/ReacherSparse5-v0 (table 4)",
    )
    x.add_argument("--envs", nargs="+", default=None, help="mujoco: environment ids (default Hopper-v5 HalfCheetah-v5)")
    x.add_argument("--algos", nargs="+", default=None, help="default: kl ppo (mujoco); ppo w2 kl frob (reacher)")
    x.add_argument("--preset", default=None, help="mujoco: mujoco (table 2, default) or humanoid (table 3)")
    x.add_argument("--steps", type=int, default=1_000_000, help="env steps per run (default 1,000,000)")
    x.add_argument("--seeds", type=int, default=3, help="seeds per method: 0 .. N-1 (default 3)")
    x.add_argument(
        "--jobs", type=int, default=None, help="runs in parallel, one torch thread each (default: the CPU count)"
    )
    x.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    x.add_argument("--out", default=None, help="experiment directory (default runs/table1 or runs/reacher)")
    x.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="change a config field of every run (repeatable; as for `train --set`)",
    )
    x.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events per run")
    x.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the table and curves of the runs in --out as they are (e.g. while they train)",
    )
    x.add_argument(
        "--no-batch-seeds",
        action="store_true",
        help="train every seed as its own process (default: the seeds of each env x algorithm that have "
        "not started train as one batched job, as `train --seeds`; each seed is exactly its single run)",
    )
    x.add_argument(
        "--normalize-rewards",
        action="store_true",
        help="normalize rewards for every method (= --set normalize_rewards=true; table 4 gives it to PPO "
        "only); measured here: the projections learn the sparse Reacher at 500k steps only with it "
        "(bench/RESULTS.md)",
    )
    x.set_defaults(func=experiment_cmd)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # bad input or a full / read-only disk: a message, not a traceback
        print(f"trpl-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
