"""Throughput of the Frobenius / W2 operators vs eager torch and torch.compile(eager torch).

Run:  .venv/bin/python -m pytest bench/test_bench_projection.py --benchmark-json bench/results/<name>.json
One setup for every op; providers trpl / eager / compiled; modes fwd / bwd / full
(fwd + bwd). ``extra_info`` records the bytes a diagonal op must move and the copy
bandwidth measured in the same run, so the report can state the fraction of the floor.
"""

from __future__ import annotations

import pytest
import torch

import trpl_fast

from .baselines import eager_diag, eager_full
from .conftest import DEVICES, big_ok, make_inputs, run_benchmark

MEAN_BOUND, COV_BOUND = 0.03, 0.001
CASES = [("diag", 17, n) for n in (512, 65536, 1 << 20)] + [
    ("full", d, n) for d in (7, 17) for n in (512, 65536, 1 << 20)
]

_compiled = {}


def provider_fn(provider, kind, form):
    if provider == "trpl":
        api = trpl_fast.project_diag if form == "diag" else trpl_fast.project_full
        return lambda *t: api(*t, kind=kind, mean_bound=MEAN_BOUND, cov_bound=COV_BOUND, check_values=False)
    base = eager_diag if form == "diag" else eager_full
    fn = lambda *t: base(kind, *t, MEAN_BOUND, COV_BOUND)  # noqa: E731
    if provider == "compiled":
        key = (kind, form)
        if key not in _compiled:
            _compiled[key] = torch.compile(fn, dynamic=False)
        return _compiled[key]
    return fn


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("provider", ["trpl", "eager", "compiled"])
@pytest.mark.parametrize("form,d,n", CASES, ids=[f"{f}-d{d}-n{n}" for f, d, n in CASES])
@pytest.mark.parametrize("kind", ["frob", "w2"])
@pytest.mark.parametrize("device", DEVICES)
def test_projection(benchmark, copy_bandwidth, device, kind, form, d, n, provider, mode):
    if not big_ok(n, form, d, device):
        pytest.skip("set TRPL_BENCH_LARGE=1 for 1M-state full covariance at d=17 on CPU")
    if provider == "compiled" and device == "cpu" and form == "full":
        pytest.skip("inductor on CPU compiles batched linalg for minutes per case; eager is the baseline")
    mean, cov, old_mean, old_cov = make_inputs(kind, form, n, d, device)
    fn = provider_fn(provider, kind, form)
    run_benchmark(
        benchmark,
        copy_bandwidth,
        fn,
        (mean, cov, old_mean, old_cov),
        device=device,
        kind=kind,
        form=form,
        d=d,
        n=n,
        mode=mode,
        provider=provider,
    )
