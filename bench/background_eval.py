"""The paper protocol's evaluation in the training process against in a worker process beside
it (``eval_in_background``), one run and ``--seeds`` batched seeds, in one process each after
the other: seconds per iteration (steady state: from the second iteration's row to the
last, compilation excluded), aggregate env steps/s and the evaluation returns (which must
be identical).

    python -m bench.background_eval --out bench/results/background_eval/halfcheetah_kl.json

One torch thread; the worker and EnvPool's threads use the other core. Not a test.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from ._output import emit


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--algo", default="kl")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--iterations", type=int, default=8, help="of the single run (the batched seeds: 5)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    from trpl_fast.rl.config import preset
    from trpl_fast.rl.multiseed import train_seeds
    from trpl_fast.rl.train import train

    torch.set_num_threads(1)
    out: dict = {"env": args.env, "algo": args.algo, "torch": torch.__version__, "threads": 1, "runs": {}}
    for seeds in ([0], list(range(args.seeds))):
        n_it = args.iterations if len(seeds) == 1 else 5
        for background in (False, True):
            cfg = preset(
                "mujoco",
                args.algo,
                env_id=args.env,
                total_steps=2048 * n_it,
                device="cpu",
                compile_update=True,
                eval_in_background=background,
            )
            with tempfile.TemporaryDirectory() as d:
                if len(seeds) == 1:
                    rows = train(cfg, d, progress=False, log_tensorboard=False)
                else:
                    rows = train_seeds(cfg, seeds, d, progress=False, log_tensorboard=False)[0]
            wall = [r["wall_time"] for r in rows]
            per_iteration = (wall[-1] - wall[1]) / (len(wall) - 2)
            key = f"{len(seeds)} seed(s), background={background}"
            out["runs"][key] = {
                "s_per_iteration": per_iteration,
                "aggregate_steps_per_s": cfg.rollout_steps * len(seeds) / per_iteration,
                "eval_returns_seed0": [r["eval_return_mean"] for r in rows],
            }
            print(key, json.dumps(out["runs"][key]), flush=True)
    return emit(out, args.out)


if __name__ == "__main__":
    main()
