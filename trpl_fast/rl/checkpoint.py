"""Checkpoint files and the signals that must write one.

A checkpoint is written atomically (temporary file, fsync, rename): a crash, a kill or a
full disk leaves the previous one intact and no temporary file behind. SIGTERM -- what
``timeout``, container stops and cluster schedulers send -- is turned into
:class:`Terminated`, a ``KeyboardInterrupt``, so the training loop writes the last completed
iteration for it exactly as for Ctrl-C.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path

import torch

from .config import TrainConfig

# fields a resumed run may change: they do not alter what is learned up to the checkpoint
RESUMABLE_CHANGES = (
    "total_steps",
    "device",
    "eval_episodes",
    "eval_every",
    "eval_in_background",
    "checkpoint_every",
    "checkpoint_seconds",
    "compile_update",
)

# what train() needs to continue a run besides the networks
_LOOP_KEYS = ("iteration", "global_step", "value", "opt_pi", "opt_vf", "torch_rng", "gen_rng", "numpy_rng", "loop")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; handled like Ctrl-C (the last completed iteration is checkpointed)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is kept."""


def _no_space(exc: BaseException) -> bool:
    """``exc`` or an exception it was raised from is ENOSPC (torch.save reports it as a
    RuntimeError about stream positions, with the OSError only in the chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: to a temporary file in the same directory, fsync, then rename, so a
    crash or Ctrl-C never leaves a truncated checkpoint behind."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        # a partial temporary file would keep filling the disk (or hold a signal's half write)
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and _no_space(exc):
            err = CheckpointWriteError(
                f"no space left on device while writing the checkpoint {path} "
                "(the previous checkpoint is kept; free some space and resume with --resume)"
            )
            err.errno = errno.ENOSPC
            raise err from exc
        raise


def read_checkpoint(path: str | Path, device="cpu") -> dict:
    """The state dict of a checkpoint written by :func:`train` (``path``: the file or its run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise ValueError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # truncated, empty or some other file: torch's errors do not name it
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated, empty or not a trpl-fast checkpoint: {reason})"
        ) from exc
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "policy" not in state:
        raise ValueError(f"{path} is not a trpl-fast training checkpoint")
    try:
        TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its config cannot be read ({exc})") from exc
    return state


def check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    """Raise if ``cfg`` differs from the checkpoint's config in anything but :data:`RESUMABLE_CHANGES`."""
    saved_cfg = TrainConfig.from_dict(saved).to_dict()
    diff = [
        f"{k}: checkpoint has {saved_cfg[k]!r}, requested {v!r}"
        for k, v in cfg.to_dict().items()
        if k not in RESUMABLE_CHANGES and saved_cfg[k] != v
    ]
    if diff:
        raise ValueError(
            "the checkpoint comes from another config (" + "; ".join(diff) + "); resume with the "
            f"run's own config (only {', '.join(RESUMABLE_CHANGES)} may change) or train into a new --out"
        )


def check_resumable(state: dict, path: Path) -> None:
    """Raise naming ``path`` if the checkpoint lacks the loop state a resume needs."""
    if "loop" not in state:
        raise ValueError(f"{path} holds no loop state (written by an older version); it can be evaluated, not resumed")
    missing = [k for k in _LOOP_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path} is incomplete (missing {', '.join(missing)}); it cannot be resumed")


class _SigtermState:
    """Whether SIGTERM arrived since :func:`catch_sigterm` installed its handler."""

    requested = False


_sigterm = _SigtermState()


def catch_sigterm():
    """Make SIGTERM raise :class:`Terminated` in the main thread; returns a function that
    restores the previous handler (a no-op outside the main thread, where Python cannot
    install handlers).

    The handler's exception is raised wherever the main thread happens to be, and some
    places swallow it: a finalizer (``__del__``, a weakref callback) or C++ that calls back
    into Python only reports it as "Exception ignored". So the request is also recorded,
    and the training loops call :func:`check_terminated` between phases: a lost raise
    costs at most one phase, never the stop (a batched KL run once kept training after
    its SIGTERM this way). Only the first SIGTERM raises: a second one must not abort the
    checkpoint the first one is writing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:  # as Python does for an ignored SIGINT: the parent meant it
        return lambda: None
    _sigterm.requested = False

    def handler(signum, frame):
        first = not _sigterm.requested
        _sigterm.requested = True
        if first:
            raise Terminated("SIGTERM")

    def restore():
        # the previous handler first: a SIGTERM in between must not meet ours with the
        # request already cleared
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        _sigterm.requested = False

    signal.signal(signal.SIGTERM, handler)
    return restore


def check_terminated() -> None:
    """Raise :class:`Terminated` if SIGTERM arrived since :func:`catch_sigterm` (whether or
    not its handler's own raise got through)."""
    if _sigterm.requested:
        raise Terminated("SIGTERM")
