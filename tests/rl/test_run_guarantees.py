"""What a run directory promises (README, "Checkpoints"): checkpoints by iterations and by
wall time, SIGTERM handled like Ctrl-C, SIGKILL loses at most the time since the last
checkpoint, a directory holding a run is never silently reused, a full disk gives a clear
error and leaves no temporary file, and a step budget is validated and rounded up."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trpl_fast.rl.config import preset
from trpl_fast.rl.train import RESUMABLE_CHANGES, read_checkpoint, save_checkpoint, train

pytest.importorskip("gymnasium")


def small(algo="ppo-m", **kw):
    args = dict(
        env_id="Pendulum-v1",
        total_steps=512,
        rollout_steps=256,
        num_envs=2,
        epochs=1,
        epochs_vf=1,
        minibatch_size=128,
        eval_episodes=0,
        checkpoint_every=1,
        device="cpu",
        env_backend="gymnasium",
    )
    args.update(kw)
    return preset("mujoco", algo, **args)


def run(cfg, d, **kw):
    kw.setdefault("log_tensorboard", False)
    return train(cfg, d, progress=False, **kw)


def events(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("events.out.tfevents"))


# -- item 5: wall-time checkpoints, SIGTERM, SIGKILL, no silent restart ------------------------


def test_checkpoints_by_wall_time_as_well_as_iterations(tmp_path, monkeypatch):
    import trpl_fast.rl.train as T

    saved, real = [], T.save_checkpoint
    monkeypatch.setattr(T, "save_checkpoint", lambda path, state: (saved.append(state["iteration"]), real(path, state)))
    # checkpoint_every far beyond the run: only the wall-time rule writes before the end
    run(small(total_steps=768, checkpoint_every=100, checkpoint_seconds=0.0), tmp_path)
    assert saved == [1, 2, 3]
    saved.clear()
    run(small(total_steps=768, checkpoint_every=100, checkpoint_seconds=3600.0), tmp_path / "hourly")
    assert saved == [3]  # at the end only
    assert "checkpoint_seconds" in RESUMABLE_CHANGES


class _Sentinel(Exception):
    pass


def test_sigterm_in_process_writes_the_last_completed_iteration_and_restores_the_handler(tmp_path, monkeypatch):
    import trpl_fast.rl.train as T

    def ours(signum, frame):  # what was installed before train(): must be back afterwards
        raise _Sentinel

    previous = signal.signal(signal.SIGTERM, ours)
    real, calls = T.gae, {"n": 0}

    def gae(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # in iteration 2, after its rollout
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(T, "gae", gae)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            run(small(total_steps=1024, checkpoint_every=100, checkpoint_seconds=3600.0), tmp_path)
        assert type(info.value).__name__ == "Terminated"
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)
    ckpt = read_checkpoint(tmp_path)
    assert ckpt["interrupted"] and ckpt["iteration"] == 2 and ckpt["global_step"] == 512
    monkeypatch.undo()
    rows = run(small(total_steps=1024, checkpoint_every=100, checkpoint_seconds=3600.0), tmp_path, resume=True)
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3]


class _KillsInFinalizer:
    """Sends SIGTERM from ``__del__``: the handler runs inside the finalizer, whose
    exceptions Python only reports ("Exception ignored in ...") -- the raise is lost."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched-seeds"])
def test_a_sigterm_whose_raise_is_swallowed_still_stops_the_run(tmp_path, monkeypatch, batched):
    import trpl_fast.rl.multiseed as M
    import trpl_fast.rl.train as T

    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: swallowed.append(info.exc_type))
    module = M if batched else T
    real, calls = module.gae, {"n": 0}

    def gae(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # in iteration 2, after its rollout
            _KillsInFinalizer()  # dropped at once: __del__ runs here
        return real(*args, **kw)

    monkeypatch.setattr(module, "gae", gae)
    cfg = small(total_steps=1280, checkpoint_every=100, checkpoint_seconds=3600.0)
    with pytest.raises(KeyboardInterrupt) as info:
        if batched:
            M.train_seeds(cfg, [0, 1], tmp_path, progress=False, log_tensorboard=False)
        else:
            run(cfg, tmp_path)
    assert swallowed and swallowed[0].__name__ == "Terminated"  # the handler's raise was lost ...
    assert type(info.value).__name__ == "Terminated"  # ... and the loop stopped all the same
    for d in [tmp_path / "seed0", tmp_path / "seed1"] if batched else [tmp_path]:
        ckpt = read_checkpoint(d)
        # stopped after iteration 2's policy update: the checkpoint holds iterations 0 and 1
        # (its "iteration" counts the completed ones)
        assert ckpt["interrupted"] and ckpt["iteration"] == 2 and ckpt["global_step"] == 512


def test_a_second_sigterm_does_not_abort_the_checkpoint_the_first_one_writes(tmp_path, monkeypatch):
    import trpl_fast.rl.train as T

    real_gae, real_save, calls, seen = T.gae, T.save_checkpoint, {"n": 0}, []

    def gae(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # in iteration 2, after its rollout
            os.kill(os.getpid(), signal.SIGTERM)
        return real_gae(*args, **kw)

    def save(path, state):
        if state.get("interrupted"):  # the write the first SIGTERM asked for: a second one now
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("second")
        real_save(path, state)

    monkeypatch.setattr(T, "gae", gae)
    monkeypatch.setattr(T, "save_checkpoint", save)
    with pytest.raises(KeyboardInterrupt) as info:
        run(small(total_steps=1024, checkpoint_every=100, checkpoint_seconds=3600.0), tmp_path)
    assert type(info.value).__name__ == "Terminated" and seen == ["second"]
    ckpt = read_checkpoint(tmp_path)
    assert ckpt["interrupted"] and ckpt["iteration"] == 2


def _cli(out, *extra):
    return [
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
        *extra,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start_and_wait(cmd, out, ready):
    """Start ``cmd`` with default signal dispositions (a shell's background job would pass
    on an ignored SIGINT) and wait until ``ready()``."""
    proc = subprocess.Popen(
        cmd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)],
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    return proc


def _rows(out):
    p = out / "progress.csv"
    return len(p.read_text().splitlines()) - 1 if p.exists() else 0


def _resume_to_the_end(out, iteration):
    """``--resume`` continues from ``iteration`` and finishes one more iteration."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trpl_fast.cli",
            "train",
            "--resume",
            str(out),
            "--steps",
            str(2048 * (iteration + 1)),
            "--no-progress",
            "--threads",
            "1",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    final = read_checkpoint(out)
    assert not final["interrupted"] and final["iteration"] == iteration + 1
    assert _rows(out) == iteration + 1


def test_cli_sigterm_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    # two rows: the row of iteration k is logged just before its snapshot
    proc = _start_and_wait(_cli(out), out, lambda: _rows(out) >= 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and f"trpl-fast train --resume {out}" in err and "Traceback" not in err
    ckpt = read_checkpoint(out)
    assert ckpt["interrupted"] and ckpt["iteration"] >= 1 and ckpt["global_step"] == 2048 * ckpt["iteration"]
    _resume_to_the_end(out, ckpt["iteration"])


def test_cli_sigkill_loses_at_most_the_time_since_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    # checkpoint_every is 10 iterations; a tiny checkpoint_seconds checkpoints every iteration
    proc = _start_and_wait(
        _cli(out, "--checkpoint-seconds", "0.01"), out, lambda: _rows(out) >= 2 and (out / "checkpoint.pt").exists()
    )
    proc.kill()
    proc.communicate(timeout=60)
    ckpt = read_checkpoint(out)
    assert not ckpt["interrupted"] and ckpt["iteration"] >= 1
    _resume_to_the_end(out, ckpt["iteration"])


def test_a_run_without_checkpoint_is_not_silently_restarted(tmp_path):
    run(small(total_steps=256), tmp_path)
    (tmp_path / "checkpoint.pt").unlink()  # as after a kill before the first checkpoint
    with pytest.raises(ValueError, match=r"already holds a run.*--resume.*--overwrite"):
        run(small(total_steps=256), tmp_path)
    with pytest.raises(ValueError, match="no checkpoint at .*--overwrite"):
        run(small(total_steps=256), tmp_path, resume=True)
    run(small(total_steps=256), tmp_path, overwrite=True)


# -- item 6: --steps ----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [-5, 0])
def test_non_positive_steps_are_refused(steps, tmp_path):
    with pytest.raises(ValueError, match=rf"config field total_steps: must be a finite number > 0, got {steps}"):
        run(small(total_steps=steps), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_budget_is_rounded_up_to_whole_iterations(tmp_path, capsys):
    rows = run(small(total_steps=300), tmp_path)
    assert [int(r["global_step"]) for r in rows] == [256, 512]

    from trpl_fast.cli import main

    assert main(["train", "--steps", "-5", "--env", "Pendulum-v1", "--out", str(tmp_path / "cli")]) == 2
    assert "error: --steps must be >= 1, got -5" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


# -- item 7: disk full during a checkpoint ----------------------------------------------------


def _enospc_save(*args, **kw):
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as exc:
        raise RuntimeError(
            "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing "
            "file data/0: file write failed"
        ) from exc


def test_disk_full_is_a_clear_error_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"a": 1})
    monkeypatch.setattr(torch, "save", _enospc_save)
    with pytest.raises(OSError, match=f"no space left on device.*{path}") as info:
        save_checkpoint(path, {"a": 2})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    assert torch.load(path)["a"] == 1  # the previous checkpoint survives


def test_cli_disk_full_prints_an_error_line(tmp_path, monkeypatch, capsys):
    from trpl_fast.cli import main

    monkeypatch.setattr(torch, "save", _enospc_save)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--env",
                "Pendulum-v1",
                "--algo",
                "ppo-m",
                "--steps",
                "2048",
                "--device",
                "cpu",
                "--env-backend",
                "gymnasium",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "error: no space left on device" in err and str(out / "checkpoint.pt") in err
    assert not (out / "checkpoint.pt.tmp").exists()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_on_a_real_tmpfs(tiny_tmpfs):
    path = tiny_tmpfs / "checkpoint.pt"
    save_checkpoint(path, {"a": torch.zeros(10)})
    with pytest.raises(OSError, match=f"no space left on device.*{path}"):
        save_checkpoint(path, {"a": torch.zeros(1_000_000)})  # 4 MB into 256 kB
    assert not (tiny_tmpfs / "checkpoint.pt.tmp").exists()
    assert torch.equal(torch.load(path)["a"], torch.zeros(10))


# -- item 9: nothing created by a failed start, TensorBoard events, EnvPool ---------------------


def test_a_failed_start_creates_nothing(tmp_path):
    with pytest.raises(ValueError, match="unknown environment id"):
        run(small(env_id="NoSuchEnv-v0"), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda'.*CUDA is not available"):
            run(small(device="cuda"), tmp_path / "b")
        assert not (tmp_path / "b").exists()


def test_overwrite_removes_old_events_and_a_no_op_resume_adds_none(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    cfg = small(total_steps=256)
    run(cfg, tmp_path, log_tensorboard=True)
    assert len(events(tmp_path)) == 1
    time.sleep(1.1)  # event file names hold the second they were created
    run(cfg, tmp_path, overwrite=True, log_tensorboard=True)
    assert len(events(tmp_path)) == 1
    before = events(tmp_path)
    time.sleep(1.1)
    run(cfg, tmp_path, resume=True, log_tensorboard=True)  # nothing left to train
    assert events(tmp_path) == before


def test_envpool_backend_refuses_a_task_envpool_lacks():
    from trpl_fast.rl.envs import make_vec_env

    with pytest.raises(ValueError, match="EnvPool has no 'Pendulum-v1'.*--env-backend gymnasium"):
        make_vec_env("Pendulum-v1", 1, 0, backend="envpool")
