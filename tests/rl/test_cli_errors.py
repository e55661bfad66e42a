"""A user's mistake gets one ``error:`` line naming the argument or file and exit code 2,
never a traceback -- and a failed start leaves nothing behind."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from trpl_fast.cli import main

pytest.importorskip("gymnasium")

PENDULUM = ["--env", "Pendulum-v1", "--algo", "ppo-m", "--env-backend", "gymnasium", "--no-progress"]


def error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert lines and "Traceback" not in err, err
    return lines[0]


def _truncated(path):
    torch.save({"config": {}, "policy": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_CHECKPOINTS = {
    "truncated": _truncated,
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(b"\x00\x01 not a checkpoint at all \xff" * 10),
    "not-a-checkpoint": lambda p: torch.save([1, 2, 3], p),
    "bad-config": lambda p: torch.save({"config": {"no_such_field": 1}, "policy": {}}, p),
}


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint(kind, command, tmp_path, capsys):
    BAD_CHECKPOINTS[kind](tmp_path / "checkpoint.pt")
    argv = (
        ["train", "--resume", str(tmp_path), "--no-progress"]
        if command == "train"
        else ["eval", str(tmp_path), "--device", "cpu"]
    )
    assert main(argv) == 2
    assert str(tmp_path / "checkpoint.pt") in error_line(capsys)


@pytest.mark.parametrize("device,message", [("tpu", "device 'tpu'"), ("cuda", "device 'cuda'")])
def test_bad_device(device, message, tmp_path, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    assert main(["train", *PENDULUM, "--device", device, "--out", str(tmp_path / "run")]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "run").exists()
    assert main(["eval", str(tmp_path / "run"), "--device", device]) == 2
    assert message in error_line(capsys)


def test_zero_envs(tmp_path, capsys):
    assert main(["train", *PENDULUM, "--num-envs", "0", "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    assert "config field num_envs: must be a finite number > 0, got 0" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_out_names_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["train", *PENDULUM, "--device", "cpu", "--out", str(tmp_path / "file")]) == 2
    line = error_line(capsys)
    assert str(tmp_path / "file") in line and "is a file" in line and "--out" in line


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (root ignores permission bits, not a read-only mount)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs here, and root ignores permission bits")
        mnt.chmod(0o555)
        yield mnt
        mnt.chmod(0o755)
        return
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("sub", ["", "run"])
def test_out_in_a_read_only_directory(sub, read_only_dir, capsys):
    out = read_only_dir / sub if sub else read_only_dir
    assert main(["train", *PENDULUM, "--device", "cpu", "--out", str(out)]) == 2
    line = error_line(capsys)
    assert "--out" in line and "not writable" in line and str(read_only_dir) in line


@pytest.mark.parametrize("option", ["--batch", "--repeats", "--dim"])
def test_demo_needs_positive_sizes(option, capsys):
    assert main(["demo", option, "0", "--device", "cpu"]) == 2
    assert f"{option} must be >= 1, got 0" in error_line(capsys)


def test_demo_bad_device(capsys):
    assert main(["demo", "--device", "tpu", "--batch", "8"]) == 2
    assert "--device must be auto, cpu or cuda, got 'tpu'" in error_line(capsys)


def test_demo_times_the_reference_on_a_subset(capsys):
    assert main(["demo", "--batch", "300", "--dim", "2", "--repeats", "1", "--device", "cpu"]) == 0
    assert "float64 reference timed on 256 of the 300 rows" in capsys.readouterr().out


def _run_dir(d: Path):
    d.mkdir()
    (d / "config.json").write_text('{"env_id": "Pendulum-v1", "algo": "kl"}')
    (d / "progress.csv").write_text("iteration,global_step,eval_return_mean,kl_mean\n0,256,-1.0,0.01\n")
    return d


@pytest.mark.parametrize(
    "name,content",
    [
        ("config.json", "{not json"),
        ("config.json", "[]"),
        ("progress.csv", "iteration,global_step\n0,abc\n"),
        ("progress.csv", "iteration,global_step\n0\n"),
    ],
)
def test_plot_names_the_bad_file(name, content, tmp_path, capsys):
    d = _run_dir(tmp_path / "run")
    (d / name).write_text(content)
    assert main(["plot", str(d), "--out", str(tmp_path / "plots" / "c.png")]) == 2
    assert str(d / name) in error_line(capsys)


def test_resume_names_a_bad_progress_csv(tmp_path, capsys):
    from trpl_fast.rl.config import preset
    from trpl_fast.rl.train import train

    cfg = preset(
        "mujoco",
        "ppo-m",
        env_id="Pendulum-v1",
        total_steps=256,
        rollout_steps=256,
        num_envs=2,
        epochs=1,
        epochs_vf=1,
        minibatch_size=128,
        eval_episodes=0,
        device="cpu",
        env_backend="gymnasium",
    )
    train(cfg, tmp_path, progress=False, log_tensorboard=False)
    (tmp_path / "progress.csv").write_text("iteration,global_step\n0,abc\n")
    assert main(["train", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert str(tmp_path / "progress.csv") in error_line(capsys)


def test_mujoco_log_is_not_tracked():
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", "--no-index", "MUJOCO_LOG.TXT"])
    tracked = subprocess.run(
        ["git", "-C", str(root), "ls-files", "--error-unmatch", "MUJOCO_LOG.TXT"], capture_output=True
    )
    assert ignored.returncode == 0 and tracked.returncode != 0
