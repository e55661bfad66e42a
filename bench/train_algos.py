"""Train each algorithm on one environment and print its final deterministic return and
wall-clock steps/s, plus the same loop with the projection layer bypassed (the layer's
overhead). Not a test.

    python -m bench.train_algos --env HalfCheetah-v5 --steps 100000 --algos kl ppo ppo-m
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from trpl_fast.rl.config import ALGOS, PROJECTIONS, preset
from trpl_fast.rl.train import train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--algos", nargs="+", default=list(ALGOS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="mujoco")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    runs = [(a, True) for a in args.algos] + [(a, False) for a in args.algos if a in PROJECTIONS][:1]
    results = []
    for algo, projection in runs:
        cfg = preset(
            args.preset,
            algo,
            env_id=args.env,
            total_steps=args.steps,
            seed=args.seed,
            device=args.device,
            projection=projection,
        )
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            rows = train(cfg, d, progress=False, log_tensorboard=False)
            wall = time.perf_counter() - t0
        res = {
            "algo": algo,
            "projection": projection,
            "env": args.env,
            "steps": rows[-1]["global_step"],
            "eval_return": rows[-1]["eval_return_mean"],
            "steps_per_second": rows[-1]["global_step"] / wall,
            "kl_max": max(r.get("kl_max", float("nan")) for r in rows),
        }
        results.append(res)
        label = algo if projection else f"{algo} (layer bypassed)"
        print(
            f"{label:22s} {res['steps']:>9d} steps  eval return {res['eval_return']:9.1f}  "
            f"{res['steps_per_second']:7.0f} steps/s  max KL {res['kl_max']:.4f}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
