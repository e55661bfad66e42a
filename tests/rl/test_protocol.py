"""The original implementation's training details and the paper's evaluation protocol:
advantages normalized per minibatch, sampled actions unclipped (configurable), both
learning rates annealed, an evaluation after every iteration from start states that vary
between evaluations and differ from the training environments', and runs configurable
from the command line (``--set``, ``--config``)."""

import csv
import json

import numpy as np
import pytest
import torch

from trpl_fast.cli import main
from trpl_fast.rl import envs as E
from trpl_fast.rl.config import TrainConfig, preset
from trpl_fast.rl.evaluation import EVAL_SEED_OFFSET, Evaluator, eval_seed
from trpl_fast.rl.train import train

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")


def small(algo, **kw):
    args = dict(
        env_id="Pendulum-v1",
        total_steps=1024,
        rollout_steps=512,
        num_envs=2,
        epochs=2,
        epochs_vf=1,
        minibatch_size=100,
        eval_episodes=2,
        eval_in_background=False,  # in-process: the worker's start-up per run (tests/rl/test_background_eval.py)
        checkpoint_every=1,
        device="cpu",
        env_backend="gymnasium",
    )
    args.update(kw)
    return preset("mujoco", algo, **args)


def run(cfg, d):
    return train(cfg, d, progress=False, log_tensorboard=False)


@pytest.mark.parametrize("algo,loss", [("kl", "surrogate_loss"), ("ppo", "ppo_clip_loss")])
@pytest.mark.parametrize("mode", ["minibatch", "batch"])
def test_advantages_normalized_per_minibatch(algo, loss, mode, tmp_path, monkeypatch):
    import trpl_fast.rl.train as T

    seen, real = [], getattr(T, loss)

    def spy(logp, logp_old, adv, *args):
        seen.append((adv.detach().clone(), args[-1].clone()))  # the last argument: the row weights
        return real(logp, logp_old, adv, *args)

    monkeypatch.setattr(T, loss, spy)
    run(small(algo, advantage_normalization=mode, total_steps=512), tmp_path)
    # fixed-size minibatches over all 512 steps; the 2 reset steps (Pendulum truncates at 200)
    # ride along with weight 0
    assert [len(a) for a, _ in seen[:6]] == [100] * 5 + [12]
    assert sum(float(w.sum()) for _, w in seen[:6]) == 510

    def stats(a, w):
        a = a[w > 0]
        return float(a.mean()), float(a.std())

    per_minibatch = [stats(a, w) for a, w in seen]
    if mode == "minibatch":
        assert all(abs(m) < 1e-5 and abs(s - 1.0) < 1e-4 for m, s in per_minibatch)
    else:  # normalized over the batch: each minibatch is off by its sampling noise
        assert max(abs(m) for m, _ in per_minibatch) > 1e-3
        whole = torch.cat([a[w > 0] for a, w in seen[:6]])
        assert abs(float(whole.mean())) < 1e-5 and abs(float(whole.std()) - 1.0) < 1e-3


def test_a_single_advantage_normalizes_to_zero():
    from trpl_fast.rl.train import normalize_advantages

    assert normalize_advantages(torch.tensor([3.5])).tolist() == [0.0]
    masked = normalize_advantages(torch.tensor([1.0, 3.0, 100.0, 5.0]), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert masked[[0, 1, 3]].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)


def test_masked_losses_equal_the_losses_of_the_valid_rows():
    from trpl_fast.projection import TrustRegionProjection
    from trpl_fast.rl.losses import ppo_clip_loss, surrogate_loss, value_loss

    g = torch.Generator().manual_seed(0)
    logp, old, adv, v, r, v0 = (torch.randn(9, generator=g) for _ in range(6))
    w = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1, 0])
    k = w > 0
    assert surrogate_loss(logp, old, adv, w) == pytest.approx(float(surrogate_loss(logp[k], old[k], adv[k])))
    assert ppo_clip_loss(logp, old, adv, 0.2, w) == pytest.approx(float(ppo_clip_loss(logp[k], old[k], adv[k], 0.2)))
    assert value_loss(v, r, v0, 0.2, w) == pytest.approx(float(value_loss(v[k], r[k], v0[k], 0.2)))
    layer = TrustRegionProjection("kl", 0.03, 0.001, regression_weight=8.0)
    mean, mean_t, std = torch.randn(9, 3, generator=g), torch.randn(9, 3, generator=g), torch.ones(9, 3)
    assert layer.trust_region_loss(mean, std, mean_t, std, w) == pytest.approx(
        float(layer.trust_region_loss(mean[k], std[k], mean_t[k], std[k]))
    )


@pytest.mark.parametrize("clip", [False, True])
def test_clip_actions_flag_reaches_the_simulator(clip, tmp_path, monkeypatch):
    """Hopper's box is [-1, 1] and the initial std is 1: about a third of the sampled
    components fall outside it. Unclipped they reach the simulator as sampled."""
    sent, real = [], E.VecEnv.step

    def spy(self, actions, clip=True):
        sent.append((np.array(actions), clip))
        return real(self, actions, clip=clip)

    monkeypatch.setattr(E.VecEnv, "step", spy)
    cfg = small("kl", env_id="Hopper-v5", clip_actions=clip, total_steps=512, eval_episodes=0)
    run(cfg, tmp_path)
    assert {c for _, c in sent} == {clip}
    outside = np.mean([np.abs(a).max() > 1.0 for a, _ in sent])
    assert outside > 0.3  # the policy samples outside the box either way; the flag decides what the env sees

    seen = []

    class Recorder:  # what the underlying env receives from VecEnv.step
        def step(self, actions):
            seen.append(np.array(actions))
            return np.zeros((1, 3)), np.zeros(1), np.zeros(1, bool), np.zeros(1, bool), {}

    vec = object.__new__(E.VecEnv)
    vec.env, vec.num_envs = Recorder(), 1
    vec.action_low, vec.action_high, vec.action_dtype = np.array([-1.0]), np.array([1.0]), np.float32
    real(vec, np.array([[2.5]]), clip=clip)
    assert seen[-1].tolist() == [[1.0 if clip else 2.5]]


def test_lr_decay_anneals_both_optimizers(tmp_path):
    cfg = small("ppo", total_steps=2048, eval_episodes=0)  # 4 iterations, lr_decay in the ppo preset
    assert cfg.lr_decay
    run(cfg, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    # the last iteration (3 of 4) trained at 1/4 of each initial learning rate
    assert ckpt["opt_pi"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr * 0.25)
    assert ckpt["opt_vf"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr_vf * 0.25)


@pytest.mark.parametrize("every,expected", [(1, [True] * 4), (3, [False, False, True, True])])
def test_evaluation_schedule(every, expected, tmp_path):
    rows = run(small("kl", total_steps=2048, eval_every=every), tmp_path)
    assert [r["eval_return_mean"] == r["eval_return_mean"] for r in rows] == expected  # the last one always


def first_observations(env_id, seeds_or_iterations, maker):
    return [maker(x) for x in seeds_or_iterations]


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
def test_evaluation_start_states_vary_and_differ_from_training(backend):
    pytest.importorskip(backend)
    ev = Evaluator("Hopper-v5", 3, seed=0, backend=backend)
    starts = []
    for iteration in range(3):
        if backend == "gymnasium":
            ev.env.env.reset(seed=eval_seed(0, iteration, 3))
        starts.append(ev.env.reset())
    ev.close()
    train_env = E.make_vec_env("Hopper-v5", 3, 0, backend=backend)
    train_start = train_env.reset()
    train_env.close()
    flat = [s for batch in (*starts, train_start) for s in batch]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert not np.allclose(flat[i], flat[j]), (i, j)


def test_eval_seeds_are_distinct_and_above_training_seeds():
    seeds = {eval_seed(s, it, 5) for s in range(3) for it in range(2000)}
    assert len(seeds) == 3 * 2000 and min(seeds) >= EVAL_SEED_OFFSET and max(seeds) + 5 < 2**31


def test_evaluation_is_deterministic_given_the_iteration(tmp_path):
    """The Gymnasium backend reseeds per evaluation: a resumed run evaluates exactly as the
    uninterrupted one (tests/rl/test_resume.py compares whole progress rows)."""
    from trpl_fast.rl.policies import GaussianPolicy

    policy = GaussianPolicy(3, 1)
    a = Evaluator("Pendulum-v1", 2, seed=1, backend="gymnasium")
    b = Evaluator("Pendulum-v1", 2, seed=1, backend="gymnasium", first_iteration=7)
    assert a(policy, None, 7) == b(policy, None, 7) and a(policy, None, 7) != a(policy, None, 8)
    a.close()
    b.close()


# -- configurable runs ------------------------------------------------------------------


def capture_train(monkeypatch):
    seen = {}

    def fake(cfg, out, **kw):
        seen.update(cfg=cfg, out=out)
        return [{"global_step": 1, "eval_return_mean": 0.0, "steps_per_second": 1.0}]

    monkeypatch.setattr("trpl_fast.rl.train.train", fake)
    return seen


def test_cli_set_and_config(tmp_path, monkeypatch):
    seen = capture_train(monkeypatch)
    assert (
        main(
            [
                "train",
                "--algo",
                "ppo",
                "--set",
                "lr=1e-4",
                "--set",
                "hidden=32,32",
                "--set",
                "clip_actions=true",
                "--set",
                "max_grad_norm=none",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    cfg = seen["cfg"]
    assert (cfg.algo, cfg.lr, cfg.hidden, cfg.clip_actions, cfg.max_grad_norm) == ("ppo", 1e-4, (32, 32), True, None)
    assert cfg.epochs == 10  # the rest is PPO's preset
    # a run's own config.json loads back as it is
    full = preset("mujoco", "w2", seed=7, lr=2e-5, env_id="Hopper-v5", hidden=(16,))
    (tmp_path / "config.json").write_text(json.dumps(full.to_dict(), indent=2))
    assert main(["train", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "b")]) == 0
    assert seen["cfg"] == full
    # a partial file changes the preset; named options and --set come after it
    (tmp_path / "part.json").write_text(json.dumps({"lr": 1e-5, "seed": 3, "epochs": 4}))
    assert (
        main(
            [
                "train",
                "--config",
                str(tmp_path / "part.json"),
                "--seed",
                "4",
                "--set",
                "epochs=6",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    cfg = seen["cfg"]
    assert (cfg.algo, cfg.lr, cfg.seed, cfg.epochs, cfg.minibatch_size) == ("kl", 1e-5, 4, 6, 32)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--set", "learning_rate=1"], "--set learning_rate: unknown config field"),
        (["--set", "lr=fast"], "--set lr: expected a number, got 'fast'"),
        (["--set", "gamma=2"], r"config field gamma: must be in \[0, 1\]"),
        (["--set", "epochs"], "--set expects KEY=VALUE"),
        (["--config", "missing.json"], "--config missing.json: cannot read it"),
        (["--config", "BAD"], "--config .*BAD.json: not valid JSON"),
        (["--config", "UNKNOWN"], r"--config .*UNKNOWN.json: unknown config keys: \['learning_rate'\]"),
        (["--config", "BADVALUE"], "--config .*BADVALUE.json: config field epochs: expected int"),
    ],
    ids=[
        "unknown-key",
        "bad-number",
        "out-of-range",
        "no-value",
        "missing-file",
        "bad-json",
        "unknown-file-key",
        "bad-file-value",
    ],
)
def test_cli_configuration_errors_name_the_key(argv, message, tmp_path, monkeypatch, capsys):
    seen = capture_train(monkeypatch)
    (tmp_path / "BAD.json").write_text("{lr: 1")
    (tmp_path / "UNKNOWN.json").write_text(json.dumps({"learning_rate": 1}))
    (tmp_path / "BADVALUE.json").write_text(json.dumps({"epochs": "ten"}))
    argv = [str(tmp_path / f"{a}.json") if a in ("BAD", "UNKNOWN", "BADVALUE") else a for a in argv]
    assert main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert "cfg" not in seen and not (tmp_path / "run").exists()


def test_resume_accepts_only_resumable_set(tmp_path, capsys):
    cfg = small("kl", total_steps=512, eval_episodes=0)
    run(cfg, tmp_path / "r")
    assert main(["train", "--resume", str(tmp_path / "r"), "--set", "lr=1e-3", "--no-progress"]) == 2
    assert "lr: checkpoint has" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--resume",
                str(tmp_path / "r"),
                "--set",
                "eval_every=2",
                "--set",
                "total_steps=1024",
                "--no-progress",
            ]
        )
        == 0
    )
    with open(tmp_path / "r" / "progress.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert TrainConfig.from_json_file(tmp_path / "r" / "config.json").total_steps in (512, 1024)
