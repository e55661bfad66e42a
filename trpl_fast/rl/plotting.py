"""Learning curves and the paper's Figure 2 (left) view from run directories."""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np


def load_run(run_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    run_dir = Path(run_dir)
    cfg_path, csv_path = run_dir / "config.json", run_dir / "progress.csv"
    if not cfg_path.exists() or not csv_path.exists():
        raise ValueError(f"{run_dir} is not a run directory (needs config.json and progress.csv)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict) or not {"env_id", "algo"} <= set(cfg):
        raise ValueError(f"{cfg_path} is not a run's config (needs an object with env_id and algo)")
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        cols = (
            {k: np.array([float(r[k]) if r[k] not in ("", "nan") else math.nan for r in rows]) for k in rows[0]}
            if rows
            else {}
        )
    except (ValueError, TypeError, KeyError, csv.Error) as exc:  # a short row reads as None
        raise ValueError(f"{csv_path} cannot be read ({exc})") from exc
    if cols and "global_step" not in cols:
        raise ValueError(f"{csv_path} has no global_step column")
    return cfg, cols


# two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1); beyond the
# table the normal 1.96 is within 2%
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    25: 2.060,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
}


def t975(df: int) -> float:
    """Student's t quantile for a 95% interval with ``df`` degrees of freedom (the next
    smaller tabulated ``df``: conservative)."""
    if df < 1:
        return math.nan
    return _T975[max(k for k in _T975 if k <= df)] if df <= 120 else 1.96


def ci95(values) -> tuple[float, float, int]:
    """``(mean, half-width of the 95% interval, n)`` over the finite ``values`` (seeds):
    Student's t on the standard error; half-width NaN for fewer than 2 values."""
    v = np.asarray([x for x in values if x == x and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan, 0
    if len(v) < 2:
        return float(v.mean()), math.nan, 1
    return float(v.mean()), t975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v)), len(v)


def mean_ci95(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and half-width of the 95% interval (Student's t over seeds, per point) of the
    curves, truncated to the shortest; half-width 0 where fewer than 2 seeds have a value."""
    n = min(len(c) for c in curves)
    stack = np.stack([c[:n] for c in curves])
    with warnings.catch_warnings():  # iterations without an evaluation are NaN in every seed
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(stack, axis=0)
        count = (~np.isnan(stack)).sum(0)
        if stack.shape[0] < 2:
            return mean, np.zeros_like(mean)
        t = np.array([t975(int(c) - 1) if c >= 2 else 0.0 for c in count])
        half = t * np.nanstd(stack, axis=0, ddof=1) / np.sqrt(np.maximum(count, 1))
        return mean, np.where(count >= 2, half, 0.0)


def plot_runs(
    run_dirs, out: str | Path, metric: str = "eval_return_mean", figures=("returns", "kl"), exact_path: bool = False
) -> list[Path]:
    """Write ``<out>_returns.png`` (mean return with 95% interval per method and env; dashed
    for contextual covariance) and ``<out>_kl.png`` (mean KL to the old policy per
    iteration per method, paper Figure 2 left). Returns the paths written. ``figures``
    picks among the two; with ``exact_path`` (one figure) it is written to ``out`` itself."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list] = defaultdict(list)
    for d in run_dirs:
        cfg, cols = load_run(d)
        if cols:
            groups[(cfg["env_id"], cfg["algo"], bool(cfg.get("contextual_cov")))].append(cols)
    if not groups:
        raise ValueError("no run with logged iterations among the given directories")
    envs = sorted({k[0] for k in groups})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one colour per method: its global (solid) and contextual (dashed) runs side by side
    colors = {algo: f"C{i}" for i, algo in enumerate(sorted({k[1] for k in groups}))}
    paths = []
    for name, key, ylabel in (("returns", metric, "return"), ("kl", "kl_mean", "mean KL(new || old)")):
        if name not in figures:
            continue
        fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.6), squeeze=False)
        for ax, env in zip(axes[0], envs):
            for (e, algo, contextual), runs in sorted(groups.items()):
                if e != env:
                    continue
                col = key if not (key == metric and np.all(np.isnan(runs[0][key]))) else "train_return_mean"
                steps = runs[0]["global_step"][: min(len(r["global_step"]) for r in runs)]
                mean, half = mean_ci95([r[col] for r in runs])
                ok = ~np.isnan(mean)
                label = f"{algo}{' (contextual)' if contextual else ''} (n={len(runs)})"
                (line,) = ax.plot(steps[ok], mean[ok], ls="--" if contextual else "-", color=colors[algo], label=label)
                ax.fill_between(steps[ok], (mean - half)[ok], (mean + half)[ok], color=line.get_color(), alpha=0.2)
            ax.set_title(env)
            ax.set_xlabel("environment steps")
            ax.set_ylabel(ylabel)
            if name == "kl":
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out if exact_path else out.with_name(f"{out.stem}_{name}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
