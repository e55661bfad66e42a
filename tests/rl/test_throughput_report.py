"""bench/throughput_report.py: the return at a fraction of the target group's wall time, the
time to the target, the copied runs (issue 11's measure)."""

from __future__ import annotations

import json

import pytest

from bench import throughput_report


def _write_run(path, walls, returns, seed):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"env_id": "HalfCheetah-v5", "algo": "kl", "seed": seed}))
    lines = ["iteration,global_step,eval_return_mean,wall_time"]
    lines += [f"{i},{1000 * (i + 1)},{r},{w}" for i, (w, r) in enumerate(zip(walls, returns))]
    (path / "progress.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture()
def runs(tmp_path):
    # the slow group: evaluations every 10 s up to 300 s, returns = wall time (final 20: 110..300)
    for seed in (0, 1):
        walls = [10.0 * (i + 1) for i in range(30)]
        _write_run(tmp_path / f"slow_s{seed}", walls, walls, seed)
    # the fast group: every 5 s up to 100 s, returns = 3 x wall time (+ seed)
    for seed in (0, 1):
        walls = [5.0 * (i + 1) for i in range(20)]
        _write_run(tmp_path / f"fast_s{seed}", walls, [3 * w + seed for w in walls], seed)
    return tmp_path


def test_fraction_target_and_copied_runs(runs, tmp_path):
    out = tmp_path / "report"
    report = throughput_report.main(
        [
            "--groups",
            f"slow={runs}/slow_s*",
            f"fast={runs}/fast_s*",
            "--target-group",
            "slow",
            "--times",
            "50",
            "--copy-runs",
            "--out",
            str(out),
        ]
    )
    assert report["target"] == pytest.approx(205.0)  # mean of 110..300
    assert report["target_wall_s"] == pytest.approx(300.0)
    fast = report["groups"]["fast"]
    # 1/3 of 300 s = 100 s: the last 5 evaluations by then are at 80..100 s -> 3 x 90 (+ seed)
    assert fast["at_fraction"]["wall_s"] == pytest.approx(100.0)
    assert fast["at_fraction"]["per_run"] == pytest.approx([270.0, 271.0])
    assert fast["at_fraction"]["mean"][0] == pytest.approx(270.5)
    assert fast["at_wall_s"]["50.0"] == pytest.approx([120.0, 121.0])  # 30..50 s
    # the mean of the 5 evaluations ending at w is 3 (w - 10) (+ seed): >= 205 first at w = 80 s
    assert fast["time_to_target_s"] == pytest.approx([80.0, 80.0])
    slow = report["groups"]["slow"]
    assert slow["at_fraction"]["per_run"] == pytest.approx([80.0, 80.0])
    assert slow["time_to_target_s"] == pytest.approx([230.0, 230.0])  # w - 20 >= 205
    assert fast["runs"] == ["runs/fast_s0", "runs/fast_s1"]
    for name in ("fast_s0", "slow_s1"):
        for f in ("config.json", "progress.csv"):
            assert (out / "runs" / name / f).read_text() == (runs / name / f).read_text()
    assert (out / "curves_wall.png").stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["groups"]["fast"]["at_fraction"]["per_run"] == [270.0, 271.0]
