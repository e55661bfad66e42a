"""Throughput of the KL operators vs an eager-torch implementation of the same Newton
iteration (autograd through the iterations) and torch.compile of it.

The paper's figure for its C++ KL layer: ~170 ms forward and 3.5 ms backward for 512
states of dimension 17, full covariance, all projected, on an 8-core CPU; the
``full-d17-n512`` cases are that configuration. Diagonal: 512, 65,536 and 1,048,576 states.
"""

from __future__ import annotations

import pytest
import torch

import trpl_fast

from .baselines import eager_kl_diag, eager_kl_full
from .conftest import DEVICES, make_inputs, run_benchmark

MEAN_BOUND, COV_BOUND = 0.03, 0.001
CASES = [("full", 17, 512)] + [("diag", 17, n) for n in (512, 65536, 1 << 20)]
_compiled = {}


def provider_fn(provider, form):
    if provider == "trpl":
        api = trpl_fast.project_diag if form == "diag" else trpl_fast.project_full
        return lambda *t: api(*t, kind="kl", mean_bound=MEAN_BOUND, cov_bound=COV_BOUND, check_values=False)
    base = eager_kl_diag if form == "diag" else eager_kl_full
    fn = lambda *t: base(*t, MEAN_BOUND, COV_BOUND)  # noqa: E731
    if provider == "compiled":
        if form not in _compiled:
            _compiled[form] = torch.compile(fn, dynamic=False)
        return _compiled[form]
    return fn


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("provider", ["trpl", "eager", "compiled"])
@pytest.mark.parametrize("form,d,n", CASES, ids=[f"{f}-d{d}-n{n}" for f, d, n in CASES])
@pytest.mark.parametrize("device", DEVICES)
def test_kl(benchmark, copy_bandwidth, device, form, d, n, provider, mode):
    if provider == "compiled" and form == "full":
        pytest.skip("inductor cannot compile linalg.eigh into a fused kernel; eager is the baseline")
    mean, cov, old_mean, old_cov = make_inputs("kl", form, n, d, device)
    fn = provider_fn(provider, form)
    with torch.no_grad():
        out = trpl_fast.functional.project(
            form, mean, cov, old_mean, old_cov, kind="kl", mean_bound=MEAN_BOUND, cov_bound=COV_BOUND, return_aux=True
        )
    run_benchmark(
        benchmark,
        copy_bandwidth,
        fn,
        (mean, cov, old_mean, old_cov),
        device=device,
        kind="kl",
        form=form,
        d=d,
        n=n,
        mode=mode,
        provider=provider,
        projected_fraction=float((out[2] < 1).double().mean()),
        converged_fraction=float(out[3].double().mean()),
    )
