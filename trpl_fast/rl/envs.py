"""Vectorized environments: EnvPool for the MuJoCo tasks it has, a Gymnasium vector env for
any other Gymnasium id. Both are used with *next-step* autoreset: the step that ends an
episode returns the true final observation (so truncated episodes bootstrap from it), and
the following step resets that sub-environment, ignores its action and returns the reset
observation with reward 0 -- the training loop masks that step out.
"""

from __future__ import annotations

import copy
import pickle
import zlib

import numpy as np

ENVPOOL_TASKS = (
    "HalfCheetah",
    "Hopper",
    "Walker2d",
    "Ant",
    "Humanoid",
    "Reacher",
    "Swimmer",
    "InvertedPendulum",
    "InvertedDoublePendulum",
    "Pusher",
    "HumanoidStandup",
)


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

    def step(self, actions: np.ndarray, clip: bool = True):
        """``clip``: clip the actions to the action box first; without it they go to the
        simulator as they are (MuJoCo clamps the control itself; the control cost sees them)."""
        if clip:
            actions = np.clip(actions, self.action_low, self.action_high)
        actions = actions.astype(self.action_dtype)
        obs, rew, term, trunc, _ = self.env.step(actions)
        return (
            np.asarray(obs, dtype=np.float64).reshape(self.num_envs, -1),
            np.asarray(rew, dtype=np.float64),
            np.asarray(term, dtype=bool),
            np.asarray(trunc, dtype=bool),
        )

    def close(self) -> None:
        self.env.close()

    @property
    def can_save_state(self) -> bool:
        return self.backend == "gymnasium" and (hasattr(self.env, "envs") or _has_own_state(self.env))

    def get_state(self) -> dict:
        """Everything the sub-environments will compute from, for an exact resume: per
        wrapper layer its plain attributes (step counters, flags, numpy state), the
        environment's random generator, and for MuJoCo environments the whole ``MjData``
        (derived quantities included: some rewards read positions left by the previous step).
        Gymnasium backend only: EnvPool does not expose its simulators' state."""
        if not self.can_save_state:
            raise NotImplementedError(f"the {self.backend} backend cannot save its environments' state")
        if _has_own_state(self.env):  # a batched env (e.g. the sparse Reacher) saves itself
            return {"own": self.env.get_state()}
        return {
            "vector": _plain_attrs(self.env),
            "envs": [[_layer_state(layer) for layer in _layers(sub)] for sub in self.env.envs],
        }

    def set_state(self, state: dict) -> None:
        """Restore :meth:`get_state`'s result into environments made with the same id and count."""
        if not self.can_save_state:
            raise NotImplementedError(f"the {self.backend} backend cannot restore its environments' state")
        if "own" in state:
            self.env.set_state(state["own"])
            return
        if len(state["envs"]) != self.num_envs:
            raise ValueError(
                f"environment state holds {len(state['envs'])} environments, this vector env has {self.num_envs}"
            )
        _set_plain_attrs(self.env, state["vector"])
        for sub, layers in zip(self.env.envs, state["envs"]):
            own = _layers(sub)
            if len(own) != len(layers):
                raise ValueError("environment state comes from a different wrapper stack")
            for layer, saved in zip(own, layers):
                _set_layer_state(layer, saved)


class SerialVectorEnv:
    """Gymnasium environments stepped one after another in the calling thread with
    next-step autoreset: what ``gymnasium.vector.SyncVectorEnv(autoreset_mode=NEXT_STEP)``
    computes (the same seeds, observations, rewards and flags, bit for bit; its autoreset
    flags under the same attribute name), without the per-step info dictionaries and copies
    that cost ~15 us of a single HalfCheetah's ~40 us step. ``reset(seed=...)``: ``None``,
    an int (sub-env ``i`` gets ``seed + i``) or a list, as Gymnasium's."""

    def __init__(self, env_fns):
        self.envs = [fn() for fn in env_fns]
        self.num_envs = len(self.envs)
        self.single_action_space = self.envs[0].action_space
        self.single_observation_space = self.envs[0].observation_space
        self._autoreset_envs = np.zeros(self.num_envs, dtype=np.bool_)

    def reset(self, *, seed: int | list[int] | None = None):
        n = self.num_envs
        seeds = [None] * n if seed is None else [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} environments")
        self._autoreset_envs = np.zeros(n, dtype=np.bool_)
        return np.stack([env.reset(seed=s)[0] for env, s in zip(self.envs, seeds)]), {}

    def step(self, actions):
        n = self.num_envs
        rewards = np.zeros(n, dtype=np.float64)
        terminated, truncated = np.zeros(n, dtype=np.bool_), np.zeros(n, dtype=np.bool_)
        obs = []
        for i, env in enumerate(self.envs):
            if self._autoreset_envs[i]:  # the step after an episode's end only resets
                o, _ = env.reset()
            else:
                o, rewards[i], terminated[i], truncated[i], _ = env.step(actions[i])
            obs.append(o)
        self._autoreset_envs = terminated | truncated
        return np.stack(obs), rewards, terminated, truncated, {}

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _has_own_state(env) -> bool:
    """The class itself defines ``get_state`` / ``set_state`` (wrappers do not forward them)."""
    return callable(getattr(type(env), "get_state", None)) and callable(getattr(type(env), "set_state", None))


def _is_plain(value) -> bool:
    if isinstance(value, (np.ndarray, np.generic, int, float, bool, str, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _plain_attrs(obj) -> dict:
    return {k: copy.deepcopy(v) for k, v in vars(obj).items() if _is_plain(v)}


def _set_plain_attrs(obj, attrs: dict) -> None:
    for k, v in attrs.items():
        setattr(obj, k, copy.deepcopy(v))


def _layers(env) -> list:
    """The wrapper chain from the outermost wrapper down to the unwrapped environment."""
    import gymnasium as gym

    out = [env]
    while isinstance(out[-1], gym.Wrapper):
        out.append(out[-1].env)
    return out


def _layer_state(layer) -> dict:
    state = {"attrs": _plain_attrs(layer)}
    if _has_own_state(layer):
        state["own"] = layer.get_state()
    rng = vars(layer).get("_np_random")
    if isinstance(rng, np.random.Generator):
        state["np_random"] = copy.deepcopy(rng)
    data = vars(layer).get("data")
    if data is not None and type(data).__name__ == "MjData":
        # compressed: the data arena is mostly zeros (700 kB raw per env, a few kB packed)
        state["mjdata"] = zlib.compress(pickle.dumps(data), 1)
    return state


def _set_layer_state(layer, state: dict) -> None:
    _set_plain_attrs(layer, state["attrs"])
    if "own" in state:
        layer.set_state(state["own"])
    if "np_random" in state:
        layer._np_random = copy.deepcopy(state["np_random"])
    if "mjdata" in state:
        import mujoco

        mujoco.mj_copyData(layer.data, layer.model, pickle.loads(zlib.decompress(state["mjdata"])))


def _check_box(space, env_id: str) -> None:
    import gymnasium as gym

    if not isinstance(space, gym.spaces.Box):
        raise ValueError(
            f"{env_id}: the action space must be continuous (gymnasium.spaces.Box) for a "
            f"Gaussian policy, got {type(space).__name__}"
        )


def envpool_pool(env_id: str, seeds: list[int], backend: str = "auto") -> VecEnv | None:
    """One EnvPool stepping ``len(seeds)`` sub-environments, sub-env ``i`` seeded
    ``seeds[i]`` (several runs' environments in one pool, each seeded as its own); ``None``
    where that is not EnvPool: the Gymnasium backend, a task EnvPool lacks, EnvPool not
    installed. Nothing is built then."""
    import importlib.util

    if (
        backend == "gymnasium"
        or env_id.split("-")[0] not in ENVPOOL_TASKS
        or importlib.util.find_spec("envpool") is None
    ):
        return None
    return make_vec_env(env_id, len(seeds), seeds, backend="envpool")


def make_vec_env(env_id: str, num_envs: int, seed: int | list[int], backend: str = "auto") -> VecEnv:
    """``backend``: ``auto``, ``envpool`` or ``gymnasium``. ``auto`` is EnvPool when it has
    the task, is installed and steps more than one environment, else Gymnasium: a single
    environment gains nothing from EnvPool's worker threads and pays their hand-off on
    every step (HalfCheetah-v5 on this project's 2-core VM: 92 us a step through EnvPool,
    41 us in Gymnasium's vector env in the calling thread; even at 2 environments, 79 vs
    76 us; EnvPool ahead from there, 137 vs 182 us for 5).

    ``seed``: sub-environment ``i`` gets ``seed + i``; or a list, one seed per
    sub-environment (several runs' environments in one pool, each seeded as its own)."""
    import gymnasium as gym

    seed = int(seed) if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    if isinstance(seed, list) and len(seed) != num_envs:
        raise ValueError(f"{len(seed)} seeds for {num_envs} environments")

    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if backend not in ("auto", "envpool", "gymnasium"):
        raise ValueError(f"env backend must be 'auto', 'envpool' or 'gymnasium', got {backend!r}")
    name = env_id.split("-")[0]
    if backend == "envpool" and name not in ENVPOOL_TASKS:
        # falling back to Gymnasium here would leave config.json saying envpool
        raise ValueError(
            f"--env-backend envpool: EnvPool has no {env_id!r} (it has the MuJoCo tasks "
            f"{', '.join(ENVPOOL_TASKS)}); use --env-backend gymnasium or auto"
        )
    if (backend == "envpool" or (backend == "auto" and num_envs > 1)) and name in ENVPOOL_TASKS:
        try:
            import envpool

            env = envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, seed=seed)
            _check_box(env.action_space, env_id)
            return VecEnv(env, num_envs, "envpool")
        except ImportError as exc:
            if backend == "envpool":
                raise ValueError(
                    "--env-backend envpool: EnvPool is not installed (pip install envpool, "
                    "or use --env-backend gymnasium)"
                ) from exc
        except Exception as exc:  # unknown id in EnvPool: fall back below
            if backend == "envpool":
                raise ValueError(f"EnvPool cannot make {env_id!r}: {exc}") from exc
    if env_id not in gym.registry:
        raise ValueError(f"unknown environment id {env_id!r} (neither EnvPool nor Gymnasium has it)")
    if gym.spec(env_id).vector_entry_point is not None:
        # a batched implementation (e.g. trpl_fast/ReacherSparse5-v0): must autoreset next-step
        env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point")
        mode = env.metadata.get("autoreset_mode")
        if mode != gym.vector.AutoresetMode.NEXT_STEP:
            env.close()
            raise ValueError(f"{env_id}: its vector env autoresets with {mode}, the training loop needs NEXT_STEP")
    else:
        env = SerialVectorEnv([lambda: gym.make(env_id) for _ in range(num_envs)])
    _check_box(env.single_action_space, env_id)
    env.reset(seed=seed)
    return VecEnv(env, num_envs, "gymnasium")
