"""Training configuration and the hyperparameter presets of the paper's appendix D.

Table 2 ("mujoco"; Hopper, Walker2d, HalfCheetah, Ant) and table 3 ("humanoid"). Where a
cell differs between the projections and the baselines the preset function picks by
algorithm. ``mean_bound`` follows each layer's own convention (MATH.md): Frobenius / W2
bound the Mahalanobis distance, KL half of it, which is why KL's value is half.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ALGOS = ("kl", "w2", "frob", "ppo", "ppo-m", "trpo")
PROJECTIONS = ("kl", "w2", "frob")
PRESETS = ("mujoco", "humanoid", "throughput", "reacher")


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.json`` in the run directory."""

    env_id: str = "HalfCheetah-v5"
    algo: str = "kl"                   # kl | w2 | frob | ppo | ppo-m | trpo
    total_steps: int = 1_000_000       # environment steps
    seed: int = 0
    num_envs: int = 1
    rollout_steps: int = 2048          # per iteration, over all envs
    gamma: float = 0.99
    gae_lambda: float = 0.95
    # the time limit ends the task (time is observed, e.g. the sparse Reacher): no bootstrap
    # from the final state (Pardo et al. 2018); False: truncation bootstraps (MuJoCo locomotion)
    time_limit_terminal: bool = False
    # policy update
    epochs: int = 20
    minibatch_size: int = 32
    lr: float = 5e-5
    lr_decay: bool = False
    max_grad_norm: float | None = None
    # value function (trained by its own optimizer and epochs)
    epochs_vf: int = 10
    lr_vf: float = 4.5e-4
    vf_clip: float | None = None
    # trust-region layer (kl / w2 / frob)
    mean_bound: float = 0.015
    cov_bound: float = 0.001
    regression_weight: float = 8.0     # alpha of paper Eq. 12
    projection: bool = True            # False bypasses the layer (throughput baseline only: no trust region)
    entropy_control: str | None = None  # None | ineq | eq
    target_entropy: float = 0.0        # per action dimension (kappa)
    temperature: float = 0.5
    # ppo
    ratio_clip: float = 0.2
    # trpo
    trpo_max_kl: float = 0.01
    # normalization
    normalize_obs: bool = True
    obs_clip: float | None = None
    normalize_rewards: bool = False
    reward_clip: float | None = None
    # networks
    cov_form: str = "diag"
    contextual_cov: bool = False
    hidden: tuple[int, ...] = (64, 64)
    hidden_vf: tuple[int, ...] = (64, 64)
    init_std: float = 1.0
    device: str = "auto"
    env_backend: str = "auto"          # auto (EnvPool where it has the task) | envpool | gymnasium
    eval_episodes: int = 5
    checkpoint_every: int = 10         # iterations
    # also checkpoint after this much wall time: with the paper presets 10 iterations are
    # 20,480 to 163,840 steps, too much to lose to a SIGKILL early in a run
    checkpoint_seconds: float = 60.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        data = dict(data)
        for key in ("hidden", "hidden_vf"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def preset(name: str, algo: str, **overrides) -> TrainConfig:
    """The paper's hyperparameters for ``algo`` (table 2: ``mujoco``; table 3: ``humanoid``)
    or the ``throughput`` variant for a many-core GPU machine (64 envs, 16,384 steps per
    iteration, large minibatches, few epochs), or ``reacher`` (table 4, the 5-link sparse
    Reacher), with ``overrides`` applied last."""
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    proj = algo in PROJECTIONS
    if name in ("mujoco", "throughput"):
        cfg = TrainConfig(
            algo=algo, rollout_steps=2048, epochs=20 if proj else 10, minibatch_size=32 if proj else 64,
            lr=5e-5 if proj else 3e-4, lr_vf=4.5e-4 if proj else 2.5e-4,
            mean_bound={"frob": 0.03, "w2": 0.03, "kl": 0.015}.get(algo, 0.03), cov_bound=0.001,
            temperature=0.5, normalize_rewards=(algo == "ppo"),
            obs_clip=10.0 if algo == "ppo" else None, reward_clip=10.0 if algo == "ppo" else None,
            vf_clip=0.2 if algo == "ppo" else None, max_grad_norm=0.5 if algo == "ppo" else None,
            lr_decay=(algo == "ppo"))
        if name == "throughput":
            cfg = dataclasses.replace(cfg, num_envs=64, rollout_steps=16384, epochs=5 if proj else 4,
                                      minibatch_size=4096, epochs_vf=5,
                                      lr=3e-4 if proj else 3e-4)
    elif name == "reacher":  # table 4: trpl_fast/ReacherSparse5-v0 (paper Figure 2, right)
        contextual = overrides.get("contextual_cov", False)
        cfg = TrainConfig(
            algo=algo, env_id="trpl_fast/ReacherSparse5-v0", num_envs=64, rollout_steps=16384, epochs=20,
            epochs_vf=10, minibatch_size=256 if proj else 512, lr=3e-4 if proj else 1e-4,
            lr_vf=4.5e-4 if proj else 1e-4,
            mean_bound=0.015 if algo == "kl" else 0.03,
            # KL: 5e-5 with a global covariance, 1e-3 with a contextual one (table 4)
            cov_bound={"frob": 5e-5, "w2": 1e-3, "kl": 1e-3 if contextual else 5e-5}.get(algo, 1e-3),
            normalize_rewards=(algo == "ppo"), obs_clip=10.0 if algo == "ppo" else None,
            reward_clip=10.0 if algo == "ppo" else None, vf_clip=0.2 if algo == "ppo" else None,
            max_grad_norm=0.5 if algo == "ppo" else None, lr_decay=(algo == "ppo"),
            time_limit_terminal=True, eval_episodes=64, checkpoint_every=5)
    else:  # humanoid, table 3
        cfg = TrainConfig(
            algo=algo, env_id="Humanoid-v5", rollout_steps=16384, epochs=10,
            minibatch_size=256 if proj else 512, lr=1e-4, lr_vf=4.5e-4 if proj else 1e-4,
            mean_bound={"frob": 0.05, "w2": 0.05, "kl": 0.015}.get(algo, 0.05),
            cov_bound={"frob": 1e-4, "w2": 0.01, "kl": 1e-4}.get(algo, 1e-4),
            temperature=0.2,
            normalize_rewards=(algo == "ppo"), obs_clip=10.0 if algo == "ppo" else None,
            reward_clip=10.0 if algo == "ppo" else None, vf_clip=0.2 if algo == "ppo" else None,
            max_grad_norm=0.5 if algo == "ppo" else None, lr_decay=(algo == "ppo"))
    return dataclasses.replace(cfg, **overrides)
