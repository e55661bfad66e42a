"""Training throughput against the peer users run today: Stable-Baselines3 PPO with its
MuJoCo settings (1 env, 2,048 steps per iteration, 10 epochs of minibatches of 64, lr 3e-4,
observations and rewards normalized by ``VecNormalize``) beside our ``ppo``, ``kl`` and
``kl`` with the layer bypassed (the same loop without the projection: the layer's share),
on the same env and step budget, one torch thread each, in one process.

Contenders take turns (round-robin, ``--rounds`` times) so that a change in machine load
hits all of them alike. Per contender: the median over rounds of the median per-iteration
env steps/s (an iteration = collect + update; our loop's evaluation is switched off, SB3
does not evaluate either), and the ratios against SB3 measured in the same run.

    python -m bench.train_peer --env HalfCheetah-v5 --steps 16384 --rounds 3 --out bench/results/train_peer.json

Needs the ``bench`` extra (``pip install -e .[bench]``: stable-baselines3). Not a test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from ._output import emit


def sb3_ppo(env_id: str, steps: int, seed: int) -> list[float]:
    """Per-iteration env steps/s of SB3 PPO (rl-zoo MuJoCo settings) on Gymnasium's env."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    n_steps = 2048
    starts: list[float] = []

    class RolloutClock(BaseCallback):
        def _on_rollout_start(self) -> None:
            starts.append(time.perf_counter())

        def _on_step(self) -> bool:
            return True

    env = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed), gamma=0.99)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=n_steps,
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
    model.learn(total_timesteps=steps, callback=RolloutClock())
    starts.append(time.perf_counter())  # the end of the last iteration's update
    env.close()
    return [n_steps / (b - a) for a, b in zip(starts, starts[1:])]


def ours(env_id: str, steps: int, seed: int, algo: str, projection: bool = True, compiled: bool = False) -> list[float]:
    """Per-iteration env steps/s of our loop (paper preset, EnvPool, evaluation off;
    ``compiled``: ``compile_update``, whose first iteration pays the compilation -- the
    median over iterations leaves it out)."""
    from trpl_fast.rl.config import preset
    from trpl_fast.rl.train import train

    cfg = preset(
        "mujoco",
        algo,
        env_id=env_id,
        total_steps=steps,
        seed=seed,
        device="cpu",
        projection=projection,
        eval_episodes=0,
        compile_update=compiled,
    )
    with tempfile.TemporaryDirectory() as d:
        rows = train(cfg, d, progress=False, log_tensorboard=False)
    return [r["steps_per_second"] for r in rows]


CONTENDERS = {
    "sb3-ppo": lambda env, steps, seed: sb3_ppo(env, steps, seed),
    "ppo": lambda env, steps, seed: ours(env, steps, seed, "ppo"),
    "kl": lambda env, steps, seed: ours(env, steps, seed, "kl"),
    "kl-bypassed": lambda env, steps, seed: ours(env, steps, seed, "kl", projection=False),
    "ppo-compiled": lambda env, steps, seed: ours(env, steps, seed, "ppo", compiled=True),
    "kl-compiled": lambda env, steps, seed: ours(env, steps, seed, "kl", compiled=True),
    "kl-bypassed-compiled": lambda env, steps, seed: ours(env, steps, seed, "kl", projection=False, compiled=True),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--steps", type=int, default=16384, help="env steps per contender and round (default 16,384)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    per_round: dict[str, list[float]] = {c: [] for c in args.contenders}
    for r in range(args.rounds):
        for name in args.contenders:
            rates = CONTENDERS[name](args.env, args.steps, args.seed + r)
            per_round[name].append(statistics.median(rates))
            print(
                f"round {r}: {name:12s} median {per_round[name][-1]:7.0f} steps/s over {len(rates)} iterations",
                flush=True,
            )
    result = {
        "env": args.env,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": 1,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "steps_per_second": {c: statistics.median(v) for c, v in per_round.items()},
        "per_round": per_round,
    }
    rates = result["steps_per_second"]
    if "sb3-ppo" in rates:
        result["ratio_vs_sb3"] = {c: rates[c] / rates["sb3-ppo"] for c in rates}
    if "kl" in rates and "kl-bypassed" in rates:
        result["kl_vs_bypassed"] = rates["kl"] / rates["kl-bypassed"]
    if "kl-compiled" in rates and "kl-bypassed-compiled" in rates:
        result["kl_vs_bypassed_compiled"] = rates["kl-compiled"] / rates["kl-bypassed-compiled"]
    return emit(result, args.out, shown={k: v for k, v in result.items() if k != "per_round"})


if __name__ == "__main__":
    main()
