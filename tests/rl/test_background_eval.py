"""Evaluation in a worker process beside training (``eval_in_background``, the default): the
same returns as evaluating in the training process, rows written in order once their
evaluation is in, checkpoints that always match ``progress.csv`` (Ctrl-C waits for the
evaluation in flight), and a fall-back to the training process when the worker cannot
start or dies."""

import dataclasses
import functools
import math
import os
import subprocess
import time

import pytest
import torch

from trpl_fast.rl.evaluation import BackgroundEvaluator
from trpl_fast.rl.multiseed import train_seeds

from .test_resume import assert_same_state, interrupt_in_iteration, progress, run, small

pytest.importorskip("gymnasium")


def in_background(cfg, on=True):
    return dataclasses.replace(cfg, eval_in_background=on)


def test_rows_and_state_equal_the_in_process_evaluation(tmp_path):
    cfg = small("kl", eval_episodes=2, total_steps=1024, checkpoint_every=3)
    rows_here = run(in_background(cfg, False), tmp_path / "here")
    rows_bg = run(in_background(cfg), tmp_path / "background")
    assert [r["iteration"] for r in rows_bg] == [0, 1, 2, 3]
    assert all(math.isfinite(r["eval_return_mean"]) for r in rows_bg)  # every row evaluated
    assert progress(tmp_path / "background") == progress(tmp_path / "here")
    assert [r["eval_return_mean"] for r in rows_bg] == [r["eval_return_mean"] for r in rows_here]
    assert_same_state(tmp_path / "here", tmp_path / "background")


def test_many_seeds_rows_equal_the_in_process_evaluation(tmp_path):
    cfg = small("ppo", eval_episodes=1, total_steps=768, eval_every=2)
    seeds = [0, 3]
    train_seeds(in_background(cfg, False), seeds, tmp_path / "here", progress=False, log_tensorboard=False)
    bg = train_seeds(in_background(cfg), seeds, tmp_path / "bg", progress=False, log_tensorboard=False)
    for s in seeds:
        assert progress(tmp_path / "bg" / f"seed{s}") == progress(tmp_path / "here" / f"seed{s}")
        evaluated = [r["iteration"] for r in bg[s] if math.isfinite(r["eval_return_mean"])]
        assert evaluated == [1, 2]  # every second iteration and the last


def test_ctrl_c_waits_for_the_evaluation_in_flight_then_resumes_bit_for_bit(tmp_path, monkeypatch):
    cfg = in_background(small("kl", checkpoint_every=3))
    run(cfg, tmp_path / "full")
    # Ctrl-C in iteration 2: iteration 1's evaluation is still running in the worker
    interrupt_in_iteration(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut")
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert ckpt["interrupted"] and ckpt["iteration"] == 2 and len(progress(tmp_path / "cut")) == 2
    monkeypatch.undo()
    run(cfg, tmp_path / "cut", resume=True)
    assert progress(tmp_path / "cut") == progress(tmp_path / "full")
    assert_same_state(tmp_path / "full", tmp_path / "cut")


def test_a_worker_that_cannot_start_falls_back_to_the_training_process(tmp_path, monkeypatch):
    cfg = small("ppo", eval_episodes=1, total_steps=512)
    run(in_background(cfg, False), tmp_path / "here")

    def refuse(*args, **kw):
        raise OSError("no processes left")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    with pytest.warns(RuntimeWarning, match="evaluating in the training process"):
        run(in_background(cfg), tmp_path / "fallback")
    assert progress(tmp_path / "fallback") == progress(tmp_path / "here")


class Doubling:
    """A stand-in evaluator (picklable, instant): twice the iteration, or an error."""

    def __init__(self, fail_at=None):
        self.fail_at = fail_at

    def __call__(self, policy, obs_norm, iteration):
        if iteration == self.fail_at:
            raise ValueError(f"no evaluation at iteration {iteration}")
        return 2.0 * iteration

    def close(self):
        pass


def test_results_come_back_in_order_and_errors_with_the_worker_traceback():
    ev = BackgroundEvaluator(functools.partial(Doubling, fail_at=2))
    try:
        for it in (0, 1):
            ev.submit(None, None, it)
            assert ev.result() == 2.0 * it
        ev.submit(None, None, 2)
        with pytest.raises(RuntimeError, match="(?s)failed in its worker process.*no evaluation at iteration 2"):
            ev.result()
        with pytest.raises(RuntimeError, match="nothing was submitted"):
            ev.result()
        ev.submit(None, None, 3)
        with pytest.raises(RuntimeError, match="was not taken"):
            ev.submit(None, None, 4)
        assert ev.result() == 6.0
    finally:
        ev.close()
    assert ev._proc is None


def test_a_worker_that_dies_is_replaced_by_an_evaluator_here():
    ev = BackgroundEvaluator(Doubling)
    try:
        ev.submit(None, None, 1)
        assert ev.result() == 2.0
        ev._proc.kill()
        ev._proc.wait()
        with pytest.warns(RuntimeWarning, match="evaluating in the training process"):
            ev.submit(None, None, 5)  # the pipe may refuse the job, or the answer never comes
            assert ev.result() == 10.0
        ev.submit(None, None, 6)
        assert ev.result() == 12.0 and ev._local is not None
    finally:
        ev.close()


class FailsInAWorker:
    """Builds :class:`Doubling` in the process that made it, fails in any other."""

    def __init__(self):
        self.pid = os.getpid()

    def __call__(self):
        if os.getpid() != self.pid:
            raise ImportError("this environment is registered in the training script only")
        return Doubling()


def test_a_worker_that_cannot_build_the_evaluator_falls_back_naming_why():
    ev = BackgroundEvaluator(FailsInAWorker())
    try:
        ev.submit(None, None, 4)
        with pytest.warns(RuntimeWarning, match="could not build the evaluator: ImportError: this environment"):
            assert ev.result() == 8.0
        ev.submit(None, None, 5)
        assert ev.result() == 10.0
    finally:
        ev.close()


class Slow(Doubling):
    def __call__(self, policy, obs_norm, iteration):
        time.sleep(3.0)
        return super().__call__(policy, obs_norm, iteration)


def test_a_result_not_in_within_the_timeout_stops_the_worker():
    """What an interrupted run does with an evaluation that does not come back: give up
    on it after a bounded wait; the worker (whose late answer would be taken for the next
    evaluation's) is stopped, and evaluations go on in this process."""
    ev = BackgroundEvaluator(Slow)
    try:
        ev.submit(None, None, 1)
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            ev.result(timeout=0.5)
        assert time.monotonic() - t < 2.5 and ev._proc is None
        with pytest.warns(RuntimeWarning, match="it was stopped"):
            ev.submit(None, None, 2)
        assert ev.result() == 4.0
    finally:
        ev.close()


def test_the_frozen_policy_does_not_follow_later_updates():
    """A (1, n) mean head transposes without a copy: the snapshot must copy it."""
    from trpl_fast.rl.config import preset
    from trpl_fast.rl.evaluation import frozen_policy_and_normalizer
    from trpl_fast.rl.train import make_policy

    policy = make_policy(preset("mujoco", "ppo", env_id="Pendulum-v1"), 3, 1)
    frozen, _ = frozen_policy_and_normalizer(policy, None)
    before = [tuple(a.copy() for a in op) for op in frozen.numpy_mean() if isinstance(op, tuple)]
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    after = [op for op in frozen.numpy_mean() if isinstance(op, tuple)]
    assert len(after) == len(before) == 3
    for b, a in zip(before, after):
        assert all((x == y).all() for x, y in zip(b, a))


def test_many_seeds_ctrl_c_with_an_evaluation_in_flight_resumes_exactly(tmp_path, monkeypatch):
    """The batched loop: Ctrl-C in iteration 1 while iteration 0's evaluation runs in the
    worker (no checkpoint due in between) writes iteration 0's rows and checkpoints for
    every seed; the batch then resumes to the uninterrupted run's rows and state."""
    import trpl_fast.rl.multiseed as M

    cfg = in_background(small("ppo", total_steps=768, checkpoint_every=3))
    seeds = [0, 3]
    train_seeds(cfg, seeds, tmp_path / "full", progress=False, log_tensorboard=False)
    interrupt_in_iteration(monkeypatch, 1, loop=M)
    with pytest.raises(KeyboardInterrupt):
        train_seeds(cfg, seeds, tmp_path / "cut", progress=False, log_tensorboard=False)
    for s in seeds:
        ckpt = torch.load(tmp_path / "cut" / f"seed{s}" / "checkpoint.pt", weights_only=False)
        assert ckpt["interrupted"] and ckpt["iteration"] == 1
        assert len(progress(tmp_path / "cut" / f"seed{s}")) == 1
    monkeypatch.undo()
    train_seeds(cfg, seeds, tmp_path / "cut", resume=True, progress=False, log_tensorboard=False)
    for s in seeds:
        assert progress(tmp_path / "cut" / f"seed{s}") == progress(tmp_path / "full" / f"seed{s}")
        assert_same_state(tmp_path / "full" / f"seed{s}", tmp_path / "cut" / f"seed{s}")
