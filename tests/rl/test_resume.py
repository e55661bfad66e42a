"""Checkpoints and ``--resume``: a run stopped (Ctrl-C or end of its steps) and resumed is
bit-for-bit the uninterrupted run on CPU -- networks, optimizers, normalizers, random
generators, open episodes -- and a checkpoint never continues under another config."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trpl_fast.rl.config import preset
from trpl_fast.rl.runlog import TIMING_COLUMNS
from trpl_fast.rl.train import train

pytest.importorskip("gymnasium")

# columns that measure the machine, not the run
TIMING = set(TIMING_COLUMNS)


def small(algo, **kw):
    args = dict(
        env_id="Pendulum-v1",
        total_steps=1024,
        rollout_steps=256,
        num_envs=2,
        epochs=2,
        epochs_vf=1,
        minibatch_size=64,
        eval_episodes=1,
        eval_in_background=False,  # in-process: the worker's start-up per run (tests/rl/test_background_eval.py)
        checkpoint_every=1,
        device="cpu",
        env_backend="gymnasium",
    )
    args.update(kw)
    return preset("mujoco", algo, **args)


def run(cfg, d, **kw):
    return train(cfg, d, progress=False, log_tensorboard=False, **kw)


def progress(d):
    with open(d / "progress.csv") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def assert_same_state(a, b):
    """Two checkpoints hold identical tensors (exact equality, not a tolerance)."""
    ca = torch.load(a / "checkpoint.pt", weights_only=False)
    cb = torch.load(b / "checkpoint.pt", weights_only=False)
    assert ca["global_step"] == cb["global_step"] and ca["iteration"] == cb["iteration"]
    for key in ("policy", "value"):
        for name, t in ca[key].items():
            assert torch.equal(t, cb[key][name]), f"{key}.{name} differs"
    for key in ("opt_pi", "opt_vf"):
        for pid, st in ca[key]["state"].items():
            for name, t in st.items():
                assert torch.equal(t, cb[key]["state"][pid][name]), f"{key} state {pid}.{name} differs"
    assert torch.equal(ca["torch_rng"], cb["torch_rng"]) and torch.equal(ca["gen_rng"], cb["gen_rng"])
    if ca["obs_norm"] is not None:
        for name, t in ca["obs_norm"].items():
            assert torch.equal(t, cb["obs_norm"][name]), f"obs_norm.{name} differs"


def interrupt_in_iteration(monkeypatch, n, loop=None):
    """Make Ctrl-C arrive in iteration ``n`` (0-based), after its rollout (in its
    advantages), in the loop of module ``loop`` (default: the single run's, ``train``; the
    batched seeds': ``multiseed``)."""
    import trpl_fast.rl.train as T

    loop = loop or T
    real, calls = loop.gae, {"n": 0}

    def gae(*args, **kw):
        calls["n"] += 1
        if calls["n"] == n + 1:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(loop, "gae", gae)


# kl with entropy control (the schedule's initial entropy must survive the resume), ppo with
# reward normalization, clipping and learning-rate decay (every normalizer and schedule)
@pytest.mark.parametrize(
    "algo,extra", [("kl", {"entropy_control": "ineq", "target_entropy": -1.0}), ("ppo", {})], ids=["kl-entropy", "ppo"]
)
def test_ctrl_c_then_resume_is_bit_for_bit(algo, extra, tmp_path, monkeypatch):
    cfg = small(algo, checkpoint_every=3, **extra)
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(cfg, full)

    interrupt_in_iteration(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, cut)
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=False)
    # Ctrl-C in iteration 2 writes the end of iteration 1, although the periodic checkpoint
    # (every 3 iterations) has not been written yet: nothing completed is lost
    assert ckpt["interrupted"] and ckpt["iteration"] == 2 and ckpt["global_step"] == 512
    assert len(progress(cut)) == 2
    monkeypatch.undo()

    rows = run(cfg, cut, resume=True)
    assert len(rows) == 4 and [int(r["iteration"]) for r in rows] == [0, 1, 2, 3]
    assert progress(cut) == progress(full)
    assert_same_state(full, cut)


def test_resume_restores_mujoco_environments_and_extends_the_run(tmp_path):
    # Hopper terminates early (falls) and truncates: episodes are open across the checkpoint
    cfg = small("kl", env_id="Hopper-v5", total_steps=768, eval_episodes=0)
    full, part = tmp_path / "full", tmp_path / "part"
    run(cfg, full)
    run(small("kl", env_id="Hopper-v5", total_steps=512, eval_episodes=0), part)
    rows = run(cfg, part, resume=True)  # total_steps may grow on resume
    assert [int(r["global_step"]) for r in rows] == [256, 512, 768]
    assert progress(part) == progress(full)
    assert_same_state(full, part)


def test_resume_refuses_another_config_and_overwrite_needs_consent(tmp_path):
    cfg = small("kl", total_steps=256)
    run(cfg, tmp_path)
    with pytest.raises(ValueError, match=r"another config \(lr: checkpoint has 5e-05, requested 0.001"):
        run(small("kl", total_steps=512, lr=1e-3), tmp_path, resume=True)
    with pytest.raises(ValueError, match="another config.*algo"):
        run(small("ppo", total_steps=512), tmp_path, resume=True)
    with pytest.raises(ValueError, match="already holds a run"):
        run(cfg, tmp_path)
    run(cfg, tmp_path, overwrite=True)
    with pytest.raises(ValueError, match="no checkpoint at"):
        run(cfg, tmp_path / "nothing", resume=True)


def test_cli_ctrl_c_checkpoints_and_resumes(tmp_path):
    """A real SIGINT to `trpl-fast train`: exit code 130, a checkpoint marked interrupted,
    then `--resume` finishes the run."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "trpl_fast.cli",
        "train",
        "--env",
        "Pendulum-v1",
        "--algo",
        "ppo-m",
        "--steps",
        "40960",
        "--device",
        "cpu",
        "--env-backend",
        "gymnasium",
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a child inherits an ignored SIGINT (e.g. from a shell's background job), and Python then
    # installs no KeyboardInterrupt handler: give the child the default disposition
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        # two logged rows: the row of iteration k is written just before iteration k's
        # snapshot, so only once row 1 is visible is iteration 1 sure to be checkpointable
        if (out / "progress.csv").exists() and len((out / "progress.csv").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "trpl-fast train --resume" in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["interrupted"] and ckpt["iteration"] >= 1
    assert ckpt["global_step"] == 2048 * ckpt["iteration"]

    done = subprocess.run(
        [*cmd[:3], "train", "--resume", str(out), "--steps", str(2048 * (ckpt["iteration"] + 1)), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    final = torch.load(out / "checkpoint.pt", weights_only=False)
    assert not final["interrupted"] and final["iteration"] == ckpt["iteration"] + 1

    bad = subprocess.run(
        [*cmd[:3], "train", "--resume", str(out), "--algo", "kl"], env=env, capture_output=True, text=True, timeout=240
    )
    assert bad.returncode == 2 and "another config (algo: checkpoint has 'ppo-m', requested 'kl'" in bad.stderr
