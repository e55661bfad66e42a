"""Stable-Baselines3 PPO (rl-zoo MuJoCo settings) under the paper's evaluation protocol, in
our run-directory format, so that ``bench.ablation_report`` / the experiment tables read
it beside our runs: after every iteration (2,048 steps and its update) 5 deterministic
episodes on a separate environment with the training normalizer's observation statistics
(frozen), start states new for every evaluation; ``DIR/seed<k>/config.json`` and
``progress.csv`` (``iteration``, ``global_step``, ``eval_return_mean``, ``wall_time``).

    python -m bench.sb3_protocol --env HalfCheetah-v5 --seeds 0 1 2 3 --steps 400000 --out runs/sb3_hc

Needs the ``bench`` extra (stable-baselines3). Not a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

EVAL_EPISODES = 5
N_STEPS = 2048
FIELDS = ("iteration", "global_step", "eval_return_mean", "kl_mean", "kl_max", "wall_time")


def run_seed(env_id: str, seed: int, steps: int, out: Path) -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    out.mkdir(parents=True, exist_ok=True)
    config = {
        "env_id": env_id,
        "algo": "sb3-ppo",
        "seed": seed,
        "total_steps": steps,
        "rollout_steps": N_STEPS,
        "contextual_cov": False,
        "peer": "stable-baselines3 PPO, rl-zoo MuJoCo settings (1 env, 2048 steps, 10 epochs of 64, lr 3e-4, "
        "VecNormalize obs+reward)",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    env = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed), gamma=0.99)
    eval_env = VecNormalize(
        make_vec_env(env_id, n_envs=EVAL_EPISODES, seed=seed), training=False, norm_reward=False, gamma=0.99
    )
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=N_STEPS,
        batch_size=64,
        n_epochs=10,
        learning_rate=3e-4,
        gamma=0.99,
        gae_lambda=0.95,
        clip_range=0.2,
        seed=seed,
        device="cpu",
        verbose=0,
    )
    t0 = time.perf_counter()
    f = open(out / "progress.csv", "w", newline="")
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()

    def evaluate(iteration: int) -> float:
        eval_env.obs_rms = env.obs_rms.copy()
        # new start states per evaluation, never the training env's seed stream
        eval_env.seed((1 << 28) + (seed * 100_003 + iteration) * EVAL_EPISODES)
        obs = eval_env.reset()
        returns, done = np.zeros(EVAL_EPISODES), np.zeros(EVAL_EPISODES, dtype=bool)
        while not done.all():
            action, _ = model.predict(obs, deterministic=True)
            obs, rew, dones, _ = eval_env.step(action)
            returns += np.where(done, 0.0, rew)  # eval_env does not normalize rewards
            done |= dones
        return float(returns.mean())

    def log(iteration: int) -> None:
        writer.writerow(
            {
                "iteration": iteration,
                "global_step": (iteration + 1) * N_STEPS,
                "eval_return_mean": evaluate(iteration),
                "kl_mean": math.nan,
                "kl_max": math.nan,
                "wall_time": time.perf_counter() - t0,
            }
        )
        f.flush()

    class AfterUpdate(BaseCallback):
        """``_on_rollout_start`` comes after the previous iteration's update."""

        def __init__(self):
            super().__init__()
            self.iteration = -1

        def _on_rollout_start(self) -> None:
            if self.iteration >= 0:
                log(self.iteration)
            self.iteration += 1

        def _on_step(self) -> bool:
            return True

    cb = AfterUpdate()
    model.learn(total_timesteps=steps, callback=cb)
    log(cb.iteration)  # the last iteration's update
    f.close()
    env.close()
    eval_env.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for s in args.seeds:
        run_seed(args.env, s, args.steps, Path(args.out) / f"seed{s}")
        print(f"seed {s} done", flush=True)


if __name__ == "__main__":
    main()
