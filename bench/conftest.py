"""Benchmark setup: inputs, the copy-bandwidth floor and helpers shared by the suites."""

from __future__ import annotations

import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_inputs(kind, form, n, d, device, dtype=torch.float32, seed=0):
    """Inputs where every state is outside the trust region (all rows projected)."""
    gen = torch.Generator().manual_seed(seed)
    old_mean = torch.randn(n, d, generator=gen)
    mean = old_mean + 0.5 * torch.randn(n, d, generator=gen)
    if form == "diag":
        old_cov = torch.exp(0.3 * torch.randn(n, d, generator=gen))
        cov = old_cov * torch.exp(0.5 * torch.randn(n, d, generator=gen))
    else:
        base = torch.randn(d, d, generator=gen) / d**0.5
        s_old = (base @ base.T + torch.eye(d)).expand(n, d, d)
        a = torch.eye(d) + 0.3 * torch.randn(n, d, d, generator=gen) / d**0.5
        s_new = a @ s_old @ a.mT
        if kind == "w2":

            def root(s):
                e, u = torch.linalg.eigh(s)
                r = u @ torch.diag_embed(e.sqrt()) @ u.mT
                return 0.5 * (r + r.mT)

            cov, old_cov = root(s_new), root(s_old)
        else:
            cov, old_cov = torch.linalg.cholesky(s_new), torch.linalg.cholesky(s_old.contiguous())
    return [t.to(device=device, dtype=dtype).contiguous() for t in (mean, cov, old_mean, old_cov)]


def measure_copy_bandwidth(device) -> float:
    """Device copy bandwidth in bytes/s (read + write counted; median of 10 copies of
    256 MiB): the physical floor for memory-bound ops."""
    import time

    n = (256 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * src.numel() * 4 / times[len(times) // 2]


@pytest.fixture(scope="session")
def copy_bandwidth():
    """:func:`measure_copy_bandwidth` per device, measured once per session."""
    cache = {}

    def measure(device):
        if device not in cache:
            cache[device] = measure_copy_bandwidth(device)
        return cache[device]

    return measure


def big_ok(n, form, d, device):
    """1M-state full-covariance cases at d = 17 need ~10 GB on CPU; allow with
    TRPL_BENCH_LARGE=1."""
    if device == "cpu" and form == "full" and n >= 1 << 20 and d > 7:
        return os.environ.get("TRPL_BENCH_LARGE") == "1"
    return True


def make_runner(fn, tensors, mode, device):
    """A zero-argument callable timing ``fn(*tensors)`` in ``mode``: ``fwd`` (no grad),
    ``bwd`` (backward of one recorded forward, retained graph) or ``full`` (both)."""
    mean, cov, old_mean, old_cov = tensors
    g_mean, g_cov = torch.randn_like(mean), torch.randn_like(cov)
    if mode == "fwd":

        def run():
            with torch.no_grad():
                fn(mean, cov, old_mean, old_cov)
            sync(device)

        return run
    m = mean.clone().requires_grad_(True)
    c = cov.clone().requires_grad_(True)
    if mode == "bwd":
        mt, ct = fn(m, c, old_mean, old_cov)

        def run():
            torch.autograd.backward([mt, ct], [g_mean, g_cov], retain_graph=True)
            sync(device)

        return run

    def run():
        mt, ct = fn(m, c, old_mean, old_cov)
        torch.autograd.backward([mt, ct], [g_mean, g_cov])
        sync(device)

    return run


def rounds_for(n):
    return 3 if n >= 1 << 20 else (10 if n >= 65536 else 30)


def bytes_moved(n, d, mode, itemsize=4):
    """Bytes a fused diagonal op must move: fwd reads 4 arrays and writes 2; bwd reads
    6 (two upstream grads, four inputs) and writes 2."""
    per = n * d * itemsize
    return {"fwd": 6 * per, "bwd": 8 * per, "full": 14 * per}[mode]


def run_benchmark(benchmark, copy_bandwidth, fn, tensors, *, device, kind, form, d, n, mode, provider, **extra):
    """The one setup every op benchmark shares: group, ``extra_info`` (with the bytes a
    diagonal op must move and the copy bandwidth measured in this run), a warm-up call
    (compilation, autotuning), then ``rounds_for(n)`` timed rounds."""
    benchmark.group = f"{device}-{kind}-{form}-d{d}-n{n}-{mode}"
    benchmark.extra_info.update(
        device=device,
        kind=kind,
        form=form,
        d=d,
        n=n,
        mode=mode,
        provider=provider,
        dtype="float32",
        torch=torch.__version__,
        **extra,
    )
    if form == "diag":
        benchmark.extra_info["bytes"] = bytes_moved(n, d, mode)
        benchmark.extra_info["copy_bandwidth"] = copy_bandwidth(device)
    if device == "cuda":
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    run = make_runner(fn, tensors, mode, device)
    run()
    benchmark.pedantic(run, rounds=rounds_for(n), iterations=1, warmup_rounds=1)
