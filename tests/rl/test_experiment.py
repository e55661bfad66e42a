"""The experiment runner (paper Table 1 protocol, Figure 2 right) end to end at toy size,
and the summaries it reports."""

import csv
import json
import math

import numpy as np
import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from trpl_fast.cli import main  # noqa: E402
from trpl_fast.rl.evaluation import run_summary  # noqa: E402
from trpl_fast.rl.experiment import mujoco_experiment, reacher_experiment, summary_table  # noqa: E402
from trpl_fast.rl.plotting import ci95, t975  # noqa: E402

TOY = dict(num_envs=4, rollout_steps=256, epochs=1, epochs_vf=1, minibatch_size=128, eval_episodes=2)


def test_mujoco_experiment_writes_table1_and_curves_and_skips_finished_runs(tmp_path, capsys):
    toy = dict(TOY, num_envs=2, env_backend="gymnasium")
    md = mujoco_experiment(tmp_path, envs=["Hopper-v5"], algos=["kl", "ppo"], seeds=2, steps=512, jobs=1, **toy)
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == ["Hopper_kl_s0", "Hopper_kl_s1", "Hopper_ppo_s0", "Hopper_ppo_s1"]
    assert (tmp_path / "curves_Hopper.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "table1.md").read_text() == md
    with open(tmp_path / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["env"], r["method"], r["seeds"], r["finished"], r["steps"]) for r in rows] == [
        ("Hopper-v5", "kl", "2", "2", "512"),
        ("Hopper-v5", "ppo", "2", "2", "512"),
    ]
    for r in rows:  # every iteration evaluated: both runs have "final" and "20%"
        assert math.isfinite(float(r["final_mean"])) and math.isfinite(float(r["early_mean"]))
        assert float(r["kl_max"]) >= float(r["kl_mean"]) > 0
    for d in runs:
        with open(tmp_path / d / "progress.csv") as f:
            assert all(r["eval_return_mean"] != "nan" for r in csv.DictReader(f))
    capsys.readouterr()
    mujoco_experiment(tmp_path, envs=["Hopper-v5"], algos=["kl", "ppo"], seeds=2, steps=512, jobs=1, **toy)
    assert capsys.readouterr().out.count("already finished") == 4
    # report only: nothing trains, a seed that never started is left out
    (tmp_path / "table1.md").unlink()
    again = mujoco_experiment(
        tmp_path, envs=["Hopper-v5"], algos=["kl", "ppo"], seeds=3, steps=512, jobs=1, report_only=True, **toy
    )
    assert again == md and not (tmp_path / "Hopper_kl_s2").exists()


def test_fresh_seeds_of_a_config_become_one_batched_job(tmp_path):
    from trpl_fast.rl.config import preset
    from trpl_fast.rl.experiment import plan_jobs

    def job(algo, seed, **kw):
        cfg = preset("mujoco", algo, env_id="Hopper-v5", seed=seed, **kw)
        return {"config": cfg.to_dict(), "tensorboard": False, "dir": str(tmp_path / f"{algo}{seed}{len(kw)}")}

    started = job("kl", 0)
    (tmp_path / "kl00").mkdir()
    (tmp_path / "kl00" / "checkpoint.pt").write_bytes(b"")
    batch = [
        started,
        job("kl", 1),
        job("kl", 2),
        job("ppo", 0),
        job("ppo", 1),
        job("trpo", 0),
        job("trpo", 1),
        job("kl", 3, lr=1e-4),
    ]
    planned = plan_jobs(batch, batch_seeds=True)
    batched = sorted((j["config"]["algo"], j["seeds"]) for j in planned if "seeds" in j)
    assert batched == [("kl", [1, 2]), ("ppo", [0, 1])]
    singles = sorted((j["config"]["algo"], j["config"]["seed"], j["config"]["lr"]) for j in planned if "seeds" not in j)
    assert singles == [
        ("kl", 0, 5e-5),
        ("kl", 3, 1e-4),
        ("trpo", 0, 3e-4),
        ("trpo", 1, 3e-4),
    ]  # started, alone, unbatchable
    assert plan_jobs(batch, batch_seeds=False) == batch


def test_batched_and_single_experiments_log_the_same_runs(tmp_path):
    toy = dict(TOY, num_envs=2, env_backend="gymnasium")
    kw = dict(envs=["Pendulum-v1"], algos=["kl"], seeds=2, steps=512, jobs=1, **toy)
    mujoco_experiment(tmp_path / "batched", batch_seeds=True, **kw)
    mujoco_experiment(tmp_path / "single", batch_seeds=False, **kw)
    timing = {"steps_per_second", "wall_time"}
    for seed in (0, 1):
        rows = {}
        for mode in ("batched", "single"):
            with open(tmp_path / mode / f"Pendulum_kl_s{seed}" / "progress.csv") as f:
                rows[mode] = [
                    {k: float(v) for k, v in r.items() if k not in timing and not k.startswith("time_")}
                    for r in csv.DictReader(f)
                ]
        for a, b in zip(rows["batched"], rows["single"]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6, nan_ok=True)


def test_reacher_experiment_trains_plots_tabulates(tmp_path):
    table = reacher_experiment(tmp_path, steps=512, seeds=2, algos=["ppo", "kl"], jobs=1, **TOY)
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == [f"{a}_{c}_s{s}" for a in ("kl", "ppo") for c in ("contextual", "global") for s in (0, 1)]
    for name in ("figure2_right_returns.png", "figure2_right_kl.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results.md").read_text() == table
    methods = [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| trpl_fast/")]
    assert methods == ["kl (contextual)", "kl (global)", "ppo (contextual)", "ppo (global)"]


def test_run_summary_windows():
    it = np.arange(100)
    s = run_summary(it, it.astype(float), 100)
    assert s == {"early": np.mean(np.arange(20, 40)), "final": np.mean(np.arange(80, 100)), "evaluations": 100}
    part = run_summary(it[:50], it[:50].astype(float), 100)  # unfinished: "20%" known, "final" not yet
    assert part["early"] == np.mean(np.arange(20, 40)) and math.isnan(part["final"])
    sparse = np.where(it % 2 == 1, it, np.nan)  # every 2nd iteration evaluated
    s = run_summary(it, sparse, 100)
    assert s["early"] == np.mean(np.arange(21, 60, 2)) and s["final"] == np.mean(np.arange(61, 100, 2))
    legacy = run_summary(it[:99], it[:99].astype(float), 100, finished_after=99)  # budget rounded down
    assert legacy["final"] == np.mean(np.arange(79, 99))
    short = run_summary(np.arange(5), np.arange(5.0), 5)  # fewer than 20 evaluations: all of them
    assert short["final"] == 2.0 and short["early"] == np.mean([1.0, 2, 3, 4])


def test_ci95_is_students_t():
    assert t975(2) == 4.303 and t975(39) == 2.042 and t975(40) == 2.021 and t975(1000) == 1.96
    mean, half, n = ci95([1.0, 2.0, 3.0, float("nan")])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(ci95([5.0])[1])


def fake_run(d, algo, seed, evals, total=2048 * 30):
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "env_id": "Hopper-v5",
                "algo": algo,
                "seed": seed,
                "contextual_cov": False,
                "total_steps": total,
                "rollout_steps": 2048,
            }
        )
    )
    with open(d / "progress.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "global_step", "eval_return_mean", "kl_mean", "kl_max", "wall_time"])
        for i, v in enumerate(evals):
            w.writerow([i, 2048 * (i + 1), v, 0.01, 0.02 + 0.001 * seed, 10.0 * (i + 1)])


def test_summary_table_over_seeds(tmp_path):
    for seed, base in enumerate((100.0, 200.0, 300.0)):
        fake_run(tmp_path / f"kl{seed}", "kl", seed, [base] * 30)
    fake_run(tmp_path / "ppo0", "ppo", 0, [50.0] * 27)  # unfinished, its "20%" window complete
    rows = summary_table(sorted(tmp_path.iterdir()))
    kl, ppo = rows
    assert (kl["method"], kl["seeds"], kl["finished"], kl["final_mean"]) == ("kl", 3, 3, 200.0)
    assert kl["final_ci95"] == pytest.approx(4.303 * 100.0 / math.sqrt(3))
    assert kl["kl_max"] == pytest.approx(0.022) and kl["wall_time_min"] == pytest.approx(5.0)
    assert kl["steps_per_second"] == pytest.approx(2048 / 10.0)
    assert (ppo["finished"], ppo["early_mean"]) == (0, 50.0) and math.isnan(ppo["final_mean"])


def test_experiment_cli_bad_input_and_options(tmp_path, monkeypatch, capsys):
    assert main(["experiment", "reacher", "--seeds", "0"]) == 2
    assert "seeds and steps must be >= 1" in capsys.readouterr().err
    assert main(["experiment", "mujoco", "--algos", "sac", "--out", str(tmp_path)]) == 2
    assert "algos must be among" in capsys.readouterr().err
    assert main(["experiment", "mujoco", "--set", "lr=-1", "--out", str(tmp_path)]) == 2
    assert "config field lr: must be a finite number > 0" in capsys.readouterr().err
    assert main(["experiment", "reacher", "--envs", "Hopper-v5"]) == 2
    seen = {}
    monkeypatch.setattr("trpl_fast.rl.experiment.mujoco_experiment", lambda out, **kw: seen.update(kw, out=out))
    monkeypatch.setattr("trpl_fast.rl.experiment.reacher_experiment", lambda out, **kw: seen.update(kw, out=out))
    assert (
        main(
            [
                "experiment",
                "mujoco",
                "--envs",
                "Walker2d-v5",
                "--algos",
                "kl",
                "w2",
                "--seeds",
                "5",
                "--set",
                "eval_episodes=3",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (seen["envs"], seen["algos"], seen["seeds"], seen["eval_episodes"]) == (["Walker2d-v5"], ["kl", "w2"], 5, 3)
    seen.clear()
    assert main(["experiment", "reacher", "--out", str(tmp_path), "--normalize-rewards"]) == 0
    assert seen["normalize_rewards"] is True
    seen.clear()
    assert main(["experiment", "reacher", "--out", str(tmp_path)]) == 0
    assert "normalize_rewards" not in seen  # table 4 as it is: the preset decides per method


def test_ctrl_c_stops_every_worker_after_its_checkpoint(tmp_path):
    """Ctrl-C reaches the whole process group: the workers ignore it, the parent stops them
    with SIGTERM (each checkpoints its last completed iteration), starts no further run
    and exits 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    out = tmp_path / "exp"
    cmd = [
        sys.executable,
        "-m",
        "trpl_fast.cli",
        "experiment",
        "mujoco",
        "--envs",
        "Pendulum-v1",
        "--algos",
        "ppo",
        "--seeds",
        "3",
        "--jobs",
        "2",
        "--steps",
        "200000",
        "--out",
        str(out),
        "--no-batch-seeds",
        "--set",
        "rollout_steps=256",
        "--set",
        "num_envs=2",
        "--set",
        "epochs=1",
        "--set",
        "epochs_vf=1",
        "--set",
        "eval_episodes=0",
        "--set",
        "env_backend=gymnasium",
        "--set",
        "checkpoint_seconds=0",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    runs = [out / f"Pendulum_ppo_s{s}" for s in (0, 1)]
    while time.time() < deadline:
        if all((r / "checkpoint.pt").exists() for r in runs):
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the runs never checkpointed: " + proc.communicate()[1].decode()[-2000:])
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the experiment did not stop after Ctrl-C")
    assert proc.returncode == 130, err.decode()[-2000:]
    assert "run the same command to continue" in err.decode()
    for r in runs:
        ckpt = torch.load(r / "checkpoint.pt", weights_only=False)
        assert ckpt["interrupted"] is True, f"{r.name}: iteration {ckpt['iteration']}\n" + err.decode()[-3000:]
    assert not (out / "Pendulum_ppo_s2").exists()  # no further run was started
    with pytest.raises(ProcessLookupError):  # nothing left behind in the group
        time.sleep(1)
        os.killpg(proc.pid, 0)
