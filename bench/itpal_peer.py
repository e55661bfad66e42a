"""The KL projection on the CPU against ITPAL (ALRhub/ITPAL: the C++/OpenMP/NLopt code the
original TRPL implementation and its successors call), in one process, float64, forward +
backward, every row projected (issue 12's CPU target: >= 10x ITPAL for full covariance
512 x 17 and diagonal 65,536 x 17).

ITPAL projects the covariance only (the original computes the mean part in Python, in closed
form); ours projects mean and covariance, so its time includes the mean part. Per case: the
median over ``--rounds`` of one forward + backward, the largest relative difference between
the two projected covariances (ITPAL's optimizer stops at its own tolerance), and the ratio.

    python -m bench.itpal_peer --threads 2 --out bench/results/itpal_peer_cpu.json

Needs ITPAL's ``cpp_projection`` module (``../shared/tools/build-itpal.sh SRC .venv/bin/python``).
``OMP_NUM_THREADS`` is set to ``--threads`` before it loads. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from ._output import emit


def _cases(n_diag: int, n_full: int, d: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    # diagonal: target std a factor e^{+-0.5} away per dimension -> KL far above the bound
    old_std = torch.exp(0.3 * torch.randn(n_diag, d, generator=gen, dtype=f64))
    std = old_std * torch.exp(0.5 * torch.randn(n_diag, d, generator=gen, dtype=f64))
    old_mean = torch.randn(n_diag, d, generator=gen, dtype=f64)
    mean = old_mean + 0.5 * old_std * torch.randn(n_diag, d, generator=gen, dtype=f64)
    diag = (mean, std, old_mean, old_std)

    def chol(n):
        a = torch.randn(n, d, d, generator=gen, dtype=f64) / d**0.5
        return torch.linalg.cholesky(a @ a.mT + 0.5 * torch.eye(d, dtype=f64))

    old_factor, factor = chol(n_full), chol(n_full)
    old_mean_f = torch.randn(n_full, d, generator=gen, dtype=f64)
    mean_f = old_mean_f + 0.5 * torch.randn(n_full, d, generator=gen, dtype=f64)
    full = (mean_f, factor, old_mean_f, old_factor)
    return diag, full


def _ours(form: str, case, grads, mean_bound: float, cov_bound: float):
    """One forward + backward of our KL projection of ``case`` (mean, cov, old_mean,
    old_cov; mean and cov leaves that require grad) with upstream gradients ``grads``, the
    gradients returned as ITPAL's backward returns them (``autograd.grad``: nothing
    accumulated into ``.grad``); returns the projected covariance input-form (std or
    Cholesky factor)."""
    import torch

    from trpl_fast.functional import project

    out = project(form, *case, kind="kl", mean_bound=mean_bound, cov_bound=cov_bound, check_values=False)
    torch.autograd.grad(out, case[:2], grads)
    return out[1].detach()


def _leaves(case):
    """``case`` with its mean and covariance made leaves that require grad (once, outside
    the timed steps: ITPAL's step gets its arrays ready-made too)."""
    return tuple(x.clone().requires_grad_(True) for x in case[:2]) + tuple(case[2:])


def _median_time(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _keep_freed_memory() -> None:
    """glibc's ``mallopt``: no trimming of the heap's top, no ``mmap`` for large blocks
    (each freed ``mmap`` block is unmapped, and the next allocation of that size faults
    in every page again: ~1 ms per 9 MB buffer here)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_trim_threshold, 2**30) and libc.mallopt(m_mmap_threshold, 2**25)):
        raise SystemExit("mallopt failed (not glibc?)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n-diag", type=int, default=65536)
    p.add_argument("--n-full", type=int, default=512)
    p.add_argument("--dim", type=int, default=17)
    p.add_argument("--mean-bound", type=float, default=0.03)
    p.add_argument("--cov-bound", type=float, default=0.01)
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc: keep freed memory in the heap instead of returning it to the system, so "
        "large buffers are not page-faulted in again on every call (what jemalloc / tcmalloc "
        "do; applies to both libraries)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before ITPAL's OpenMP runtime starts
    if args.keep_freed_memory:
        _keep_freed_memory()
    import cpp_projection
    import numpy as np
    import torch

    from trpl_fast import distances as D
    from trpl_fast import ops

    torch.set_num_threads(args.threads)
    d, eps = args.dim, args.cov_bound
    (mean, std, old_mean, old_std), (mean_f, factor, old_mean_f, old_factor) = _cases(args.n_diag, args.n_full, d, 0)
    out: dict = {
        "threads": args.threads,
        "dtype": "float64",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "keep_freed_memory": args.keep_freed_memory,
        "cases": {},
    }

    # -- diagonal -------------------------------------------------------------------------
    n = len(std)
    assert bool((D.cov_part("kl", "diag", std, old_std) > eps).all()), "every row must be projected"
    g_mean, g_std = torch.randn_like(mean), torch.randn_like(std)
    diag_case = _leaves((mean, std, old_mean, old_std))

    def ours_diag():
        return _ours("diag", diag_case, (g_mean, g_std), args.mean_bound, eps)

    itpal_diag = cpp_projection.BatchedDiagCovOnlyProjection(n, d, max_eval=100)
    epss, old_var, var = np.full(n, eps), (old_std**2).numpy(), (std**2).numpy()
    g_var = (g_std / (2 * std)).numpy()  # the same upstream gradient, w.r.t. the variance

    def itpal_diag_step():
        v = itpal_diag.forward(epss, old_var, var)
        itpal_diag.backward(g_var)
        return v

    t_ours, t_peer = _median_time(ours_diag, args.rounds), _median_time(itpal_diag_step, args.rounds)
    ours_var = ours_diag().pow(2).numpy()
    rel = float(np.max(np.abs(ours_var - itpal_diag_step()) / ours_var))
    threshold = ops.cpu_compile_min_elements()
    ops.set_cpu_compile_min_elements(None)
    try:
        t_eager = _median_time(ours_diag, args.rounds)
    finally:
        ops.set_cpu_compile_min_elements(threshold)
    out["cases"][f"diag {n}x{d}"] = {
        "ours_s": t_ours,
        "ours_eager_s": t_eager,
        "itpal_s": t_peer,
        "ratio": t_peer / t_ours,
        "ratio_eager": t_peer / t_eager,
        "max_rel_diff": rel,
    }

    # -- full covariance --------------------------------------------------------------------
    n = len(factor)
    cov = factor @ factor.mT
    assert bool((D.cov_part("kl", "full", factor, old_factor) > eps).all()), "every row must be projected"
    gf_mean, gf_factor = torch.randn_like(mean_f), torch.randn_like(factor).tril()
    full_case = _leaves((mean_f, factor, old_mean_f, old_factor))

    def ours_full():
        return _ours("full", full_case, (gf_mean, gf_factor), args.mean_bound, eps)

    itpal_full = cpp_projection.BatchedCovOnlyProjection(n, d, max_eval=100)
    epss_f = np.full(n, eps)
    old_chols, chols, covs = old_factor.numpy(), factor.numpy(), cov.numpy()
    g_cov = np.ascontiguousarray(np.random.default_rng(0).standard_normal((n, d, d)))

    def itpal_full_step():
        c = itpal_full.forward(epss_f, old_chols, chols, covs)
        itpal_full.backward(g_cov)
        return c

    t_ours, t_peer = _median_time(ours_full, args.rounds), _median_time(itpal_full_step, args.rounds)
    f_t = ours_full()
    ours_cov = (f_t @ f_t.mT).numpy()
    rel = float(np.max(np.abs(ours_cov - itpal_full_step())) / np.max(np.abs(ours_cov)))
    out["cases"][f"full {n}x{d}"] = {"ours_s": t_ours, "itpal_s": t_peer, "ratio": t_peer / t_ours, "max_rel_diff": rel}

    return emit(out, args.out)


if __name__ == "__main__":
    main()
