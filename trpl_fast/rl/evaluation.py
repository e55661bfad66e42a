"""Deterministic evaluation (the paper's protocol) and the summaries it feeds.

The paper evaluates the policy's mean action for five episodes after every iteration and
reports, per run, the mean of the last 20 evaluations ("final") and of the 20 evaluations
after 20% of training ("20%"), then the mean and 95% interval over seeds (its Table 1).

:class:`Evaluator` keeps one batched environment of ``episodes`` sub-environments for the
whole run (EnvPool's HalfCheetah takes ~250 ms to build, more than an evaluation) and
draws new start states for every evaluation from a seed stream disjoint from the training
environments': with the Gymnasium backend each evaluation reseeds with
:func:`eval_seed` ``(seed, iteration)`` (so a resumed run evaluates exactly as the
uninterrupted one), EnvPool (which cannot reseed) continues its own stream.
"""

from __future__ import annotations

import copy
import math
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .envs import make_vec_env
from .policies import run_numpy_layers

# Evaluation seeds live in [2^28, 2^28 + 2^30), training seeds below (run seeds are small
# integers, EnvPool seeds its sub-environments seed, seed + 1, ..., and a resumed EnvPool
# run reseeds with seed + global_step < 2^28 for any budget this code trains); < 2^31 for
# EnvPool's int32 seed.
EVAL_SEED_OFFSET = 1 << 28
_EVAL_SEED_SPAN = 1 << 30
# the paper's summaries: 20 evaluations, at 20% of training and at the end
SUMMARY_WINDOW = 20
EARLY_FRACTION = 0.2


# an evaluation stops after this many steps even if an episode has not ended
MAX_EVAL_STEPS = 100_000


def eval_seed(seed: int, iteration: int, episodes: int) -> int:
    """Seed of the evaluation after ``iteration`` of run ``seed`` (its sub-environments
    get this seed + 0 .. episodes - 1): distinct per evaluation, never a training seed."""
    return EVAL_SEED_OFFSET + ((seed * 100_003 + iteration) * max(1, episodes)) % _EVAL_SEED_SPAN


class Evaluator:
    """Mean undiscounted return of the deterministic policy (its mean action) over
    ``episodes`` parallel episodes; ``__call__(policy, obs_norm, iteration) -> float``."""

    def __init__(
        self,
        env_id: str,
        episodes: int,
        seed: int,
        *,
        backend: str = "auto",
        clip_actions: bool = False,
        first_iteration: int = 0,
        max_steps: int = MAX_EVAL_STEPS,
    ):
        if episodes < 1:
            raise ValueError(f"eval episodes must be >= 1, got {episodes}")
        self.env_id, self.episodes, self.seed = env_id, episodes, seed
        self.clip_actions, self.max_steps = clip_actions, max_steps
        self.env = make_vec_env(env_id, episodes, eval_seed(seed, first_iteration, episodes), backend=backend)

    @torch.no_grad()
    def __call__(self, policy, obs_norm, iteration: int) -> float:
        env = self.env
        if env.backend == "gymnasium":
            env.env.reset(seed=eval_seed(self.seed, iteration, self.episodes))
        obs = env.reset()
        act = _numpy_mean_action(policy, obs_norm)  # the weights are frozen during an evaluation
        returns = np.zeros(self.episodes)
        done = np.zeros(self.episodes, dtype=bool)
        steps = 0
        while not done.all() and steps < self.max_steps:
            obs, rew, term, trunc = env.step(act(obs), clip=self.clip_actions)
            returns += np.where(done, 0.0, rew)
            done |= term | trunc
            steps += 1
        return float(returns.mean())

    def close(self) -> None:
        self.env.close()


def _numpy_mean_action(policy, obs_norm):
    """``obs (N, obs_dim) float64 -> mean action (N, d) float64`` of ``policy`` with the
    normalizer's current statistics, in numpy: the evaluation's 1,000 small forward passes
    per episode cost a few microseconds each instead of torch's per-op overhead (float32,
    as the policy computes). Falls back to torch for layers other than Linear / Tanh / ReLU."""
    ops = policy.numpy_mean()
    if ops is None:
        return torch_mean_action(policy, obs_norm)

    def act(obs):
        x = obs.astype(np.float32)
        if obs_norm is not None:
            x = obs_norm.numpy(x)
        return run_numpy_layers(ops, x).astype(np.float64)

    return act


def torch_mean_action(policy, obs_norm):
    """``obs (N, obs_dim) -> mean action (N, d) float64`` of ``policy`` in torch, observations
    normalized by ``obs_norm`` (None: as they are); reads the weights at each call."""
    device = next(policy.parameters()).device

    @torch.no_grad()
    def act(obs):
        x = torch.as_tensor(obs, dtype=torch.float32, device=device)
        if obs_norm is not None:
            x = obs_norm(x)
        return policy.mean_action(x).cpu().double().numpy()

    return act


def evaluate(
    policy,
    obs_norm,
    env_id: str,
    episodes: int,
    seed: int,
    device=None,
    *,
    backend: str = "auto",
    clip_actions: bool = False,
) -> float:
    """One evaluation of ``episodes`` deterministic episodes (``trpl-fast eval``)."""
    ev = Evaluator(env_id, episodes, seed, backend=backend, clip_actions=clip_actions)
    try:
        return ev(policy, obs_norm, 0)
    finally:
        ev.close()


# -- evaluation beside training ---------------------------------------------------------------


class FrozenMeanPolicy:
    """What an evaluation reads of a policy: its mean network as numpy ops (copies of the
    weights, :func:`~.policies.numpy_layers`), picklable -- a snapshot that later updates
    do not touch."""

    def __init__(self, ops: list):
        self.ops = ops

    def numpy_mean(self) -> list:
        return self.ops


def frozen_policy_and_normalizer(policy, obs_norm):
    """``(FrozenMeanPolicy, normalizer copy)`` of the current weights and statistics, or
    None where numpy does not reach the policy (other layers than Linear / Tanh / ReLU:
    such a policy is evaluated in the training process). The arrays are copied here:
    ``numpy_layers`` may share a weight's memory (a (1, n) or (n, 1) weight needs no copy
    to transpose), and later updates write into the weights in place."""
    ops = policy.numpy_mean()
    if ops is None:
        return None
    ops = [tuple(a.copy() for a in op) if isinstance(op, tuple) else op for op in ops]
    return FrozenMeanPolicy(ops), copy.deepcopy(obs_norm)


# how long an interrupted run waits for the evaluation in flight before it writes its
# checkpoint without that iteration (an evaluation takes well under a second here)
INTERRUPT_WAIT_SECONDS = 20.0


def _evaluation_worker(conn, make_evaluator: Callable) -> None:
    """The worker process: builds the evaluator (answering ``("ready", None)`` or
    ``("startup-error", traceback)``), then evaluates every ``(policy, obs_norm,
    iteration)`` it receives until ``None`` or the end of the pipe (the parent is gone)."""
    torch.set_num_threads(1)
    try:
        evaluator = make_evaluator()
    except BaseException:
        conn.send(("startup-error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg is None:
                break
            try:
                result = ("ok", evaluator(*msg))
            except Exception:
                result = ("error", traceback.format_exc())
            try:
                conn.send(result)
            except OSError:  # the parent is gone
                break
    finally:
        evaluator.close()


def _worker_main(fd: int) -> None:
    """Entry point of the worker interpreter: the connection on socket ``fd``, then the
    evaluator's factory as its first message."""
    conn = multiprocessing.connection.Connection(fd)
    try:
        make_evaluator = conn.recv()
    except EOFError:
        return
    _evaluation_worker(conn, make_evaluator)


# the worker's first statements: the parent stops the run (Ctrl-C, SIGTERM to the process
# group) and then this worker, so it ignores both from the start (before its imports)
_WORKER_CODE = (
    "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "from trpl_fast.rl.evaluation import _worker_main; _worker_main({fd})"
)


class BackgroundEvaluator:
    """An evaluator (:class:`Evaluator`, or the many-seeds one) in a worker process of its
    own: :meth:`submit` hands it a frozen copy of the policy's mean network and normalizer
    and returns at once; :meth:`result` waits for the return(s). The evaluation then runs
    on another core beside the next iteration's collection and updates; its results are
    those the evaluator gives in the training process (same environments, seeds and
    arithmetic).

    ``make_evaluator``: a picklable callable building the evaluator. The worker is a fresh
    interpreter that imports this module only (not the caller's ``__main__``, as
    ``multiprocessing``'s ``spawn`` would: a training script needs no entry-point guard),
    connected by a socket pair. Where it cannot start, cannot build the evaluator or dies,
    the evaluations continue in the training process (warned) with an evaluator built
    there, from the first evaluation the worker did not return. (That evaluator starts
    its own start-state stream: with EnvPool, whose evaluation env cannot be reseeded, the
    later evaluations then differ from an uninterrupted worker's.)"""

    def __init__(self, make_evaluator: Callable):
        self.make_evaluator = make_evaluator
        self._local = None  # the fallback evaluator, in this process
        self._pending: tuple | None = None
        self._local_result = None
        self._ready = False
        self._conn = self._proc = None
        ours = theirs = None
        try:
            ours, theirs = socket.socketpair()
            # the worker imports what this process can (a source checkout, a test's path)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            code = _WORKER_CODE.format(fd=theirs.fileno())
            self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),), env=env)
            self._conn = multiprocessing.connection.Connection(ours.detach())
            self._conn.send(make_evaluator)
        except Exception as e:  # noqa: BLE001 - no subprocess here: evaluate in this process
            if ours is not None and ours.fileno() != -1:
                ours.close()
            self._fall_back(f"{type(e).__name__}: {e}")
        finally:
            if theirs is not None:
                theirs.close()

    def submit(self, policy, obs_norm, iteration: int) -> None:
        """Start evaluating the (frozen) ``policy`` and ``obs_norm`` after ``iteration``
        (without a worker: evaluated here and now)."""
        if self._pending is not None:
            raise RuntimeError("BackgroundEvaluator.submit: the previous evaluation's result was not taken")
        self._pending = (policy, obs_norm, iteration)
        if self._local is None and self._conn is None:  # stopped after a timeout
            self._fall_back("it was stopped")
        if self._local is None:
            try:
                self._conn.send(self._pending)
            except (OSError, ValueError) as e:
                self._fall_back(f"{type(e).__name__}: {e}")
        if self._local is not None:
            self._local_result = self._local(*self._pending)

    def result(self, timeout: float | None = None):
        """The submitted evaluation's return (one float, or one per seed), waited for;
        ``TimeoutError`` after ``timeout`` seconds (the evaluation is then dropped)."""
        if self._pending is None:
            raise RuntimeError("BackgroundEvaluator.result: nothing was submitted")
        if self._local is None:
            msg = self._receive(timeout)
            if msg is not None and msg[0] == "startup-error":
                self._fall_back(f"it could not build the evaluator: {msg[1].strip().splitlines()[-1]}")
                self._local_result = self._local(*self._pending)
            elif msg is not None:
                self._pending = None
                if msg[0] == "error":  # the evaluator raised in the worker: the same error here
                    raise RuntimeError(f"the evaluation failed in its worker process:\n{msg[1]}")
                return msg[1]
        self._pending = None
        result, self._local_result = self._local_result, None
        return result

    def _receive(self, timeout: float | None):
        """The worker's next answer after its start-up message; ``None`` (and the
        fall-back, with this evaluation done here) when the worker is gone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                while not self._conn.poll(0.2):
                    if self._proc.poll() is not None and not self._conn.poll(0):
                        raise EOFError
                    if deadline is not None and time.monotonic() > deadline:
                        # its late answer would be taken for the next evaluation's: stopped
                        self._pending = None
                        self._proc.kill()
                        self._stop_worker()
                        raise TimeoutError(f"no evaluation result within {timeout} s")
                msg = self._conn.recv()
                if msg[0] == "ready":
                    self._ready = True
                    continue
                return msg
        except TimeoutError:
            raise
        except (EOFError, OSError) as e:
            self._fall_back(f"the worker exited ({type(e).__name__}, exit code {self._proc.poll()})")
            self._local_result = self._local(*self._pending)
            return None

    def _fall_back(self, why: str) -> None:
        warnings.warn(
            f"evaluating in the training process instead of a worker process ({why}); "
            "set eval_in_background=False to do so from the start",
            RuntimeWarning,
            stacklevel=3,
        )
        self._stop_worker()
        self._local = self.make_evaluator()

    def _stop_worker(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def close(self) -> None:
        self._stop_worker()
        if self._local is not None:
            self._local.close()
            self._local = None


class EvaluatedRows:
    """The loop's evaluate-and-log phase, with the evaluation in the background or not.

    Per iteration: :meth:`settle` (rows still waiting for a background evaluation are
    completed and written), :meth:`evaluate` where one is due (in this process: the
    results; in the background: submitted, ``None``), then :meth:`log` of the iteration's
    rows (one per run: one, or one per seed) with the state a checkpoint after it would
    write. Rows whose evaluation runs in the background wait until the next
    :meth:`settle` (the next iteration, before a checkpoint, at the end).
    :attr:`last_good` is the state after the last iteration whose rows are written: what
    a checkpoint holds, so that ``progress.csv`` and the checkpoint never disagree (an
    interrupted run redoes the iteration it had not logged)."""

    def __init__(self, evaluator, write: Callable[[list[dict]], None], state):
        self.evaluator, self.write, self.last_good = evaluator, write, state
        self._submitted = False
        self._pending: tuple[list[dict], object] | None = None

    def settle(self, timeout: float | None = None) -> None:
        """Complete and write the rows waiting for their evaluation (waits for it;
        ``TimeoutError`` after ``timeout`` seconds, the rows then dropped)."""
        if self._pending is None:
            return
        try:
            results = self.evaluator.result(timeout)
        except TimeoutError:
            self._pending = None
            raise
        rows, state = self._pending
        self._pending = None
        self._fill(rows, results)
        self._write(rows, state)

    def evaluate(self, policy, obs_norm, iteration: int):
        """The evaluation after ``iteration``: its return(s), or ``None`` when it was
        handed to the background (its rows are then completed by :meth:`settle`)."""
        self.settle()  # one evaluation in flight at most
        if not isinstance(self.evaluator, BackgroundEvaluator):
            return self.evaluator(policy, obs_norm, iteration)
        self.evaluator.submit(*frozen_policy_and_normalizer(policy, obs_norm), iteration)
        self._submitted = True
        return None

    def log(self, rows: list[dict], state) -> None:
        """Write ``rows`` (or keep them until their background evaluation is in)."""
        if self._submitted:
            self._submitted = False
            self._pending = (rows, state)
        else:
            self._write(rows, state)

    @staticmethod
    def _fill(rows: list[dict], results) -> None:
        results = results if isinstance(results, list) else [results]
        for row, value in zip(rows, results):
            row["eval_return_mean"] = value

    def _write(self, rows: list[dict], state) -> None:
        self.write(rows)
        self.last_good = state


def settle_for_checkpoint(evaluated: EvaluatedRows) -> None:
    """On Ctrl-C / SIGTERM: complete the rows whose evaluation is still running (the
    worker ignores both signals and finishes it within an evaluation's time), so that the
    interrupted checkpoint loses no completed iteration. A second Ctrl-C, a failed worker
    or no answer within ``INTERRUPT_WAIT_SECONDS`` gives up on those rows: the checkpoint
    then holds the iteration before."""
    try:
        evaluated.settle(timeout=INTERRUPT_WAIT_SECONDS)
    except (KeyboardInterrupt, Exception):  # noqa: BLE001 - the checkpoint must still be written
        pass


def make_evaluator(make: Callable, background: bool, policy):
    """``make()`` (the evaluator) in a worker process beside training when ``background``
    and numpy reaches the policy's mean network (see :func:`frozen_policy_and_normalizer`),
    else in this process."""
    if background and policy.numpy_mean() is not None:
        return BackgroundEvaluator(make)
    return make()


def run_summary(
    iterations: np.ndarray, evals: np.ndarray, n_iterations: int, finished_after: int | None = None
) -> dict:
    """``{"early": mean return of the "20%" window, "final": of the last 20 evaluations,
    "evaluations": how many were logged}`` from a run's ``progress.csv`` columns
    ``iteration`` and ``eval_return_mean`` (NaN where an iteration was not evaluated);
    NaN where the run has not reached a window yet. ``n_iterations``: the run's planned
    iterations; ``finished_after`` (default: the same): how many count as finished (runs
    of versions before 2026-11-29 rounded their budget down to whole iterations)."""
    if finished_after is not None:
        n_done = min(n_iterations, finished_after)
    else:
        n_done = n_iterations
    iterations = np.asarray(iterations, dtype=np.int64)
    evals = np.asarray(evals, dtype=np.float64)
    have = {int(i): float(v) for i, v in zip(iterations, evals) if v == v}
    start = int(math.floor(EARLY_FRACTION * n_iterations))
    early_its = sorted(i for i in have if i >= start)[:SUMMARY_WINDOW]
    done = max(have) + 1 if have else 0
    early = (
        float(np.mean([have[i] for i in early_its]))
        if len(early_its) == SUMMARY_WINDOW or (early_its and done >= n_done)
        else math.nan
    )
    final_its = sorted(have)[-SUMMARY_WINDOW:]
    final = float(np.mean([have[i] for i in final_its])) if final_its and done >= n_done else math.nan
    return {"early": early, "final": final, "evaluations": len(have)}
