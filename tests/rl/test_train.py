"""Every algorithm trains a few iterations on a small env (Pendulum-v1: 200-step episodes,
so truncation is exercised), logs its metrics, respects its bounds and checkpoints."""

import csv
import dataclasses
import json

import pytest
import torch

from trpl_fast.rl.config import preset
from trpl_fast.rl.train import CSV_COLUMNS, TrainingDiverged, save_checkpoint, train

pytest.importorskip("gymnasium")


def small(algo, **kw):
    args = dict(
        env_id="Pendulum-v1",
        total_steps=1024,
        rollout_steps=512,
        num_envs=2,
        epochs=2,
        epochs_vf=1,
        minibatch_size=128,
        eval_episodes=1,
        eval_in_background=False,  # in-process: the worker's start-up per run (tests/rl/test_background_eval.py)
        checkpoint_every=1,
        device="cpu",
    )
    args.update(kw)
    return preset("mujoco", algo, **args)


@pytest.mark.parametrize("algo", ["kl", "w2", "frob", "ppo", "ppo-m", "trpo"])
def test_each_algorithm_trains_and_logs(algo, tmp_path):
    cfg = small(algo)
    rows = train(cfg, tmp_path, progress=False, log_tensorboard=False)
    assert len(rows) == 2
    with open(tmp_path / "progress.csv") as f:
        logged = list(csv.DictReader(f))
    assert len(logged) == 2 and set(CSV_COLUMNS) <= set(logged[0])
    assert int(logged[-1]["global_step"]) == 1024
    assert json.loads((tmp_path / "config.json").read_text())["algo"] == algo
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["global_step"] == 1024 and ckpt["iteration"] == 2  # iterations completed
    for row in rows:
        assert row["episodes"] >= 0 and row["steps_per_second"] > 0
        if algo in ("kl", "w2", "frob"):
            # the projected policy respects both bounds on every state of the batch
            assert row["constraint_mean_max"] <= cfg.mean_bound * (1 + 1e-3)
            assert row["constraint_cov_max"] <= cfg.cov_bound * (1 + 1e-3)
    assert rows[-1]["eval_return_mean"] == rows[-1]["eval_return_mean"]  # evaluated (not NaN)


@pytest.mark.parametrize("contextual", [True])
def test_contextual_full_covariance_kl(tmp_path, contextual):
    cfg = small("kl", cov_form="full", contextual_cov=contextual, total_steps=512)
    rows = train(cfg, tmp_path, progress=False, log_tensorboard=False)
    assert rows[0]["constraint_cov_max"] <= cfg.cov_bound * (1 + 1e-3)


def test_atomic_checkpoint_replaces_whole_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"a": 1})
    save_checkpoint(path, {"a": 2})
    assert torch.load(path)["a"] == 2
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown environment id"):
        train(small("kl", env_id="NoSuchEnv-v0"), tmp_path, progress=False, log_tensorboard=False)
    with pytest.raises(ValueError, match="continuous"):
        train(small("kl", env_id="CartPole-v1"), tmp_path, progress=False, log_tensorboard=False)
    with pytest.raises(ValueError, match="algo: must be one of"):
        train(dataclasses.replace(small("kl"), algo="sac"), tmp_path, progress=False, log_tensorboard=False)
    with pytest.raises(ValueError, match="multiple of num_envs"):
        train(small("kl", rollout_steps=511), tmp_path, progress=False, log_tensorboard=False)


def test_nan_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = small("ppo")
    import trpl_fast.rl.train as T

    calls = {"n": 0}
    real = T.ppo_clip_loss

    def poisoned(*args, **kw):
        calls["n"] += 1
        loss = real(*args, **kw)
        return loss * float("nan") if calls["n"] > 8 else loss  # iteration 0 has 8 minibatch steps

    monkeypatch.setattr(T, "ppo_clip_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="policy loss is nan"):
        train(cfg, tmp_path, progress=False, log_tensorboard=False)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] == 1  # the good one, after the first iteration


def test_eval_and_plot_from_run_dirs(tmp_path, capsys):
    from trpl_fast.cli import main

    dirs = []
    for algo, seed in (("kl", 0), ("kl", 1), ("ppo", 0)):
        d = tmp_path / f"{algo}_{seed}"
        train(small(algo, seed=seed), d, progress=False, log_tensorboard=False)
        dirs.append(str(d))
    assert main(["eval", dirs[0], "--episodes", "2", "--device", "cpu"]) == 0
    assert main(["plot", *dirs, "--out", str(tmp_path / "plots" / "curves.png")]) == 0
    for name in ("curves_returns.png", "curves_kl.png"):
        png = tmp_path / "plots" / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_cli_threads_must_be_positive(tmp_path, capsys):
    from trpl_fast.cli import main

    assert main(["train", "--threads", "0", "--out", str(tmp_path / "run")]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
