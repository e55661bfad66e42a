"""The 5-link sparse-reward Reacher of the paper's "Contextual Covariances" experiment
(Figure 2, right), as a Gymnasium environment and a batched vector environment.

Registered as ``trpl_fast/ReacherSparse5-v0`` by ``import trpl_fast`` (when Gymnasium is
installed): ``gymnasium.make("trpl_fast/ReacherSparse5-v0")`` gives one arm,
``gymnasium.make_vec(..., num_envs=N)`` the batched :class:`ReacherSparse5VecEnv` (one
``MjModel``, ``N`` ``MjData``, observations and rewards computed for all arms at once).

The task: a planar arm of 5 hinge links of length 0.1 (MuJoCo Reacher's joints, motors and
integrator, extended to 5 links; timestep 0.01, frame skip 2), 200 steps per episode, ending
by truncation. The target is drawn uniformly in the reachable disc (radius 0.5); the arm
starts stretched along x with joint noise U(-0.1, 0.1) and velocity noise U(-0.005, 0.005).

Reward of step ``t`` (1-based), action ``a`` clipped to [-1, 1]^5:
``-ctrl_cost_weight * sum(a^2)``, and at ``t = 200`` additionally
``-dist_weight * |fingertip - target| - vel_weight * sum(qvel^2)`` (reach the target and stop
there; defaults 1, 1 and 10). Zero actions earn zero reward before the last step.

Observation (20 float64 values, ``OBS_LAYOUT``):

====== =====================================================
0:5    cos of the 5 joint angles
5:10   sin of the 5 joint angles
10:12  target x, y
12:17  the 5 joint velocities
17:19  fingertip - target (x, y)
19     time: steps taken in the episode / 200, in [0, 1]
====== =====================================================
"""

from __future__ import annotations

import numpy as np

N_LINKS = 5
LINK_LENGTH = 0.1
EPISODE_STEPS = 200
FRAME_SKIP = 2
OBS_LAYOUT = {
    "cos_q": slice(0, 5),
    "sin_q": slice(5, 10),
    "target": slice(10, 12),
    "qvel": slice(12, 17),
    "fingertip_to_target": slice(17, 19),
    "time": slice(19, 20),
}
OBS_DIM = 20


def reacher_xml(n_links: int = N_LINKS, link_length: float = LINK_LENGTH) -> str:
    """MJCF of the planar arm: Gymnasium Reacher's joint / motor / integrator settings with
    ``n_links`` capsule links; the target is a mocap body (per-``MjData`` position)."""
    bodies, close = [], []
    for i in range(n_links):
        pos = "0 0 .01" if i == 0 else f"{link_length} 0 0"
        limit = 'limited="false"' if i == 0 else 'limited="true" range="-3.0 3.0"'
        bodies.append(
            f'<body name="link{i}" pos="{pos}">'
            f'<joint name="joint{i}" type="hinge" axis="0 0 1" pos="0 0 0" {limit}/>'
            f'<geom type="capsule" fromto="0 0 0 {link_length} 0 0" size=".01" rgba="0 .4 .6 1"/>'
        )
        close.append("</body>")
    tip = f'<body name="fingertip" pos="{link_length} 0 0"><geom type="sphere" size=".01" rgba="0 .8 .6 1"/></body>'
    motors = "".join(
        f'<motor joint="joint{i}" ctrllimited="true" ctrlrange="-1 1" gear="200"/>' for i in range(n_links)
    )
    return f"""<mujoco model="reacher_sparse_{n_links}">
  <compiler angle="radian" inertiafromgeom="true"/>
  <default><joint armature="1" damping="1"/><geom contype="0" conaffinity="0" friction="1 .1 .1" density="1000"/></default>
  <option gravity="0 0 -9.81" integrator="RK4" timestep="0.01"/>
  <worldbody>
    <geom name="ground" type="plane" pos="0 0 0" size="1 1 10" rgba=".9 .9 .9 1"/>
    <geom name="root" type="cylinder" fromto="0 0 0 0 0 .02" size=".011" rgba="0 .4 .6 1"/>
    {"".join(bodies)}{tip}{"".join(close)}
    <body name="target" mocap="true" pos=".1 -.1 .01"><geom type="sphere" size=".009" rgba=".9 .2 .2 1"/></body>
  </worldbody>
  <actuator>{motors}</actuator>
</mujoco>"""


def fingertip_xy(qpos: np.ndarray, link_length: float = LINK_LENGTH) -> np.ndarray:
    """Planar forward kinematics, (N, n_links) joint angles -> (N, 2) fingertip position.
    Computed from ``qpos`` rather than read from ``MjData.xpos``, which after ``mj_step``
    still holds the positions before the last integration step."""
    angles = np.cumsum(qpos, axis=1)
    return link_length * np.stack([np.cos(angles).sum(1), np.sin(angles).sum(1)], axis=1)


class _Arms:
    """``n`` arms sharing one ``MjModel``: reset, step and observe all of them."""

    def __init__(self, n: int, episode_steps: int, ctrl_cost_weight: float, dist_weight: float, vel_weight: float):
        import mujoco

        self.mujoco = mujoco
        self.model = mujoco.MjModel.from_xml_string(reacher_xml())
        self.datas = [mujoco.MjData(self.model) for _ in range(n)]
        self.n, self.episode_steps = n, episode_steps
        self.ctrl_cost_weight, self.dist_weight, self.vel_weight = ctrl_cost_weight, dist_weight, vel_weight
        self.steps = np.zeros(n, dtype=np.int64)
        self.target = np.zeros((n, 2))
        self.rngs = [np.random.default_rng() for _ in range(n)]

    def reset(self, i: int) -> None:
        rng, d = self.rngs[i], self.datas[i]
        self.mujoco.mj_resetData(self.model, d)
        d.qpos[:] = rng.uniform(-0.1, 0.1, size=N_LINKS)
        d.qvel[:] = rng.uniform(-0.005, 0.005, size=N_LINKS)
        radius, angle = N_LINKS * LINK_LENGTH * np.sqrt(rng.uniform()), rng.uniform(0.0, 2 * np.pi)
        self.target[i] = radius * np.cos(angle), radius * np.sin(angle)
        d.mocap_pos[0, :2] = self.target[i]
        self.steps[i] = 0

    def step(self, actions: np.ndarray, active: np.ndarray):
        """Step the ``active`` arms with ``actions`` (N, 5); returns their rewards (0 elsewhere)."""
        actions = np.clip(actions, -1.0, 1.0)
        for i in np.flatnonzero(active):
            d = self.datas[i]
            d.ctrl[:] = actions[i]
            for _ in range(FRAME_SKIP):
                self.mujoco.mj_step(self.model, d)
        self.steps[active] += 1
        reward = -self.ctrl_cost_weight * np.square(actions).sum(1)
        last = active & (self.steps >= self.episode_steps)
        if last.any():
            qpos, qvel = self.state()
            dist = np.linalg.norm(fingertip_xy(qpos) - self.target, axis=1)
            reward = reward - np.where(last, self.dist_weight * dist + self.vel_weight * np.square(qvel).sum(1), 0.0)
        return np.where(active, reward, 0.0), last

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.stack([d.qpos for d in self.datas]), np.stack([d.qvel for d in self.datas]))

    def observe(self) -> np.ndarray:
        qpos, qvel = self.state()
        obs = np.empty((self.n, OBS_DIM))
        obs[:, OBS_LAYOUT["cos_q"]] = np.cos(qpos)
        obs[:, OBS_LAYOUT["sin_q"]] = np.sin(qpos)
        obs[:, OBS_LAYOUT["target"]] = self.target
        obs[:, OBS_LAYOUT["qvel"]] = qvel
        obs[:, OBS_LAYOUT["fingertip_to_target"]] = fingertip_xy(qpos) - self.target
        obs[:, OBS_LAYOUT["time"]] = (self.steps / self.episode_steps)[:, None]
        return obs

    def get_state(self) -> dict:
        spec = self.mujoco.mjtState.mjSTATE_INTEGRATION
        states = []
        for d in self.datas:
            buf = np.empty(self.mujoco.mj_stateSize(self.model, spec))
            self.mujoco.mj_getState(self.model, d, buf, spec)
            states.append(buf)
        return {
            "physics": np.stack(states),
            "steps": self.steps.copy(),
            "target": self.target.copy(),
            "rngs": [r.bit_generator.state for r in self.rngs],
        }

    def set_state(self, state: dict) -> None:
        if len(state["physics"]) != self.n:
            raise ValueError(f"state of {len(state['physics'])} arms cannot be loaded into {self.n}")
        spec = self.mujoco.mjtState.mjSTATE_INTEGRATION
        for d, buf in zip(self.datas, state["physics"]):
            self.mujoco.mj_setState(self.model, d, np.asarray(buf, dtype=np.float64), spec)
        self.steps, self.target = state["steps"].copy(), state["target"].copy()
        for r, s in zip(self.rngs, state["rngs"]):
            r.bit_generator.state = s


def _spaces():
    from gymnasium import spaces

    return (
        spaces.Box(-1.0, 1.0, shape=(N_LINKS,), dtype=np.float64),
        spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float64),
    )


try:
    import gymnasium as _gym
except ImportError:  # the rl extra is not installed: the module still documents the task
    _gym = None

if _gym is not None:

    class ReacherSparse5Env(_gym.Env):
        """One 5-link arm (see the module docstring). ``render_mode="rgb_array"`` renders it."""

        metadata = {"render_modes": ["rgb_array"], "render_fps": int(round(1 / (0.01 * FRAME_SKIP)))}

        def __init__(
            self,
            episode_steps: int = EPISODE_STEPS,
            ctrl_cost_weight: float = 1.0,
            dist_weight: float = 1.0,
            vel_weight: float = 10.0,
            render_mode: str | None = None,
        ):
            if render_mode not in (None, "rgb_array"):
                raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
            self.arms = _Arms(1, episode_steps, ctrl_cost_weight, dist_weight, vel_weight)
            self.action_space, self.observation_space = _spaces()
            self.render_mode, self._renderer = render_mode, None

        def reset(self, *, seed: int | None = None, options=None):
            super().reset(seed=seed)
            self.arms.rngs[0] = self.np_random
            self.arms.reset(0)
            return self.arms.observe()[0], {}

        def step(self, action):
            reward, last = self.arms.step(np.asarray(action, dtype=np.float64).reshape(1, N_LINKS), np.ones(1, bool))
            # the horizon ends the episode by truncation, never by termination
            return self.arms.observe()[0], float(reward[0]), False, bool(last[0]), {}

        def get_state(self) -> dict:
            """The arm's physics, step count, target and random generator (for an exact resume)."""
            return self.arms.get_state()

        def set_state(self, state: dict) -> None:
            self.arms.set_state(state)
            self._np_random = self.arms.rngs[0]

        def render(self):
            if self.render_mode != "rgb_array":
                return None
            if self._renderer is None:
                import mujoco

                self._renderer = mujoco.Renderer(self.arms.model, 240, 240)
            self.arms.mujoco.mj_forward(self.arms.model, self.arms.datas[0])
            self._renderer.update_scene(self.arms.datas[0])
            return self._renderer.render()

        def close(self):
            if self._renderer is not None:
                self._renderer.close()
                self._renderer = None

    class ReacherSparse5VecEnv(_gym.vector.VectorEnv):
        """``num_envs`` arms stepped in one process; next-step autoreset (the step after an
        episode's end resets that arm, ignores its action and returns reward 0). Arm ``i``
        reset with ``seed=s`` follows ``ReacherSparse5Env`` reset with ``seed=s + i``."""

        metadata = {"autoreset_mode": _gym.vector.AutoresetMode.NEXT_STEP}

        def __init__(
            self,
            num_envs: int = 1,
            episode_steps: int = EPISODE_STEPS,
            ctrl_cost_weight: float = 1.0,
            dist_weight: float = 1.0,
            vel_weight: float = 10.0,
            max_episode_steps: int | None = None,
        ):
            from gymnasium.vector.utils import batch_space

            if max_episode_steps is not None and max_episode_steps != episode_steps:
                episode_steps = max_episode_steps
            self.num_envs = num_envs
            self.arms = _Arms(num_envs, episode_steps, ctrl_cost_weight, dist_weight, vel_weight)
            self.single_action_space, self.single_observation_space = _spaces()
            self.action_space = batch_space(self.single_action_space, num_envs)
            self.observation_space = batch_space(self.single_observation_space, num_envs)
            self._needs_reset = np.zeros(num_envs, dtype=bool)

        def reset(self, *, seed: int | None = None, options=None):
            if seed is not None:
                self.arms.rngs = [np.random.default_rng(seed + i) for i in range(self.num_envs)]
            for i in range(self.num_envs):
                self.arms.reset(i)
            self._needs_reset[:] = False
            return self.arms.observe(), {}

        def step(self, actions):
            actions = np.asarray(actions, dtype=np.float64).reshape(self.num_envs, N_LINKS)
            resetting = self._needs_reset.copy()
            for i in np.flatnonzero(resetting):
                self.arms.reset(i)
            reward, last = self.arms.step(actions, ~resetting)
            self._needs_reset = last
            return (self.arms.observe(), reward, np.zeros(self.num_envs, dtype=bool), last, {})

        def get_state(self) -> dict:
            return {"arms": self.arms.get_state(), "needs_reset": self._needs_reset.copy()}

        def set_state(self, state: dict) -> None:
            self.arms.set_state(state["arms"])
            self._needs_reset = state["needs_reset"].copy()


def register() -> None:
    """Register ``trpl_fast/ReacherSparse5-v0`` with Gymnasium (idempotent)."""
    if _gym is None or "trpl_fast/ReacherSparse5-v0" in _gym.registry:
        return
    _gym.register(
        "trpl_fast/ReacherSparse5-v0",
        entry_point="trpl_fast.rl.reacher:ReacherSparse5Env",
        vector_entry_point="trpl_fast.rl.reacher:ReacherSparse5VecEnv",
        max_episode_steps=EPISODE_STEPS,
    )
