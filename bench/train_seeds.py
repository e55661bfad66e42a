"""Many seeds in one process against one single-seed run (issue 11's targets: 8 seeds of the
KL paper preset at >= 4x the aggregate env steps/s of one run on the 2-core CPU; >= 32 seeds
at >= 30,000 aggregate env steps/s on a 16-core + GPU machine). Trains one single run and
one batched run of S seeds (``trpl-fast train --seeds``), same preset, evaluation on (the
paper protocol: 5 episodes after every iteration), in one process, and reports the median
per-iteration aggregate env steps/s of each (S x a seed's rate for the batch; the first,
compiling iteration is left out by the median) and their ratio.

    python -m bench.train_seeds --algo kl --seeds 8 --steps 12288 --compiled --out bench/results/train_seeds_cpu.json
    python -m bench.train_seeds --preset throughput --algo kl --seeds 32 --steps 65536 --device cuda --out gpu_out/train_seeds_cuda.json

Not a test.
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--preset", default="mujoco", choices=("mujoco", "throughput"))
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument(
        "--steps", type=int, default=12288, help="env steps per seed (default 12,288: 6 iterations of the paper preset)"
    )
    p.add_argument("--compiled", action="store_true", help="compile_update for both")
    p.add_argument("--device", default="cpu", help="the networks' device (cpu, cuda); the simulators run on the CPU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    cfg = preset(
        args.preset,
        args.algo,
        env_id=args.env,
        total_steps=args.steps,
        device=args.device,
        compile_update=args.compiled,
    )
    if args.steps < 3 * cfg.rollout_steps:
        p.error(
            f"--steps {args.steps}: at least 3 iterations of {cfg.rollout_steps} are needed "
            "(the first, compiling one is left out by the median)"
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
        "preset": args.preset,
        "seeds": args.seeds,
        "steps_per_seed": args.steps,
        "steps_per_iteration": cfg.rollout_steps,
        "compiled": args.compiled,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "single_steps_per_second": one,
        "batched_aggregate_steps_per_second": many,
        "ratio": many / one,
        # every iteration's rate, the first (compiling) one included
        "single_per_iteration": [r["steps_per_second"] for r in single],
        "batched_aggregate_per_iteration": [args.seeds * r["steps_per_second"] for r in batch[0]],
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
