"""Ablation table: one row per configuration (a batched ``--seeds`` run directory), the
paper's "20%" and "final" per seed and their mean with the 95% interval over seeds, and how
many seeds end in the high mode (``final`` above ``--high``; HalfCheetah's returns are
bimodal across seeds, ~1,500-2,000 against ~3,500-5,500, so the count says more than a
mean over a few seeds).

    python -m bench.ablation_report --high 2500 --out bench/results/ablation_ppo_halfcheetah/table_400k \\
        preset=runs/abl9/ppo_preset sb3like=runs/abl9/ppo_sb3like

Each ``LABEL=DIR`` is a directory of ``seed<k>/`` runs (``trpl-fast train --seeds``). Not a test.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from trpl_fast.rl.experiment import summarize_run
from trpl_fast.rl.multiseed import find_seed_dirs, seed_dir
from trpl_fast.rl.plotting import ci95, load_run, mean_ci95


def config_row(label: str, run_dir: Path, high: float | None) -> dict:
    runs = [summarize_run(seed_dir(run_dir, s)) for s in find_seed_dirs(run_dir)]
    runs = [r for r in runs if r is not None]
    if not runs:
        raise SystemExit(f"{run_dir}: no seed runs with logged iterations")
    finals = [r["final"] for r in runs]
    final, final_half, n = ci95(finals)
    early, early_half, _ = ci95([r["early"] for r in runs])
    cfg = json.loads((seed_dir(run_dir, runs[0]["seed"]) / "config.json").read_text())
    return {
        "config": label,
        "dir": str(run_dir),
        "seeds": len(runs),
        "finished": n,
        "steps": runs[0]["steps"],
        "early_mean": early,
        "early_ci95": early_half,
        "final_mean": final,
        "final_ci95": final_half,
        "high_mode": sum(f > high for f in finals if f == f) if high is not None else None,
        "final_per_seed": " / ".join(f"{f:.0f}" for f in finals),
        "env_backend": cfg.get("env_backend", "gymnasium (SB3)"),
    }


def plot_configs(configs: list[tuple[str, Path]], path: Path) -> None:
    """Evaluation return against env steps per configuration: mean and 95% band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run_dir in configs:
        runs = [load_run(seed_dir(run_dir, s))[1] for s in find_seed_dirs(run_dir)]
        runs = [r for r in runs if r]
        n = min(len(r["global_step"]) for r in runs)
        steps = runs[0]["global_step"][:n]
        mean, half = mean_ci95([r["eval_return_mean"] for r in runs])
        (line,) = ax.plot(steps, mean, label=f"{label} (n={len(runs)})")
        ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation return (5 episodes)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", metavar="LABEL=DIR")
    p.add_argument(
        "--high",
        type=float,
        default=None,
        help="count the seeds whose final is above this (a bimodal task's high mode)",
    )
    p.add_argument("--out", default=None, help="write OUT.md and OUT.csv")
    p.add_argument("--plot", default=None, help="write the configurations' curves to this PNG")
    args = p.parse_args(argv)
    rows, configs = [], []
    for item in args.configs:
        label, sep, d = item.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=DIR, got {item!r}")
        configs.append((label, Path(d)))
        rows.append(config_row(label, Path(d), args.high))
    if args.plot:
        plot_configs(configs, Path(args.plot))
    high_col = f" high mode (final > {args.high:.0f}) |" if args.high is not None else ""
    lines = [
        f"| config | seeds (finished) | steps | 20% | final |{high_col} final per seed |",
        "|---|---|---|---|---|" + ("---|" if args.high is not None else "") + "---|",
    ]
    for r in rows:
        high = f" {r['high_mode']} of {r['finished']} |" if args.high is not None else ""
        lines.append(
            f"| {r['config']} | {r['seeds']} ({r['finished']}) | {r['steps']:,} | {r['early_mean']:.0f} ± "
            f"{r['early_ci95']:.0f} | {r['final_mean']:.0f} ± {r['final_ci95']:.0f} |{high} {r['final_per_seed']} |"
        )
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md)
        with open(out.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
