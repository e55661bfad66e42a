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
            "--pairs",
            "fast:slow",
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
    assert fast["runs"] == ["runs/fast/fast_s0", "runs/fast/fast_s1"]
    for group, name in (("fast", "fast_s0"), ("slow", "slow_s1")):
        for f in ("config.json", "progress.csv"):
            assert (out / "runs" / group / name / f).read_text() == (runs / name / f).read_text()
    # paired by seed: fast - slow at 100 s (270 / 271 - 80) and final (mean of the last 20)
    pair = report["pairs"]["fast - slow"]
    assert pair["seeds"] == [0, 1]
    assert pair["at_fraction"]["per_seed"] == pytest.approx([190.0, 191.0])
    assert pair["at_fraction"]["mean"][0] == pytest.approx(190.5)
    assert pair["final"]["per_seed"] == pytest.approx([3 * 52.5 - 205.0, 3 * 52.5 + 1 - 205.0])
    # against the target, as two sets of seeds: fast at 100 s (270, 271) - slow final (205, 205);
    # Welch: se = sqrt(0.5 / 2 + 0 / 2) = 0.5 on 1 degree of freedom (t = 12.706)
    vs = fast["at_fraction_vs_target"]
    assert vs["difference"] == pytest.approx([65.5, 12.706 * 0.5])
    assert vs["ratio"] == pytest.approx(270.5 / 205.0)
    assert (out / "curves_wall.png").stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["groups"]["fast"]["at_fraction"]["per_run"] == [270.0, 271.0]


def test_target_wall_time_given_instead_of_measured(runs, tmp_path, capsys):
    # the target group's runs timed before a change of the code: their wall time less a saving
    args = ["--groups", f"slow={runs}/slow_s*", f"fast={runs}/fast_s*", "--target-group", "slow"]
    report = throughput_report.main([*args, "--target-wall-s", "240", "--out", str(tmp_path / "r")])
    assert report["target_wall_s"] == 240.0
    assert report["target_group_mean_wall_s"] == pytest.approx(300.0)
    # 1/3 of 240 s = 80 s: the fast runs' evaluations at 60..80 s -> 3 x 70 (+ seed)
    assert report["groups"]["fast"]["at_fraction"]["wall_s"] == pytest.approx(80.0)
    assert report["groups"]["fast"]["at_fraction"]["per_run"] == pytest.approx([210.0, 211.0])
    assert report["target"] == pytest.approx(205.0)  # the target return is unchanged
    for bad in ("0", "-5", "nan"):
        with pytest.raises(SystemExit):
            throughput_report.main([*args, "--target-wall-s", bad, "--out", str(tmp_path / "bad")])
        assert "--target-wall-s must be a positive number of seconds" in capsys.readouterr().err


def test_copied_runs_of_the_same_name_stay_apart(tmp_path):
    # two probes name their runs alike: each group's copy keeps its own files
    for probe, ret in (("probe_a", 100.0), ("probe_b", 200.0)):
        _write_run(tmp_path / probe / "Hopper_before_s0", [10.0, 20.0], [ret, ret], 0)
    out = tmp_path / "report"
    report = throughput_report.main(
        [
            "--groups",
            f"a={tmp_path}/probe_a/Hopper_before_s*",
            f"b={tmp_path}/probe_b/Hopper_before_s*",
            "--target-group",
            "a",
            "--copy-runs",
            "--out",
            str(out),
        ]
    )
    assert report["groups"]["a"]["runs"] == ["runs/a/Hopper_before_s0"]
    assert report["groups"]["b"]["runs"] == ["runs/b/Hopper_before_s0"]
    for group, probe in (("a", "probe_a"), ("b", "probe_b")):
        copied = out / "runs" / group / "Hopper_before_s0" / "progress.csv"
        assert copied.read_text() == (tmp_path / probe / "Hopper_before_s0" / "progress.csv").read_text()


def test_pairs_match_seeds_not_order_and_need_two(tmp_path, capsys):
    # "new" lists seed 2 before seed 1 (a directory order); every run returns 100 x seed, +7 in "new"
    for group, seeds, offset in (("old", (0, 1, 2), 0.0), ("new", (2, 1), 7.0)):
        for k, seed in enumerate(seeds):
            _write_run(tmp_path / group / f"run{k}", [10.0, 20.0], [100.0 * seed + offset] * 2, seed)
    args = ["--groups", f"old={tmp_path}/old/*", f"new={tmp_path}/new/*", "--target-group", "old"]
    report = throughput_report.main([*args, "--pairs", "new:old", "--out", str(tmp_path / "r")])
    assert report["pairs"]["new - old"]["seeds"] == [1, 2]
    assert report["pairs"]["new - old"]["final"]["per_seed"] == pytest.approx([7.0, 7.0])
    with pytest.raises(SystemExit):
        throughput_report.main([*args, "--pairs", "new:missing", "--out", str(tmp_path / "r")])
    assert "--pairs new:missing: expected NEW:OLD" in capsys.readouterr().err
    _write_run(tmp_path / "one" / "run0", [10.0, 20.0], [1.0, 1.0], 0)
    with pytest.raises(SystemExit):  # shares only seed 0 with "old": no interval
        throughput_report.main(
            ["--groups", f"old={tmp_path}/old/*", f"one={tmp_path}/one/*", "--target-group", "old"]
            + ["--pairs", "one:old", "--out", str(tmp_path / "r")]
        )
    assert "share 1 seed(s); a paired interval needs 2" in capsys.readouterr().err


def test_welch_interval():
    # var(a) = 5 / 3 over 4, var(b) = 4 over 3: se^2 = 5 / 12 + 4 / 3 = 1.75;
    # df = 1.75^2 / ((5 / 12)^2 / 3 + (4 / 3)^2 / 2) = 3.23 -> the table's 3: t = 3.182
    diff, half = throughput_report.welch_ci95([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0])
    assert diff == pytest.approx(-1.5)
    assert half == pytest.approx(3.182 * 1.75**0.5)
    # non-finite values are left out; one value or no spread at all gives no interval
    assert throughput_report.welch_ci95([1.0, 2.0, 3.0, 4.0, float("nan")], [2.0, 4.0, 6.0]) == pytest.approx(
        (diff, half)
    )
    d1, h1 = throughput_report.welch_ci95([1.0], [2.0, 4.0])
    assert d1 == pytest.approx(-2.0) and h1 != h1
    d2, h2 = throughput_report.welch_ci95([3.0, 3.0], [1.0, 1.0])
    assert d2 == pytest.approx(2.0) and h2 != h2
