"""Does a change to the training loop change what is learned? Train six tiny deterministic
configs (Hopper-v5, Gymnasium backend, CPU, 2 iterations of 512 steps: kl, ppo, trpo, w2 with
a contextual full covariance, frob, kl with batch-normalized advantages) and save their final
parameters and logged rows; compare two such snapshots exactly.

    python -m bench.loop_equivalence save /tmp/before      # on the old code
    python -m bench.loop_equivalence save /tmp/after       # on the new code
    python -m bench.loop_equivalence compare /tmp/before /tmp/after
"""

from __future__ import annotations

import argparse
import csv
import tempfile

import torch

from trpl_fast.rl.config import preset
from trpl_fast.rl.runlog import TIMING_COLUMNS
from trpl_fast.rl.train import train

CASES = {
    "kl": ("kl", {}),
    "ppo": ("ppo", {}),
    "trpo": ("trpo", {}),
    "w2-full-contextual": ("w2", {"cov_form": "full", "contextual_cov": True}),
    "frob": ("frob", {}),
    "kl-batch-advantages": ("kl", {"advantage_normalization": "batch"}),
}


def save(path: str) -> None:
    torch.set_num_threads(1)
    out = {}
    for name, (algo, kw) in CASES.items():
        cfg = preset(
            "mujoco",
            algo,
            env_id="Hopper-v5",
            total_steps=1024,
            rollout_steps=512,
            num_envs=2,
            epochs=2,
            epochs_vf=2,
            minibatch_size=64,
            eval_episodes=2,
            device="cpu",
            env_backend="gymnasium",
            **kw,
        )
        with tempfile.TemporaryDirectory() as d:
            train(cfg, d, progress=False, log_tensorboard=False)
            ckpt = torch.load(f"{d}/checkpoint.pt", weights_only=False)
            with open(f"{d}/progress.csv") as f:
                rows = [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]
        out[name] = {"policy": ckpt["policy"], "value": ckpt["value"], "rows": rows}
    torch.save(out, path)
    print(f"saved {len(out)} runs to {path}")


def compare(a_path: str, b_path: str) -> bool:
    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    same_all = True
    for name in a:
        diff = max(
            (a[name][k][p] - b[name][k][p]).abs().max().item()
            for k in ("policy", "value")
            for p in a[name][k]
            if a[name][k][p].numel()
        )
        rows = a[name]["rows"] == b[name]["rows"]
        same_all &= diff == 0.0 and rows
        print(f"{name:22s} max parameter difference {diff:.3g}, logged rows identical: {rows}")
    print("bit-for-bit identical" if same_all else "DIFFERENT")
    return same_all


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save")
    s.add_argument("path")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args(argv)
    if args.cmd == "save":
        save(args.path)
    else:
        raise SystemExit(0 if compare(args.a, args.b) else 1)


if __name__ == "__main__":
    main()
