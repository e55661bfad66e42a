"""Which gait a HalfCheetah run learned: upright, or flipped onto its back. HalfCheetah's
returns are bimodal across seeds (~1,900 or ~4,000+ at 1M steps in bench/RESULTS.md); this
script tells the modes apart by the body's pitch, not by the return. For each run directory
it loads ``checkpoint.pt``, plays deterministic episodes (the mean action, as the
evaluation protocol does) in Gymnasium's HalfCheetah-v5 and reports the return, the
fraction of steps with the torso's pitch beyond 90 degrees (``|obs[1]| > pi/2``: on its
back) and the mean forward velocity (``obs[8]``).

    python -m bench.halfcheetah_gait RUN_DIR [RUN_DIR ...] [--episodes 1] [--out gait.json]

Not a test.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from trpl_fast.rl.evaluation import torch_mean_action
from trpl_fast.rl.train import load_policy

from ._output import emit

# the torso's pitch (rooty) and forward velocity (rootx velocity) in HalfCheetah-v5's
# observation with the default exclude_current_positions_from_observation=True
PITCH, FORWARD_VELOCITY = 1, 8
# a run counts as flipped when its torso is past 90 degrees on more than half of the steps
FLIPPED_FRACTION = 0.5


def gait(run_dir: str | Path, episodes: int = 1, seed: int = 12345) -> dict:
    """Return, fraction of steps on its back and mean forward velocity of ``run_dir``'s
    checkpointed deterministic policy over ``episodes`` episodes (seeds ``seed + k``)."""
    import gymnasium as gym

    cfg, policy, obs_norm = load_policy(Path(run_dir) / "checkpoint.pt")
    if not cfg.env_id.startswith("HalfCheetah"):
        raise ValueError(f"{run_dir}: a run of {cfg.env_id}, not of HalfCheetah")
    act = torch_mean_action(policy, obs_norm)
    env = gym.make(cfg.env_id)
    returns, on_back, velocity = [], [], []
    try:
        for k in range(episodes):
            obs, _ = env.reset(seed=seed + k)
            total, done = 0.0, False
            while not done:
                action = act(obs[None])[0]
                if cfg.clip_actions:
                    action = np.clip(action, env.action_space.low, env.action_space.high)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                on_back.append(abs(obs[PITCH]) > math.pi / 2)
                velocity.append(obs[FORWARD_VELOCITY])
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    fraction = float(np.mean(on_back))
    return {
        "run": str(run_dir),
        "seed": cfg.seed,
        "return": float(np.mean(returns)),
        "on_back_fraction": fraction,
        "flipped": fraction > FLIPPED_FRACTION,
        "forward_velocity": float(np.mean(velocity)),
    }


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories with a checkpoint.pt")
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error(f"--episodes must be >= 1, got {args.episodes}")
    missing = [r for r in args.runs if not (Path(r) / "checkpoint.pt").is_file()]
    if missing:
        p.error(f"no checkpoint.pt in {', '.join(missing)}")
    rows = [gait(r, args.episodes) for r in args.runs]
    emit({"runs": rows}, args.out)
    return rows


if __name__ == "__main__":
    main()
