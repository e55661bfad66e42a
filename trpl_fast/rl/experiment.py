"""The paper's contextual-covariance experiment (Figure 2, right): PPO and the W2, KL and
Frobenius layers, each with a global and a contextual (state-dependent) covariance, over
several seeds on ``trpl_fast/ReacherSparse5-v0`` with the table-4 hyperparameters.

Each run lives in ``<out>/<algo>_<global|contextual>_s<seed>``; a finished run is skipped
and an unfinished one resumed, so the command can be run again after an interruption or
with more seeds. Afterwards: ``<out>/figure2_right_returns.png`` (mean deterministic return
with 95% interval, contextual dashed, global solid), ``<out>/figure2_right_kl.png`` and
``<out>/results.md`` (final return per method and covariance type).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REACHER_ALGOS = ("ppo", "w2", "kl", "frob")


def run_name(algo: str, contextual: bool, seed: int) -> str:
    return f"{algo}_{'contextual' if contextual else 'global'}_s{seed}"


def _train_one(job: dict) -> str:
    """Train (or resume, or skip) one run; in a worker process with one torch thread."""
    import torch

    from .config import preset
    from .train import planned_iterations, read_checkpoint, train

    torch.set_num_threads(1)
    cfg = preset("reacher", job["algo"], contextual_cov=job["contextual"], seed=job["seed"],
                 total_steps=job["steps"], device=job["device"], **job["overrides"])
    run_dir = Path(job["dir"])
    resume = (run_dir / "checkpoint.pt").exists()
    if resume:
        ckpt = read_checkpoint(run_dir)
        if not ckpt.get("interrupted") and ckpt["global_step"] >= cfg.rollout_steps * planned_iterations(cfg):
            return f"{run_dir.name}: already finished"
    # without a checkpoint (killed before its first) there is nothing to keep: start it over
    rows = train(cfg, run_dir, resume=resume, overwrite=not resume, progress=False,
                 log_tensorboard=job["tensorboard"])
    last = rows[-1]
    return (f"{run_dir.name}: {int(last['global_step'])} steps, eval return {last['eval_return_mean']:.2f}, "
            f"{last['steps_per_second']:.0f} steps/s")


def final_returns(run_dirs) -> dict[tuple[str, bool], list[float]]:
    """``(algo, contextual) -> [final deterministic return of each seed]`` (the last
    iteration's evaluation, which every run makes)."""
    from .plotting import load_run

    out: dict[tuple[str, bool], list[float]] = {}
    for d in run_dirs:
        cfg, cols = load_run(d)
        if not cols:
            continue
        evals = cols["eval_return_mean"][~np.isnan(cols["eval_return_mean"])]
        if len(evals):
            out.setdefault((cfg["algo"], bool(cfg["contextual_cov"])), []).append(float(evals[-1]))
    return out


def results_table(returns: dict[tuple[str, bool], list[float]], steps: int) -> str:
    """Markdown table: final return, mean and 95% interval (1.96 standard errors) over seeds."""
    lines = [f"Final deterministic return after {steps:,} env steps (mean +- 95% interval over seeds)", "",
             "| method | global covariance | contextual covariance | contextual - global |", "|---|---|---|---|"]

    def cell(vals):
        if not vals:
            return "-", math.nan
        m = float(np.mean(vals))
        half = 1.96 * float(np.std(vals, ddof=1)) / math.sqrt(len(vals)) if len(vals) > 1 else math.nan
        return f"{m:.2f} +- {half:.2f} (n={len(vals)})", m

    for algo in REACHER_ALGOS:
        g, mg = cell(returns.get((algo, False), []))
        c, mc = cell(returns.get((algo, True), []))
        if g == "-" and c == "-":
            continue
        lines.append(f"| {algo} | {g} | {c} | {mc - mg:+.2f} |")
    return "\n".join(lines) + "\n"


def reacher_experiment(out: str | Path, steps: int = 2_000_000, seeds: int = 3, algos=REACHER_ALGOS,
                       device: str = "cpu", jobs: int | None = None, tensorboard: bool = False,
                       **overrides) -> str:
    """Run the experiment (module docstring) and return the results table. ``overrides``
    change the table-4 config of every run (e.g. ``num_envs``, ``rollout_steps``)."""
    from .plotting import plot_runs

    unknown = sorted(set(algos) - set(REACHER_ALGOS))
    if unknown:
        raise ValueError(f"algos must be among {REACHER_ALGOS}, got {unknown}")
    if seeds < 1 or steps < 1:
        raise ValueError(f"seeds and steps must be >= 1, got seeds={seeds}, steps={steps}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    batch = [{"algo": a, "contextual": c, "seed": s, "steps": steps, "device": device, "tensorboard": tensorboard,
              "overrides": overrides, "dir": str(out / run_name(a, c, s))} for s in range(seeds) for a in algos for c in (False, True)]
    jobs = jobs or max(1, min(len(batch), os.cpu_count() or 1))
    if jobs == 1:
        for job in batch:
            print(_train_one(job), flush=True)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for msg in pool.map(_train_one, batch):
                print(msg, flush=True)
    dirs = [job["dir"] for job in batch]
    for path in plot_runs(dirs, out / "figure2_right.png"):
        print(f"wrote {path}")
    table = results_table(final_returns(dirs), steps)
    (out / "results.md").write_text(table)
    print(f"wrote {out / 'results.md'}\n\n{table}")
    return table
