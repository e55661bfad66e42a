"""The vector environments (``rl/envs.py``): the serial Gymnasium vector env against
Gymnasium's own ``SyncVectorEnv`` with next-step autoreset, bit for bit; which backend
``auto`` picks; per-environment seed lists."""

import numpy as np
import pytest

from trpl_fast.rl.envs import SerialVectorEnv, make_vec_env

gym = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")


@pytest.mark.parametrize("seed", [7, [3, 11, 5]], ids=["int-seed", "seed-list"])
def test_serial_vector_env_equals_gymnasium_sync_vector_env(seed):
    """Hopper episodes end early under random actions: terminations, the reset-only step
    after them, and a mid-run reset without a seed are all compared."""
    make = [lambda: gym.make("Hopper-v5") for _ in range(3)]
    ours = SerialVectorEnv(make)
    theirs = gym.vector.SyncVectorEnv(make, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    rng = np.random.default_rng(0)
    obs_a, _ = ours.reset(seed=seed)
    obs_b, _ = theirs.reset(seed=seed)
    np.testing.assert_array_equal(obs_a, obs_b)
    ends = 0
    for t in range(400):
        if t == 250:
            obs_a, _ = ours.reset()
            obs_b, _ = theirs.reset()
            np.testing.assert_array_equal(obs_a, obs_b)
        actions = rng.uniform(-1, 1, (3, 3)).astype(np.float32)
        a, b = ours.step(actions), theirs.step(actions)
        for x, y in zip(a[:4], b[:4]):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
        ends += int((a[2] | a[3]).sum())
    assert ends >= 3  # the autoreset path ran
    ours.close()
    theirs.close()


def test_auto_backend_steps_one_env_in_gymnasium_and_several_in_envpool():
    pytest.importorskip("envpool")
    one, several = make_vec_env("HalfCheetah-v5", 1, 0), make_vec_env("HalfCheetah-v5", 2, 0)
    assert (one.backend, several.backend) == ("gymnasium", "envpool")
    assert isinstance(one.env, SerialVectorEnv) and one.can_save_state
    one.close()
    several.close()


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
def test_seed_lists_seed_each_environment(backend):
    if backend == "envpool":
        pytest.importorskip("envpool")
    pooled = make_vec_env("Hopper-v5", 3, [5, 9, 2], backend=backend)
    alone = make_vec_env("Hopper-v5", 1, 9, backend=backend)
    np.testing.assert_array_equal(pooled.reset()[1], alone.reset()[0])
    pooled.close()
    alone.close()
    with pytest.raises(ValueError, match="2 seeds for 3 environments"):
        make_vec_env("Hopper-v5", 3, [1, 2], backend=backend)
