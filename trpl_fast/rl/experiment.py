"""Multi-seed experiments with the paper's protocol (Table 1 and Figure 2, right).

``mujoco``: every env x algorithm x seed with the table-2 (or ``humanoid``: table-3)
hyperparameters; ``reacher``: PPO and the W2, KL and Frobenius layers, each with a global
and a contextual covariance, on ``trpl_fast/ReacherSparse5-v0`` (table 4).

Each run lives in its own directory under ``out`` (``<env>_<algo>_s<seed>``, for the
Reacher ``<algo>_<global|contextual>_s<seed>``); a finished run is skipped and an
unfinished one resumed, so the command can be run again after an interruption or with
more seeds. Every run evaluates after each iteration (5 deterministic episodes); per run
the "20%" figure is the mean of the 20 evaluations after 20% of training and "final" the
mean of the last 20 (:func:`trpl_fast.rl.evaluation.run_summary`); the tables give their
mean and 95% interval over seeds (Student's t). Outputs: ``table1.md`` / ``table1.csv``
and ``curves_<env>.png`` (mujoco); ``results.md`` / ``results.csv`` and
``figure2_right_{returns,kl}.png`` (reacher).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .checkpoint import catch_sigterm

REACHER_ALGOS = ("ppo", "w2", "kl", "frob")
MUJOCO_ALGOS = ("kl", "w2", "frob", "ppo", "ppo-m", "trpo")
TABLE_COLUMNS = [
    "env",
    "method",
    "seeds",
    "steps",
    "early_mean",
    "early_ci95",
    "final_mean",
    "final_ci95",
    "kl_mean",
    "kl_max",
    "wall_time_min",
    "steps_per_second",
]


def run_name(algo: str, contextual: bool, seed: int, env_id: str | None = None) -> str:
    if env_id is None:  # the Reacher experiment's names
        return f"{algo}_{'contextual' if contextual else 'global'}_s{seed}"
    return f"{env_id.replace('/', '_').split('-')[0]}_{algo}_s{seed}"


def _train_one(job: dict) -> str:
    """Train (or resume, or skip) one run; in a worker process with one torch thread."""
    import torch

    from .config import TrainConfig, planned_iterations
    from .train import read_checkpoint, train

    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(job["config"])
    run_dir = Path(job["dir"])
    resume = (run_dir / "checkpoint.pt").exists()
    if resume:
        ckpt = read_checkpoint(run_dir)
        if not ckpt.get("interrupted") and ckpt["global_step"] >= cfg.rollout_steps * planned_iterations(cfg):
            return f"{run_dir.name}: already finished"
    # without a checkpoint (killed before its first) there is nothing to keep: start it over
    try:
        rows = train(
            cfg, run_dir, resume=resume, overwrite=not resume, progress=False, log_tensorboard=job["tensorboard"]
        )
    except KeyboardInterrupt:
        if job.get("in_worker"):  # stopped by the parent: checkpointed; take no further job
            os._exit(143)
        raise
    last = rows[-1]
    return (
        f"{run_dir.name}: {int(last['global_step'])} steps, eval return {last['eval_return_mean']:.2f}, "
        f"{last['steps_per_second']:.0f} steps/s"
    )


def _train_batch(job: dict) -> str:
    """Train fresh seeds of one config as one batched job (:mod:`.multiseed`), each into its
    own run directory; in a worker process with one torch thread."""
    import torch

    from .config import TrainConfig
    from .multiseed import train_seeds

    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(job["config"])
    dirs = [Path(d) for d in job["dirs"]]
    try:
        per_seed = train_seeds(
            cfg,
            job["seeds"],
            dirs[0].parent,
            overwrite=True,
            progress=False,
            log_tensorboard=job["tensorboard"],
            dirs=dirs,
        )
    except KeyboardInterrupt:
        if job.get("in_worker"):  # stopped by the parent: every seed checkpointed
            os._exit(143)
        raise
    return "\n".join(
        f"{d.name}: {int(rows[-1]['global_step'])} steps, eval return {rows[-1]['eval_return_mean']:.2f}, "
        f"{rows[-1]['steps_per_second']:.0f} steps/s (batched)"
        for d, rows in zip(dirs, per_seed.values())
    )


def plan_jobs(batch: list[dict], batch_seeds: bool) -> list[dict]:
    """With ``batch_seeds``, the runs of one config that differ only in the seed and have not
    started yet (no checkpoint) become one batched job (``seeds``, ``dirs``); runs already
    started (resumed or skipped) and configs the batched trainer does not take stay single."""
    if not batch_seeds:
        return batch
    from .config import TrainConfig
    from .multiseed import check_batchable

    groups: dict[str, list[dict]] = {}
    single = []
    for job in batch:
        cfg = TrainConfig.from_dict(job["config"])
        try:
            check_batchable(cfg, [cfg.seed])
            ok = not (Path(job["dir"]) / "checkpoint.pt").exists()
        except ValueError:
            ok = False
        if not ok:
            single.append(job)
            continue
        key = json.dumps({k: v for k, v in job["config"].items() if k != "seed"}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(job)
    planned = list(single)
    for jobs in groups.values():
        if len(jobs) == 1:
            planned.append(jobs[0])
        else:
            planned.append(
                {
                    "config": jobs[0]["config"],
                    "tensorboard": jobs[0]["tensorboard"],
                    "seeds": [j["config"]["seed"] for j in jobs],
                    "dirs": [j["dir"] for j in jobs],
                }
            )
    return planned


def _run(job: dict) -> str:
    return _train_batch(job) if "seeds" in job else _train_one(job)


def _worker_init() -> None:
    # Ctrl-C reaches the whole foreground process group: the workers leave it to the parent,
    # which stops them with SIGTERM (each then checkpoints its last completed iteration)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_jobs(batch: list[dict], jobs: int | None, batch_seeds: bool = False) -> None:
    """Train the runs of ``batch`` (dicts with ``config``, ``dir``, ``tensorboard``),
    ``jobs`` at a time in worker processes (default: one per CPU); with ``batch_seeds`` the
    fresh seeds of a config train as one batched job (:func:`plan_jobs`). Ctrl-C or SIGTERM
    stops every worker after it has checkpointed its last completed iteration, starts no
    further run, and re-raises: the same command resumes the experiment."""
    batch = plan_jobs(batch, batch_seeds)
    jobs = jobs or max(1, min(len(batch), os.cpu_count() or 1))
    if 2 * jobs > (os.cpu_count() or 1):
        # the runs fill the cores: an evaluation worker per run would only compete with
        # them (and hold another interpreter's memory); evaluate in each run's process
        batch = [{**job, "config": {**job["config"], "eval_in_background": False}} for job in batch]
    if jobs == 1:
        for job in batch:
            print(_run(job), flush=True)
        return
    pool = ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init)
    restore = catch_sigterm()
    futures = []
    try:
        futures = [pool.submit(_run, {**job, "in_worker": True}) for job in batch]
        for f in futures:
            print(f.result(), flush=True)
    except BaseException:
        for f in futures:
            f.cancel()
        for proc in list(getattr(pool, "_processes", {}).values()):
            if proc.is_alive():
                proc.terminate()  # SIGTERM: train() writes the last completed iteration and stops
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        restore()
    pool.shutdown(wait=True)


def summarize_run(run_dir) -> dict | None:
    """One run's row of the tables: its "20%" and "final" returns, mean / max per-state KL
    over its iterations, wall time and steps/s; ``None`` for a run with no logged iteration."""
    from .evaluation import run_summary
    from .plotting import load_run

    cfg, cols = load_run(run_dir)
    if not cols:
        return None
    total, rollout = int(cfg["total_steps"]), int(cfg["rollout_steps"])
    n_iterations = -(-total // rollout)  # config.planned_iterations: the budget rounded up
    legacy = max(1, total // rollout)  # what runs before 2026-11-29 trained: rounded down
    summary = run_summary(cols["iteration"], cols["eval_return_mean"], n_iterations, finished_after=legacy)
    wall = float(cols["wall_time"][-1])
    steps = int(cols["global_step"][-1])
    return {
        "env": cfg["env_id"],
        "algo": cfg["algo"],
        "contextual": bool(cfg.get("contextual_cov")),
        "seed": cfg["seed"],
        "steps": steps,
        "early": summary["early"],
        "final": summary["final"],
        "kl_mean": float(np.nanmean(cols["kl_mean"])),
        "kl_max": float(np.nanmax(cols["kl_max"])),
        "wall_time": wall,
        "steps_per_second": steps / wall if wall > 0 else math.nan,
    }


def method_label(algo: str, contextual: bool, reacher: bool) -> str:
    return f"{algo} ({'contextual' if contextual else 'global'})" if reacher else algo


def summary_table(run_dirs, *, reacher: bool = False) -> list[dict]:
    """Per env x method (x covariance type for the Reacher): the mean and 95% interval over
    seeds of "20%" and "final", seeds, steps, mean / max per-state KL, mean wall time and
    steps/s. Runs without a logged iteration are left out; a seed whose run has not
    finished counts for "20%" once it has its 20 evaluations, for "final" not at all."""
    from .plotting import ci95

    groups: dict[tuple, list[dict]] = {}
    for d in run_dirs:
        if not (Path(d) / "progress.csv").exists():
            continue
        s = summarize_run(d)
        if s is not None:
            groups.setdefault((s["env"], method_label(s["algo"], s["contextual"], reacher)), []).append(s)
    rows = []
    for (env, method), runs in sorted(groups.items()):
        early, early_half, _ = ci95([r["early"] for r in runs])
        final, final_half, n_final = ci95([r["final"] for r in runs])
        rows.append(
            {
                "env": env,
                "method": method,
                "seeds": len(runs),
                "finished": n_final,
                "steps": int(np.median([r["steps"] for r in runs])),
                "early_mean": early,
                "early_ci95": early_half,
                "final_mean": final,
                "final_ci95": final_half,
                "kl_mean": float(np.mean([r["kl_mean"] for r in runs])),
                "kl_max": float(np.max([r["kl_max"] for r in runs])),
                "wall_time_min": float(np.mean([r["wall_time"] for r in runs])) / 60.0,
                "steps_per_second": float(np.mean([r["steps_per_second"] for r in runs])),
            }
        )
    return rows


def _pm(mean: float, half: float) -> str:
    if mean != mean:
        return "-"
    return f"{mean:.1f}" if half != half else f"{mean:.1f} ± {half:.1f}"


def table_markdown(rows: list[dict], title: str) -> str:
    lines = [
        title,
        "",
        "| env | method | seeds (finished) | steps | 20% | final | mean KL | max KL | wall time (min) | steps/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['env']} | {r['method']} | {r['seeds']} ({r['finished']}) | {r['steps']:,} | "
            f"{_pm(r['early_mean'], r['early_ci95'])} | {_pm(r['final_mean'], r['final_ci95'])} | "
            f"{r['kl_mean']:.4f} | {r['kl_max']:.4f} | {r['wall_time_min']:.1f} | {r['steps_per_second']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], out: Path, stem: str, title: str) -> str:
    """``<out>/<stem>.md`` and ``<out>/<stem>.csv``; returns the markdown."""
    md = table_markdown(rows, title)
    (out / f"{stem}.md").write_text(md)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*TABLE_COLUMNS[:3], "finished", *TABLE_COLUMNS[3:]])
        w.writeheader()
        w.writerows(rows)
    return md


PROTOCOL = (
    "mean ± 95% interval over seeds (Student's t) of each run's mean deterministic return over "
    '5 episodes per evaluation, one evaluation per iteration; "20%": the 20 evaluations after 20% of '
    'training, "final": the last 20; KL: per-state KL(new || old) over all iterations'
)


def _has_rows(run_dir) -> bool:
    """The run has logged at least one iteration."""
    path = Path(run_dir) / "progress.csv"
    if not path.exists():
        return False
    with open(path) as f:
        return sum(1 for _ in f) > 1


def _check(seeds: int, steps: int, algos, allowed) -> None:
    unknown = sorted(set(algos) - set(allowed))
    if unknown:
        raise ValueError(f"algos must be among {allowed}, got {unknown}")
    if seeds < 1 or steps < 1:
        raise ValueError(f"seeds and steps must be >= 1, got seeds={seeds}, steps={steps}")


def mujoco_experiment(
    out: str | Path,
    envs=("Hopper-v5", "HalfCheetah-v5"),
    algos=("kl", "ppo"),
    seeds: int = 3,
    steps: int = 1_000_000,
    preset_name: str = "mujoco",
    device: str = "cpu",
    jobs: int | None = None,
    tensorboard: bool = False,
    batch_seeds: bool = True,
    report_only: bool = False,
    **overrides,
) -> str:
    """The paper's Table 1 protocol (module docstring); returns ``table1.md``'s text.
    ``overrides`` change the preset of every run (any TrainConfig field); ``batch_seeds``:
    the fresh seeds of each env x algorithm train as one batched job (:mod:`.multiseed`)."""
    from .config import preset
    from .plotting import plot_runs

    _check(seeds, steps, algos, MUJOCO_ALGOS)
    if not envs:
        raise ValueError("envs: give at least one environment id")
    # seed-major order: an interrupted experiment has whole seeds of every cell, not one cell
    configs = [
        preset(preset_name, a, env_id=e, seed=s, total_steps=steps, device=device, **overrides)
        for s in range(seeds)
        for e in envs
        for a in algos
    ]  # validates before anything runs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    batch = [
        {"config": c.to_dict(), "tensorboard": tensorboard, "dir": str(out / run_name(c.algo, False, c.seed, c.env_id))}
        for c in configs
    ]
    if not report_only:  # else: the table and curves of the runs as they are
        run_jobs(batch, jobs, batch_seeds)
    batch = [j for j in batch if _has_rows(j["dir"])]  # (report_only: runs not started yet)
    for env in envs:
        dirs = [j["dir"] for j in batch if j["config"]["env_id"] == env]
        if not dirs:
            continue
        for path in plot_runs(
            dirs, out / f"curves_{env.replace('/', '_').split('-')[0]}.png", figures=("returns",), exact_path=True
        ):
            print(f"wrote {path}")
    rows = summary_table([j["dir"] for j in batch])
    md = write_tables(rows, out, "table1", f"Paper Table 1 protocol, {steps:,} env steps per run: {PROTOCOL}.")
    print(f"wrote {out / 'table1.md'}, {out / 'table1.csv'}\n\n{md}")
    return md


def reacher_experiment(
    out: str | Path,
    steps: int = 2_000_000,
    seeds: int = 3,
    algos=REACHER_ALGOS,
    device: str = "cpu",
    jobs: int | None = None,
    tensorboard: bool = False,
    batch_seeds: bool = True,
    report_only: bool = False,
    **overrides,
) -> str:
    """Figure 2 (right): every algo with a global and a contextual covariance on the sparse
    Reacher (table 4); returns ``results.md``'s text. ``overrides`` change the table-4
    config of every run (e.g. ``num_envs``, ``rollout_steps``, ``normalize_rewards``)."""
    from .config import preset
    from .plotting import plot_runs

    _check(seeds, steps, algos, REACHER_ALGOS)
    configs = [
        preset("reacher", a, contextual_cov=c, seed=s, total_steps=steps, device=device, **overrides)
        for s in range(seeds)
        for a in algos
        for c in (False, True)
    ]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    batch = [
        {
            "config": c.to_dict(),
            "tensorboard": tensorboard,
            "dir": str(out / run_name(c.algo, c.contextual_cov, c.seed)),
        }
        for c in configs
    ]
    if not report_only:  # else: the table and curves of the runs as they are
        run_jobs(batch, jobs, batch_seeds)
    dirs = [job["dir"] for job in batch if _has_rows(job["dir"])]  # (report_only: runs not started yet)
    for path in plot_runs(dirs, out / "figure2_right.png"):
        print(f"wrote {path}")
    md = reacher_table(dirs, out, steps)
    print(f"wrote {out / 'results.md'}\n\n{md}")
    return md


def reacher_table(run_dirs, out: str | Path, steps: int) -> str:
    """``results.md`` / ``results.csv`` of the Reacher experiment from its run directories."""
    rows = summary_table(run_dirs, reacher=True)
    return write_tables(
        rows, Path(out), "results", f"Figure 2 (right), sparse 5-link Reacher, {steps:,} env steps per run: {PROTOCOL}."
    )
