"""The contextual-covariance experiment (paper Figure 2, right) end to end at toy size, and
the table-4 preset it uses."""

import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from trpl_fast.cli import main  # noqa: E402
from trpl_fast.rl.config import preset  # noqa: E402
from trpl_fast.rl.experiment import reacher_experiment, results_table  # noqa: E402

TOY = dict(num_envs=4, rollout_steps=256, epochs=1, epochs_vf=1, minibatch_size=128, eval_episodes=2)


def test_reacher_preset_is_table_4():
    kl_g, kl_c = preset("reacher", "kl"), preset("reacher", "kl", contextual_cov=True)
    assert kl_g.env_id == "trpl_fast/ReacherSparse5-v0" and kl_g.rollout_steps == 16384
    assert (kl_g.cov_bound, kl_c.cov_bound) == (5e-5, 1e-3)  # "5e-5 | 1e-3" for KL in table 4
    assert preset("reacher", "frob").cov_bound == 5e-5 and preset("reacher", "w2").cov_bound == 1e-3
    ppo = preset("reacher", "ppo")
    assert (ppo.lr, ppo.lr_vf, ppo.minibatch_size, ppo.normalize_rewards) == (1e-4, 1e-4, 512, True)
    assert (kl_g.lr, kl_g.lr_vf, kl_g.minibatch_size, kl_g.epochs, kl_g.epochs_vf) == (3e-4, 4.5e-4, 256, 20, 10)
    assert kl_g.time_limit_terminal and not preset("mujoco", "kl").time_limit_terminal


def test_reacher_experiment_trains_plots_tabulates_and_skips_finished_runs(tmp_path, capsys):
    table = reacher_experiment(tmp_path, steps=512, seeds=2, algos=["ppo", "kl"], jobs=1, **TOY)
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == [f"{a}_{c}_s{s}" for a in ("kl", "ppo") for c in ("contextual", "global") for s in (0, 1)]
    for name in ("figure2_right_returns.png", "figure2_right_kl.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results.md").read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| ppo") or line.startswith("| kl")]
    assert len(rows) == 2 and all(line.count("(n=2)") == 2 for line in rows)
    capsys.readouterr()
    reacher_experiment(tmp_path, steps=512, seeds=2, algos=["ppo", "kl"], jobs=1, **TOY)
    assert capsys.readouterr().out.count("already finished") == 8


def test_results_table_and_bad_input(capsys):
    table = results_table({("kl", False): [-10.0, -12.0], ("kl", True): [-8.0, -6.0]}, 1000)
    assert "| kl | -11.00 +- 1.96 (n=2) | -7.00 +- 1.96 (n=2) | +4.00 |" in table
    with pytest.raises(ValueError, match="algos must be among"):
        reacher_experiment("unused", algos=["trpo"])
    assert main(["experiment", "reacher", "--seeds", "0"]) == 2
    assert "seeds and steps must be >= 1" in capsys.readouterr().err


def test_cli_normalize_rewards_reaches_every_run(tmp_path, monkeypatch):
    seen = {}

    def fake(out, **kw):
        seen.update(kw)
        return ""

    monkeypatch.setattr("trpl_fast.rl.experiment.reacher_experiment", fake)
    assert main(["experiment", "reacher", "--out", str(tmp_path), "--normalize-rewards"]) == 0
    assert seen["normalize_rewards"] is True
    seen.clear()
    assert main(["experiment", "reacher", "--out", str(tmp_path)]) == 0
    assert "normalize_rewards" not in seen  # table 4 as it is: the preset decides per method
