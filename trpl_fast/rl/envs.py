"""Vectorized environments: EnvPool for the MuJoCo tasks it has, a Gymnasium vector env for
any other Gymnasium id. Both are used with *next-step* autoreset: the step that ends an
episode returns the true final observation (so truncated episodes bootstrap from it), and
the following step resets that sub-environment, ignores its action and returns the reset
observation with reward 0 -- the training loop masks that step out.
"""

from __future__ import annotations

import numpy as np

ENVPOOL_TASKS = ("HalfCheetah", "Hopper", "Walker2d", "Ant", "Humanoid", "Reacher",
                 "Swimmer", "InvertedPendulum", "InvertedDoublePendulum", "Pusher", "HumanoidStandup")


class VecEnv:
    """Uniform interface: ``reset() -> obs``, ``step(actions) -> (obs, rewards, terminated,
    truncated)`` as float64 / bool numpy arrays of leading size ``num_envs``."""

    def __init__(self, env, num_envs: int, backend: str):
        self.env, self.num_envs, self.backend = env, num_envs, backend
        space = env.action_space if backend == "envpool" else env.single_action_space
        obs_space = env.observation_space if backend == "envpool" else env.single_observation_space
        self.action_low = np.asarray(space.low, dtype=np.float64)
        self.action_high = np.asarray(space.high, dtype=np.float64)
        self.action_dtype = space.dtype
        self.act_dim = int(np.prod(space.shape))
        self.obs_dim = int(np.prod(obs_space.shape))

    def reset(self) -> np.ndarray:
        obs, _ = self.env.reset()
        return np.asarray(obs, dtype=np.float64).reshape(self.num_envs, -1)

    def step(self, actions: np.ndarray):
        actions = np.clip(actions, self.action_low, self.action_high).astype(self.action_dtype)
        obs, rew, term, trunc, _ = self.env.step(actions)
        return (np.asarray(obs, dtype=np.float64).reshape(self.num_envs, -1), np.asarray(rew, dtype=np.float64),
                np.asarray(term, dtype=bool), np.asarray(trunc, dtype=bool))

    def close(self) -> None:
        self.env.close()


def _check_box(space, env_id: str) -> None:
    import gymnasium as gym

    if not isinstance(space, gym.spaces.Box):
        raise ValueError(f"{env_id}: the action space must be continuous (gymnasium.spaces.Box) for a "
                         f"Gaussian policy, got {type(space).__name__}")


def make_vec_env(env_id: str, num_envs: int, seed: int, backend: str = "auto") -> VecEnv:
    """``backend``: ``auto`` (EnvPool when it has the task and is installed, else
    Gymnasium), ``envpool`` or ``gymnasium``."""
    import gymnasium as gym

    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    name = env_id.split("-")[0]
    if backend in ("auto", "envpool") and name in ENVPOOL_TASKS:
        try:
            import envpool

            env = envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, seed=seed)
            _check_box(env.action_space, env_id)
            return VecEnv(env, num_envs, "envpool")
        except ImportError:
            if backend == "envpool":
                raise
        except Exception as exc:  # unknown id in EnvPool: fall back below
            if backend == "envpool":
                raise ValueError(f"EnvPool cannot make {env_id!r}: {exc}") from exc
    if env_id not in gym.registry:
        raise ValueError(f"unknown environment id {env_id!r} (neither EnvPool nor Gymnasium has it)")
    env = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(num_envs)],
                                   autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    _check_box(env.single_action_space, env_id)
    env.reset(seed=seed)
    return VecEnv(env, num_envs, "gymnasium")
