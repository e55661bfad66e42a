"""Return against wall-clock time for groups of runs (issue 11's throughput preset beside the
paper preset): per group the mean +- 95% interval over seeds of "final" (last 20
evaluations), the return reached by given wall times (each run's mean of its last 5
evaluations by then), the same at ``--fraction`` of the target group's mean wall time (the
issue's measure: 1/3), and each run's wall time to reach a target return (the first time the
mean of 5 consecutive evaluations reaches it); with ``--pairs NEW:OLD``, the per-seed
difference of two groups run on the same seeds (a change shown before and after); for
every group, its return at the fraction less the target, with Welch's 95% interval (the two
groups' seeds are independent draws, their spreads unequal) and the ratio; a figure
of the curves against wall time (each run thin, the mean over a group's runs thick) and,
with ``--copy-runs``, each run's ``config.json`` and ``progress.csv`` under
``OUT/runs/<group>/`` so that the report can be redrawn.

    python -m bench.throughput_report --groups paper=runs/tp3/kl_paper_s* \
        throughput=runs/tp3/kl_throughput_s* e10_mb512=runs/tp3/kl_tp_e10_mb512_s* \
        --target-group paper --copy-runs --out bench/results/throughput_3seeds

Not a test.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import shutil
from pathlib import Path

import numpy as np

from trpl_fast.rl.plotting import ci95, load_run, t975


def _curve(cols):
    ok = np.isfinite(cols["eval_return_mean"])
    return cols["wall_time"][ok], cols["global_step"][ok], cols["eval_return_mean"][ok]


def _paired(report: dict, seeds: dict, new: str, old: str) -> dict:
    """``new - old`` per seed (matched by each run's ``config.json`` seed, over the seeds both
    groups have) at the fraction and final, with the mean +- 95% interval."""
    g_new, g_old = report["groups"][new], report["groups"][old]
    common = sorted(set(seeds[new]) & set(seeds[old]))
    if len(common) < 2:
        raise ValueError(f"--pairs {new}:{old}: the groups share {len(common)} seed(s); a paired interval needs 2")
    out = {"seeds": common}
    for key, get in (("at_fraction", lambda g: g["at_fraction"]["per_run"]), ("final", lambda g: g["final_per_run"])):
        by_new = dict(zip(seeds[new], get(g_new)))
        by_old = dict(zip(seeds[old], get(g_old)))
        diff = [by_new[k] - by_old[k] for k in common]
        out[key] = {"per_seed": diff, "mean": list(ci95(diff)[:2])}
    return out


def welch_ci95(a, b) -> tuple[float, float]:
    """``(mean(a) - mean(b), half-width of its 95% interval)`` for two independent samples with
    unequal variances (Welch: standard error ``sqrt(var_a / n_a + var_b / n_b)``, t quantile at
    the Welch-Satterthwaite degrees of freedom, rounded down as ``t975`` does); NaN half-width
    when either sample has fewer than 2 finite values or both have no spread."""
    a = np.asarray([x for x in a if math.isfinite(x)], dtype=np.float64)
    b = np.asarray([x for x in b if math.isfinite(x)], dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return diff, math.nan
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff, t975(df) * math.sqrt(va + vb)


def _at(wall, ret, t, window=5):
    have = ret[wall <= t]
    return float(np.mean(have[-window:])) if len(have) else math.nan


def _time_to(wall, ret, target, window=5):
    if len(ret) < window:
        return math.nan
    smooth = np.convolve(ret, np.ones(window) / window, mode="valid")
    hit = np.nonzero(smooth >= target)[0]
    return float(wall[hit[0] + window - 1]) if len(hit) else math.nan


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", nargs="+", required=True, help="NAME=GLOB of run directories")
    p.add_argument("--target-group", required=True, help="the group whose final return is the target")
    p.add_argument("--times", type=float, nargs="+", default=[30.0, 60.0, 90.0, 120.0])
    p.add_argument("--fraction", type=float, default=1 / 3, help="of the target group's mean wall time")
    p.add_argument(
        "--target-wall-s",
        type=float,
        default=None,
        help="the target's wall time in seconds instead of the target group's mean (e.g. that mean "
        "less a saving of the code measured since those runs); both are recorded",
    )
    p.add_argument(
        "--pairs",
        nargs="+",
        default=[],
        metavar="NEW:OLD",
        help="group pairs: NEW - OLD per seed (each run's config.json seed) at the fraction and final",
    )
    p.add_argument("--copy-runs", action="store_true", help="copy config.json / progress.csv to OUT/runs/<group>/")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.target_wall_s is not None and not (math.isfinite(args.target_wall_s) and args.target_wall_s > 0):
        p.error(f"--target-wall-s must be a positive number of seconds, got {args.target_wall_s}")
    groups = {}
    for spec in args.groups:
        name, pattern = spec.split("=", 1)
        groups[name] = sorted(glob.glob(pattern))
    pairs = [spec.split(":", 1) for spec in args.pairs]
    for spec, pair in zip(args.pairs, pairs):
        if len(pair) != 2 or not set(pair) <= set(groups):
            p.error(f"--pairs {spec}: expected NEW:OLD, two of the groups {', '.join(groups)}")
    runs = {n: [load_run(d) for d in dirs] for n, dirs in groups.items()}
    curves = {n: [_curve(cols) for _, cols in loaded] for n, loaded in runs.items()}
    seeds = {n: [cfg.get("seed") for cfg, _ in loaded] for n, loaded in runs.items()}
    finals = {n: [float(np.mean(r[-20:])) for _, _, r in cs] for n, cs in curves.items()}
    target = float(np.mean(finals[args.target_group]))
    measured_wall = float(np.mean([w[-1] for w, _, _ in curves[args.target_group]]))
    target_wall = measured_wall if args.target_wall_s is None else args.target_wall_s
    t_frac = args.fraction * target_wall
    report: dict = {
        "target": target,
        "target_group": args.target_group,
        "target_wall_s": target_wall,
        "target_group_mean_wall_s": measured_wall,
        "fraction": args.fraction,
        "groups": {},
    }
    for n, cs in curves.items():
        at_frac = [_at(w, r, t_frac) for w, _, r in cs]
        frac_mean, frac_half, _ = ci95(at_frac)
        mean, half, _ = ci95(finals[n])
        report["groups"][n] = {
            "runs": groups[n],
            "final": [mean, half],
            "final_per_run": finals[n],
            "steps": [int(s[-1]) for _, s, _ in cs],
            "wall_s": [float(w[-1]) for w, _, _ in cs],
            "at_wall_s": {str(t): [_at(w, r, t) for w, _, r in cs] for t in args.times},
            "at_fraction": {"wall_s": t_frac, "per_run": at_frac, "mean": (frac_mean, frac_half)},
            "time_to_target_s": [_time_to(w, r, target) for w, _, r in cs],
            # the measure as a comparison of two sets of seeds, not of two means
            "at_fraction_vs_target": {
                "difference": list(welch_ci95(at_frac, finals[args.target_group])),
                "ratio": frac_mean / target if target else math.nan,
            },
        }
    try:
        report["pairs"] = {f"{a} - {b}": _paired(report, seeds, a, b) for a, b in pairs}
    except ValueError as exc:
        p.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.copy_runs:
        # one folder per group: two groups' runs may share a name (e.g. probe_a/Hopper_before_s0
        # and probe_b/Hopper_before_s0); by name alone one would overwrite the other
        for n, dirs in groups.items():
            for d in dirs:
                dest = out / "runs" / n / Path(d).name
                dest.mkdir(parents=True, exist_ok=True)
                for name in ("config.json", "progress.csv"):
                    shutil.copyfile(Path(d) / name, dest / name)
        report["groups"] = {
            n: {**g, "runs": [f"runs/{n}/{Path(d).name}" for d in g["runs"]]} for n, g in report["groups"].items()
        }
    with open(out / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (n, cs) in enumerate(curves.items()):
        for w, _, r in cs:
            ax.plot(w, r, color=f"C{i}", alpha=0.35, lw=0.8)
        # from every run's first evaluation to the end of the shortest run: each run's return
        # as last evaluated by then (a step function), averaged over the group
        grid = np.linspace(max(w[0] for w, _, _ in cs), min(w[-1] for w, _, _ in cs), 200)
        held = [r[np.searchsorted(w, grid, side="right") - 1] for w, _, r in cs]
        ax.plot(grid, np.mean(held, 0), color=f"C{i}", lw=2.2, label=f"{n} (mean of {len(cs)})")
    ax.axvline(t_frac, color="grey", ls="--", lw=1, label=f"{args.fraction:.2g} of {args.target_group}'s wall time")
    ax.axhline(target, color="k", ls=":", lw=1, label=f"{args.target_group} final ({target:,.0f})")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("evaluation return")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves_wall.png", dpi=120)
    shown = {n: {k: v for k, v in g.items() if k != "runs"} for n, g in report["groups"].items()}
    print(json.dumps({**shown, "pairs": report["pairs"]}, indent=1))
    return report


if __name__ == "__main__":
    main()
