"""The 5-link sparse-reward Reacher: registration, reward sparsity and formula, truncation at
step 200, observation layout, target distribution, seeding, and the batched vector env
matching the single env arm for arm."""

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
mujoco = pytest.importorskip("mujoco")

import trpl_fast  # noqa: E402,F401  (registers the env)
from trpl_fast.rl.envs import make_vec_env  # noqa: E402
from trpl_fast.rl.reacher import EPISODE_STEPS, OBS_DIM, OBS_LAYOUT, fingertip_xy  # noqa: E402

ENV_ID = "trpl_fast/ReacherSparse5-v0"


def test_registered_and_passes_gymnasium_env_checker():
    env = gym.make(ENV_ID)
    assert env.observation_space.shape == (OBS_DIM,) and env.action_space.shape == (5,)
    from gymnasium.utils.env_checker import check_env

    check_env(env.unwrapped, skip_render_check=True)
    vec = gym.make_vec(ENV_ID, num_envs=3)
    assert vec.num_envs == 3 and vec.single_observation_space.shape == (OBS_DIM,)


def test_zero_actions_give_zero_reward_until_the_last_step_which_truncates():
    env = gym.make(ENV_ID)
    obs, _ = env.reset(seed=0)
    for t in range(1, EPISODE_STEPS + 1):
        obs, reward, terminated, truncated, _ = env.step(np.zeros(5))
        assert not terminated
        assert obs[OBS_LAYOUT["time"]][0] == pytest.approx(t / EPISODE_STEPS)
        if t < EPISODE_STEPS:
            assert reward == 0.0 and not truncated
    # last step: distance to the target plus 10 * squared joint velocities, read off the observation
    dist = np.linalg.norm(obs[OBS_LAYOUT["fingertip_to_target"]])
    vel = np.square(obs[OBS_LAYOUT["qvel"]]).sum()
    assert truncated and dist > 0
    assert reward == pytest.approx(-(dist + 10.0 * vel), rel=1e-12)


def test_control_cost_and_configurable_weights():
    env = gym.make(ENV_ID, ctrl_cost_weight=0.5, dist_weight=3.0)
    env.reset(seed=1)
    a = np.array([0.5, -1.0, 0.1, 2.0, -3.0])  # out of range entries are clipped to [-1, 1]
    _, reward, _, _, _ = env.step(a)
    assert reward == pytest.approx(-0.5 * (0.25 + 1.0 + 0.01 + 1.0 + 1.0))
    for _ in range(EPISODE_STEPS - 2):
        env.step(np.zeros(5))
    obs, reward, _, truncated, _ = env.step(np.zeros(5))
    dist = np.linalg.norm(obs[OBS_LAYOUT["fingertip_to_target"]])
    assert truncated and reward == pytest.approx(-(3.0 * dist + 10.0 * np.square(obs[OBS_LAYOUT["qvel"]]).sum()))


def test_observation_layout_matches_the_simulator():
    env = gym.make(ENV_ID)
    env.reset(seed=2)
    rng = np.random.default_rng(0)
    for _ in range(30):
        obs, *_ = env.step(rng.uniform(-1, 1, 5))
    arms = env.unwrapped.arms
    d = arms.datas[0]
    mujoco.mj_forward(arms.model, d)  # recompute positions for the current joint angles
    np.testing.assert_allclose(obs[OBS_LAYOUT["cos_q"]], np.cos(d.qpos), rtol=0, atol=1e-15)
    np.testing.assert_allclose(obs[OBS_LAYOUT["sin_q"]], np.sin(d.qpos), rtol=0, atol=1e-15)
    np.testing.assert_allclose(obs[OBS_LAYOUT["qvel"]], d.qvel, rtol=0, atol=0)
    tip = d.body("fingertip").xpos[:2]
    np.testing.assert_allclose(fingertip_xy(d.qpos[None])[0], tip, atol=1e-12)
    np.testing.assert_allclose(obs[OBS_LAYOUT["target"]], d.mocap_pos[0, :2], atol=0)
    np.testing.assert_allclose(obs[OBS_LAYOUT["fingertip_to_target"]], tip - d.mocap_pos[0, :2], atol=1e-12)


def test_targets_are_uniform_in_the_reachable_disc():
    env = gym.make(ENV_ID)
    env.reset(seed=3)
    targets = np.array([env.reset()[0][OBS_LAYOUT["target"]] for _ in range(4000)])
    r2 = np.square(targets).sum(1)
    assert r2.max() <= 0.25 + 1e-12
    # uniform in a disc of radius R: E[r^2] = R^2 / 2, and each quadrant holds a quarter
    assert r2.mean() == pytest.approx(0.125, abs=0.005)
    quadrant = (targets[:, 0] > 0) * 2 + (targets[:, 1] > 0)
    assert np.all(np.abs(np.bincount(quadrant, minlength=4) / len(targets) - 0.25) < 0.03)


def test_seeding_is_reproducible():
    def rollout(seed):
        env = gym.make(ENV_ID)
        obs, _ = env.reset(seed=seed)
        out = [obs]
        for t in range(50):
            out.append(env.step(np.full(5, 0.3 * np.sin(t)))[0])
        return np.array(out)

    assert np.array_equal(rollout(7), rollout(7))
    assert not np.array_equal(rollout(7)[0], rollout(8)[0])


def test_vector_env_is_the_single_env_arm_for_arm_with_next_step_autoreset():
    n, seed, steps = 3, 11, EPISODE_STEPS + 5
    vec = make_vec_env(ENV_ID, n, seed)
    singles = [gym.make(ENV_ID) for _ in range(n)]
    obs_v = vec.reset()  # make_vec_env already reset it once with the seed
    obs_s = [(e.reset(seed=seed + i), e.reset()[0])[1] for i, e in enumerate(singles)]
    np.testing.assert_array_equal(obs_v, np.stack(obs_s))
    rng = np.random.default_rng(0)
    for t in range(1, steps + 1):
        a = rng.uniform(-1, 1, (n, 5))
        obs_v, rew_v, term_v, trunc_v = vec.step(a)
        assert not term_v.any()
        if t == EPISODE_STEPS + 1:  # the step after the end resets every arm: reward 0, new episode
            assert np.all(rew_v == 0) and np.all(obs_v[:, OBS_LAYOUT["time"]] == 0)
            obs_s = [e.reset()[0] for e in singles]
            np.testing.assert_array_equal(obs_v, np.stack(obs_s))
            continue
        out = [e.step(a[i]) for i, e in enumerate(singles)]
        np.testing.assert_array_equal(obs_v, np.stack([o[0] for o in out]))
        np.testing.assert_array_equal(rew_v, np.array([o[1] for o in out]))
        np.testing.assert_array_equal(trunc_v, np.array([o[3] for o in out]))
        assert trunc_v.all() == (t == EPISODE_STEPS)


def test_vector_env_state_restores_exactly():
    a, b = make_vec_env(ENV_ID, 4, 0), make_vec_env(ENV_ID, 4, 99)
    a.reset(), b.reset()
    rng = np.random.default_rng(1)
    for _ in range(150):
        a.step(rng.uniform(-1, 1, (4, 5)))
    b.set_state(a.get_state())
    for _ in range(300):  # across the episode end and the reset that draws new targets
        act = rng.uniform(-1, 1, (4, 5))
        for x, y in zip(a.step(act), b.step(act)):
            np.testing.assert_array_equal(x, y)
