"""`trpl-fast train --seeds`: seeds trained as one batched job equal the single runs, stay
independent, write single-run directories and resume."""

import csv
import dataclasses

import pytest
import torch

from trpl_fast.cli import main
from trpl_fast.rl.config import preset
from trpl_fast.rl.multiseed import (
    StackedPolicy,
    StackedUpdater,
    StackedValue,
    clip_grad_norm_per_seed,
    find_seed_dirs,
    train_seeds,
)
from trpl_fast.rl.policies import ValueNetwork
from trpl_fast.rl.runlog import CSV_COLUMNS
from trpl_fast.rl.train import Batch, load_policy, make_policy, read_checkpoint, train

from .test_resume import interrupt_in_iteration

pytest.importorskip("gymnasium")

SEEDS = [0, 3]


def small(algo, **kw):
    # bounds small and lr large enough that the layer projects within one iteration
    args = dict(
        env_id="Pendulum-v1",
        total_steps=256,
        rollout_steps=256,
        num_envs=2,
        epochs=2,
        epochs_vf=1,
        minibatch_size=64,
        eval_episodes=1,
        eval_in_background=False,  # in-process: the worker's start-up per run (tests/rl/test_background_eval.py)
        device="cpu",
        env_backend="gymnasium",
        checkpoint_every=1,
    )
    if algo in ("kl", "w2", "frob"):
        args.update(lr=3e-3, mean_bound=1e-3, cov_bound=1e-4)
    args.update(kw)
    return preset("mujoco", algo, **args)


def assert_close_tree(a, b, path="", rtol=1e-5):
    """Tensors equal to ``rtol`` of the tensor's scale; everything else exactly."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_close_tree(a[k], b[k], f"{path}.{k}", rtol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_tree(x, y, f"{path}[{i}]", rtol)
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, path
        if a.is_floating_point() and a.numel():
            scale = b.abs().max().clamp_min(1e-12)
            assert ((a - b).abs().max() / scale).item() <= rtol, path
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rtol, abs=1e-9), path
    elif type(a).__module__.startswith("numpy"):
        import numpy as np

        if isinstance(a, np.random.Generator):
            assert a.bit_generator.state == b.bit_generator.state, path
        else:
            assert np.allclose(a, b, rtol=rtol, atol=1e-9), path
    elif not isinstance(a, bytes):  # bytes: a compressed MjData (float state, compared through the rest)
        assert a == b, path


@pytest.mark.parametrize(
    "algo,extra",
    [
        ("kl", {}),
        ("ppo", {}),  # reward normalization, value clipping, lr decay
        # contextual: the mean head's bias gradient nearly cancels (|m| ~ 2e-5 against ~1e-3
        # elsewhere), so the stacked backward's other summation order shows at 1e-4 of it
        ("w2", {"contextual_cov": True, "rtol": 1e-3}),
        ("frob", {"max_grad_norm": 0.05, "entropy_control": "eq", "target_entropy": -0.5}),
        ("ppo-m", {"advantage_normalization": "batch"}),
        ("kl", {"env_id": "Hopper-v5", "num_envs": 1}),  # MuJoCo: its environment states compared too
    ],
)
def test_each_seed_equals_its_single_run(algo, extra, tmp_path):
    extra = dict(extra)
    rtol = extra.pop("rtol", 1e-5)
    cfg = small(algo, **extra)
    rows = train_seeds(cfg, SEEDS, tmp_path / "batch", progress=False, log_tensorboard=False)
    assert find_seed_dirs(tmp_path / "batch") == SEEDS
    for seed in SEEDS:
        single = train(
            dataclasses.replace(cfg, seed=seed), tmp_path / f"s{seed}", progress=False, log_tensorboard=False
        )
        a, b = read_checkpoint(tmp_path / "batch" / f"seed{seed}"), read_checkpoint(tmp_path / f"s{seed}")
        assert a["config"] == b["config"] and a["config"]["seed"] == seed
        wall_a, wall_b = a["loop"].pop("wall_time"), b["loop"].pop("wall_time")
        assert wall_a > 0 and wall_b > 0
        assert_close_tree(a, b, rtol=rtol)  # networks, Adam moments, normalizers, rng states, open episodes, envs
        for key in ("policy_loss", "value_loss"):
            # the policy loss is a near-cancelling mean: compare at the scale of the value loss too
            assert rows[seed][0][key] == pytest.approx(single[0][key], rel=1e-5, abs=1e-6), key
        for key in ("kl_mean", "kl_max", "entropy_mean", "fraction_projected", "eval_return_mean", "episodes"):
            assert rows[seed][0][key] == pytest.approx(single[0][key], rel=1e-5, abs=1e-9), key
        if algo in ("kl", "w2", "frob"):
            assert rows[seed][0]["fraction_projected"] > 0  # the layer did work
        with open(tmp_path / "batch" / f"seed{seed}" / "progress.csv") as f:
            assert csv.DictReader(f).fieldnames == CSV_COLUMNS


def test_one_envpool_for_all_seeds_and_one_for_all_evaluations_equal_the_single_runs(tmp_path):
    pytest.importorskip("envpool")
    from trpl_fast.rl.multiseed import SeedEnvs, StackedEvaluator

    cfg = small("kl", env_id="Hopper-v5", env_backend="envpool", num_envs=2, eval_episodes=2)
    seeds = [4, 9]  # one pool of 4 sub-envs seeded 4, 5, 9, 10, as the two runs seed theirs
    envs = SeedEnvs([dataclasses.replace(cfg, seed=s) for s in seeds])
    assert envs.fused is not None and envs.reset().shape == (2, 2, envs.obs_dim)
    envs.close()
    evaluator = StackedEvaluator(cfg, seeds, 0)
    assert evaluator.fused is not None and not evaluator.evaluators
    evaluator.close()
    rows = train_seeds(cfg, seeds, tmp_path / "batch", progress=False, log_tensorboard=False)
    for seed in seeds:
        single = train(
            dataclasses.replace(cfg, seed=seed), tmp_path / f"s{seed}", progress=False, log_tensorboard=False
        )
        a, b = read_checkpoint(tmp_path / "batch" / f"seed{seed}"), read_checkpoint(tmp_path / f"s{seed}")
        a["loop"].pop("wall_time"), b["loop"].pop("wall_time")
        assert a["envs"] is None and b["envs"] is None
        assert_close_tree(a, b)
        # the first evaluation's episodes start where the single run's do
        assert rows[seed][0]["eval_return_mean"] == pytest.approx(single[0]["eval_return_mean"], rel=1e-5)


def test_seeds_are_independent():
    """Perturbing seed 1's data changes seed 1's gradients only."""
    torch.manual_seed(0)
    cfg = small("kl", contextual_cov=True)
    S, B, od, ad = 3, 16, 5, 2
    pol = StackedPolicy([make_policy(cfg, od, ad) for _ in range(S)])
    val = StackedValue([ValueNetwork(od) for _ in range(S)])
    from trpl_fast.projection import TrustRegionProjection

    layer = TrustRegionProjection("kl", 1e-3, 1e-4, contextual_cov=True, regression_weight=8.0, check_values=False)
    up = StackedUpdater(cfg, [0, 1, 2], pol, val, None, None, layer)
    obs, actions = torch.randn(S, B, od), torch.randn(S, B, ad)
    with torch.no_grad():
        old_mean, old_cov = pol(obs)
        old_mean, old_cov = old_mean + 0.1 * torch.randn_like(old_mean), old_cov * 1.1
    weight = torch.ones(S, B)
    weight[:, -2:] = 0
    b = Batch(
        obs=obs,
        actions=actions,
        advantages=torch.randn(S, B),
        returns=torch.randn(S, B),
        values=torch.randn(S, B),
        weight=weight,
        old_mean=old_mean,
        old_cov=old_cov,
        old_logp=pol.log_prob(old_mean, old_cov, actions),
    )

    def grads(batch):
        pol.zero_grad()
        val.zero_grad()
        loss = up.policy_losses(
            pol,
            batch.obs,
            batch.actions,
            batch.advantages,
            batch.weight,
            batch.old_mean,
            batch.old_cov,
            batch.old_logp,
            None,
        ).sum()
        loss = loss + up.value_losses(val, batch.obs, batch.returns, batch.values, batch.weight).sum()
        loss.backward()
        return [p.grad.clone() for p in (*pol.parameters(), *val.parameters())]

    g0 = grads(b)
    perturbed = dataclasses.replace(b, obs=b.obs.clone(), advantages=b.advantages.clone(), returns=b.returns.clone())
    perturbed.obs[1] += 1.0
    perturbed.advantages[1] *= -3.0
    perturbed.returns[1] += 5.0
    g1 = grads(perturbed)
    for x, y in zip(g0, g1):
        assert torch.equal(x[0], y[0]) and torch.equal(x[2], y[2])
    assert any(not torch.allclose(x[1], y[1]) for x, y in zip(g0, g1))


def test_per_seed_gradient_clipping_equals_torch_per_module():
    torch.manual_seed(1)
    nets = [torch.nn.Linear(4, 3) for _ in range(3)]
    w = torch.nn.Parameter(torch.stack([n.weight.detach() for n in nets]))
    bias = torch.nn.Parameter(torch.stack([n.bias.detach() for n in nets]))
    x = torch.randn(3, 8, 4) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)  # one seed under the norm, two over
    for k, n in enumerate(nets):
        n(x[k]).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_(n.parameters(), 1.0)
    torch.baddbmm(bias.unsqueeze(1), x, w.mT).pow(2).sum().backward()
    clip_grad_norm_per_seed([w, bias], 1.0)
    for k, n in enumerate(nets):
        torch.testing.assert_close(w.grad[k], n.weight.grad)
        torch.testing.assert_close(bias.grad[k], n.bias.grad)


def test_resume_continues_the_batch_exactly_and_seed_dirs_are_single_runs(tmp_path):
    cfg = small("kl", total_steps=512)
    full = train_seeds(cfg, SEEDS, tmp_path / "full", progress=False, log_tensorboard=False)
    half = dataclasses.replace(cfg, total_steps=256)
    train_seeds(half, SEEDS, tmp_path / "part", progress=False, log_tensorboard=False)
    resumed = train_seeds(cfg, SEEDS, tmp_path / "part", resume=True, progress=False, log_tensorboard=False)
    for seed in SEEDS:
        a, b = read_checkpoint(tmp_path / "full" / f"seed{seed}"), read_checkpoint(tmp_path / "part" / f"seed{seed}")
        torch.testing.assert_close(a["policy"], b["policy"], rtol=0, atol=0)
        torch.testing.assert_close(a["opt_pi"]["state"], b["opt_pi"]["state"], rtol=0, atol=0)
        assert [r["policy_loss"] for r in resumed[seed]] == [r["policy_loss"] for r in full[seed]]
        # a seed's directory is a single run: it loads, and resumes alone
        cfg_k, policy, obs_norm = load_policy(tmp_path / "part" / f"seed{seed}")
        assert cfg_k.seed == seed and obs_norm is not None
    more = dataclasses.replace(cfg, total_steps=768, seed=SEEDS[1])
    rows = train(more, tmp_path / "part" / f"seed{SEEDS[1]}", resume=True, progress=False, log_tensorboard=False)
    assert len(rows) == 3


def test_ctrl_c_checkpoints_every_seed_and_the_batch_resumes_exactly(tmp_path, monkeypatch):
    import trpl_fast.rl.multiseed as M

    cfg = small("ppo", total_steps=768)
    full = train_seeds(cfg, SEEDS, tmp_path / "full", progress=False, log_tensorboard=False)
    interrupt_in_iteration(monkeypatch, 1, loop=M)  # Ctrl-C in the second iteration's advantages
    with pytest.raises(KeyboardInterrupt):
        train_seeds(cfg, SEEDS, tmp_path / "cut", progress=False, log_tensorboard=False)
    for seed in SEEDS:
        ckpt = read_checkpoint(tmp_path / "cut" / f"seed{seed}")
        assert ckpt["interrupted"] and ckpt["iteration"] == 1
    monkeypatch.undo()
    resumed = train_seeds(cfg, SEEDS, tmp_path / "cut", resume=True, progress=False, log_tensorboard=False)
    for seed in SEEDS:
        assert [r["policy_loss"] for r in resumed[seed]] == [r["policy_loss"] for r in full[seed]]
        a, b = read_checkpoint(tmp_path / "full" / f"seed{seed}"), read_checkpoint(tmp_path / "cut" / f"seed{seed}")
        torch.testing.assert_close(a["policy"], b["policy"], rtol=0, atol=0)
        torch.testing.assert_close(a["rew_norm"], b["rew_norm"], rtol=0, atol=0)


def test_cli_seeds_train_resume_and_errors(tmp_path, capsys):
    out = tmp_path / "b"
    base = [
        "train",
        "--env",
        "Pendulum-v1",
        "--env-backend",
        "gymnasium",
        "--device",
        "cpu",
        "--no-progress",
        "--set",
        "rollout_steps=128",
        "--set",
        "epochs=1",
        "--set",
        "epochs_vf=1",
        "--set",
        "minibatch_size=64",
        "--set",
        "eval_episodes=1",
    ]
    assert main([*base, "--steps", "128", "--seeds", "1", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["seed1", "seed2"]
    assert main(["train", "--resume", str(out), "--steps", "256", "--no-progress"]) == 0
    assert len(read_checkpoint(out / "seed2")["config"]) and read_checkpoint(out / "seed2")["iteration"] == 2
    assert main(["eval", str(out / "seed1"), "--episodes", "1", "--device", "cpu"]) == 0
    pytest.importorskip("matplotlib")
    assert main(["plot", str(out / "seed1"), str(out / "seed2"), "--out", str(tmp_path / "plots" / "c.png")]) == 0
    capsys.readouterr()
    for argv, message in [
        ([*base, "--seeds", "0", "1", "--algo", "trpo", "--out", str(tmp_path / "x")], "algo 'trpo' is not supported"),
        ([*base, "--seeds", "0", "--set", "cov_form=full", "--out", str(tmp_path / "x")], "cov_form 'full'"),
        ([*base, "--seeds", "0", "0", "--out", str(tmp_path / "x")], "each seed at most once"),
        ([*base, "--seeds", "0", "--seed", "1", "--out", str(tmp_path / "x")], "--seed and --seeds"),
        ([*base, "--seeds", "1", "2", "--out", str(out)], "already hold runs"),
        (["train", "--resume", str(out), "--seeds", "1", "5"], "the batch there has seeds 1 2"),
    ]:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "algo,extra",
    [("kl", {}), ("ppo", {"max_grad_norm": 0.05})],
    ids=["kl", "ppo-clipped"],
)
def test_compiled_batched_steps_agree_with_eager(algo, extra, tmp_path):
    """The batched one-graph steps (per-seed clipping, the projection through torch.func)
    give each seed the eager batched step's parameters and losses."""
    cfg = small(algo, eval_episodes=0, **extra)
    out = {}
    for compiled in (False, True):
        c = dataclasses.replace(cfg, compile_update=compiled)
        rows = train_seeds(c, SEEDS, tmp_path / str(compiled), progress=False, log_tensorboard=False)
        out[compiled] = (rows, [read_checkpoint(tmp_path / str(compiled) / f"seed{s}") for s in SEEDS])
    (rows_e, ck_e), (rows_c, ck_c) = out[False], out[True]
    for seed, a, b in zip(SEEDS, ck_e, ck_c):
        for net in ("policy", "value"):
            for name, t in a[net].items():
                assert torch.allclose(b[net][name], t, rtol=1e-4, atol=1e-5), f"seed {seed} {net}.{name}"
        assert rows_c[seed][0]["policy_loss"] == pytest.approx(rows_e[seed][0]["policy_loss"], rel=1e-3, abs=1e-5)
        assert rows_c[seed][0]["value_loss"] == pytest.approx(rows_e[seed][0]["value_loss"], rel=1e-4)
