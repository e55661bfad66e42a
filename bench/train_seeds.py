"""Many seeds in one process against one single-seed run (issue 11's target: 8 seeds of the
KL paper preset at >= 4x the aggregate env steps/s of one run). Trains one single run and
one batched run of S seeds (``trpl-fast train --seeds``), same preset, evaluation on (the
paper protocol: 5 episodes after every iteration), one torch thread, in one process, and
reports the median per-iteration aggregate env steps/s of each (S x a seed's rate for the
batch; the first, compiling iteration is left out by the median) and their ratio.

    python -m bench.train_seeds --algo kl --seeds 8 --steps 12288 --compiled --out bench/results/train_seeds_cpu.json

Not a test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile

import torch

from trpl_fast.rl.config import preset
from trpl_fast.rl.multiseed import train_seeds
from trpl_fast.rl.train import train

from ._output import emit


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--algo", default="kl")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=12288, help="env steps per seed (default 12,288: 6 iterations)")
    p.add_argument("--compiled", action="store_true", help="compile_update for both")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = preset(
        "mujoco", args.algo, env_id=args.env, total_steps=args.steps, device="cpu", compile_update=args.compiled
    )
    with tempfile.TemporaryDirectory() as d:
        single = train(cfg, f"{d}/single", progress=False, log_tensorboard=False)
        batch = train_seeds(cfg, list(range(args.seeds)), f"{d}/batch", progress=False, log_tensorboard=False)
    one = statistics.median(r["steps_per_second"] for r in single)
    # every seed's row of an iteration logs the batch's per-seed rate
    many = args.seeds * statistics.median(r["steps_per_second"] for r in batch[0])
    result = {
        "env": args.env,
        "algo": args.algo,
        "seeds": args.seeds,
        "steps_per_seed": args.steps,
        "compiled": args.compiled,
        "threads": 1,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "single_steps_per_second": one,
        "batched_aggregate_steps_per_second": many,
        "ratio": many / one,
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
