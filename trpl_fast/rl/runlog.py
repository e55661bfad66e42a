"""A run's directory and its logs: which files make a run, the checks before one is
created, and :class:`RunLog` (``progress.csv``, TensorBoard events, the progress bar).

``progress.csv`` holds one row per iteration; on resume it is rewritten atomically with the
rows up to the checkpoint (rows logged after it belong to iterations trained again), then
appended to, flushed after every row.
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path

# per iteration: what was learned, then what it cost (time_* are the phases' seconds)
CSV_COLUMNS = [
    "iteration",
    "global_step",
    "train_return_mean",
    "eval_return_mean",
    "episodes",
    "policy_loss",
    "value_loss",
    "kl_mean",
    "kl_max",
    "constraint_mean_mean",
    "constraint_mean_max",
    "constraint_cov_mean",
    "constraint_cov_max",
    "entropy_mean",
    "fraction_projected",
    "steps_per_second",
    "wall_time",
    "time_collect",
    "time_advantages",
    "time_policy",
    "time_value",
    "time_eval",
]
# columns that measure the machine, not the run (they differ between identical runs)
TIMING_COLUMNS = (
    "steps_per_second",
    "wall_time",
    "time_collect",
    "time_advantages",
    "time_policy",
    "time_value",
    "time_eval",
)

# what makes a directory hold a run (never reused without --resume or --overwrite)
RUN_FILES = ("config.json", "progress.csv", "checkpoint.pt")


def run_files(run_dir: Path, temporaries: bool = False) -> list[str]:
    """The names of a run's files in ``run_dir`` (with ``temporaries``: also half-written ones)."""
    if not run_dir.is_dir():
        return []
    names = RUN_FILES + (("checkpoint.pt.tmp", "progress.csv.tmp") if temporaries else ())
    return sorted(p.name for p in run_dir.iterdir() if p.name in names or p.name.startswith("events.out.tfevents."))


def check_run_dir(run_dir: Path) -> None:
    """Raise naming ``run_dir`` if it cannot become a run directory (checked before anything
    is created, so a failed start leaves nothing behind)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory (--out) {run_dir} is a file, not a directory")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"run directory (--out) {run_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == run_dir else f": {existing}"
        raise ValueError(f"run directory (--out) {run_dir}{where} is not writable")


def read_progress(path: Path, iterations: int) -> list[dict]:
    """The first ``iterations`` rows of ``progress.csv`` as floats (rows logged after the
    checkpoint belong to iterations that are trained again)."""
    if not path.exists():
        return []
    try:
        with open(path, newline="") as f:
            rows = [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()} for r in csv.DictReader(f)]
    except (ValueError, TypeError, csv.Error) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); fix or remove it to resume") from exc
    for r in rows:
        for k in ("iteration", "global_step", "episodes"):
            if k in r and r[k] == r[k]:
                r[k] = int(r[k])
    return [r for r in rows if r.get("iteration", math.inf) < iterations]


class PhaseClock:
    """Wall seconds of one iteration's phases: :meth:`lap` returns the time since the last
    lap (or the start), :attr:`total` the time from the start to the last lap. ``sync``
    (e.g. ``torch.cuda.synchronize``) is called before each reading, so that work a phase
    queued on a GPU is counted in that phase, not in the next one that waits for it."""

    def __init__(self, sync=None):
        self.sync = sync
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed

    @property
    def total(self) -> float:
        return self.last - self.start


class RunLog:
    """``progress.csv`` + TensorBoard scalars + a tqdm bar for one run.

    ``rows``: the rows already logged (a resumed run's, up to its checkpoint); ``total`` and
    ``done``: env steps of the whole run and already trained (the bar); ``purge_step``: the
    TensorBoard step after which an interrupted run's events are dropped (resume).
    """

    def __init__(
        self,
        run_dir: Path,
        rows: list[dict],
        *,
        total: int,
        done: int,
        tensorboard: bool,
        progress: bool,
        purge_step: int | None = None,
    ):
        self.rows = list(rows)
        path = run_dir / "progress.csv"
        tmp = run_dir / "progress.csv.tmp"
        with open(tmp, "w", newline="") as f:  # atomically: a crash here cannot lose the history
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            w.writerows({k: r.get(k, math.nan) for k in CSV_COLUMNS} for r in self.rows)
        os.replace(tmp, path)
        self._file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
        self._tb = None
        if tensorboard and done < total:  # a no-op resume adds no event file
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir), purge_step=purge_step)
            except ImportError:
                self._tb = None
        self._bar = None
        if progress:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def write(self, row: dict, steps: int) -> None:
        """Log one iteration's ``row`` (at ``row["global_step"]``), ``steps`` env steps long."""
        self._writer.writerow({k: row.get(k, math.nan) for k in CSV_COLUMNS})
        self._file.flush()
        self.rows.append(row)
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                    self._tb.add_scalar(k, v, row["global_step"])
        if self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix(ret=f"{row['train_return_mean']:.1f}", kl=f"{row.get('kl_mean', math.nan):.2e}")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
