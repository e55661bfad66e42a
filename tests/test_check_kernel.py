"""The diagonal value checks as one Triton kernel (``kernels/validation.py``, used where the
ops launch their kernels: CUDA) against the torch checks: the same message for every bad
input, in the same order when several are bad, nothing for good inputs, sync and deferred.

Without CUDA the kernel runs under TRITON_INTERPRET on CPU tensors, with "cpu" added to the
kernel device types."""

from __future__ import annotations

import math
import os

import pytest
import torch

import trpl_fast
from trpl_fast.ops import _common, validation

from .helpers import make_case

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")
KERNEL_DEVICES = ("cuda", "cpu")


@pytest.fixture(autouse=True)
def no_pending_checks():
    validation._pending.clear()
    yield
    validation._pending.clear()


def message(case, kind, bounds, fused: bool, monkeypatch, mode="sync"):
    """The ValueError message of a checked call (None if it passes), by the check kernel
    (``fused``) or by the torch checks (on CPU; copies of the same inputs)."""
    device = DEVICE if fused else "cpu"
    with monkeypatch.context() as patch:
        patch.setattr(_common, "KERNEL_DEVICE_TYPES", KERNEL_DEVICES if fused else ("cuda",))
        assert validation.uses_check_kernel("diag", case[0].to(device)) == (fused and case[0].numel() > 0)
        tensors = [t.to(device) for t in case]
        mb, cb = (b.to(device) if isinstance(b, torch.Tensor) else b for b in bounds)
        # no projection: the checks only (the torch path projects on the CPU)
        patch.setattr(trpl_fast.ops.OPS[(kind, "diag")], "apply", lambda *a: a[:2])
        try:
            trpl_fast.project_diag(*tensors, kind=kind, mean_bound=mb, cov_bound=cb, check_values=mode)
            if mode == "deferred":
                trpl_fast.raise_deferred_errors()
        except ValueError as e:
            return str(e)
    return None


SCENARIOS = [
    # (name, kind, dtype, tensor index, rows, column, value)
    ("nan mean", "kl", torch.float32, 0, 3, 1, math.nan),
    ("inf std", "kl", torch.float32, 1, 0, 0, math.inf),
    ("-inf old_mean", "frob", torch.float64, 2, 4, 2, -math.inf),
    ("nan old_std", "w2", torch.float32, 3, 6, 4, math.nan),
    ("zero std", "kl", torch.float64, 1, 2, 3, 0.0),
    ("negative old_std", "frob", torch.float32, 3, 1, 1, -0.5),
    ("frob float64 variance overflow", "frob", torch.float64, 1, 5, 0, 1e160),
    ("frob float64 old variance overflow", "frob", torch.float64, 3, 5, 0, 1e160),
    ("frob float32 large std passes", "frob", torch.float32, 1, 5, 0, 1e30),
    ("w2 float32 ratio overflow", "w2", torch.float32, 1, 2, 2, 3e38),
    ("w2 float16 ratio overflow", "w2", torch.float16, 1, 2, 2, 60000.0),
    ("bfloat16 nan std", "kl", torch.bfloat16, 1, 6, 4, math.nan),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_one_bad_value_same_message(scenario, monkeypatch):
    _, kind, dtype, index, row, col, value = scenario
    case = [t.to(dtype) for t in make_case(kind, "diag", (7,), 5, seed=1)]
    if kind == "w2" and "ratio" in scenario[0]:
        case[3] = torch.full_like(case[3], 0.5)
    case[index] = case[index].clone()
    case[index][row, col] = value
    want = message(case, kind, (0.1, 0.05), fused=False, monkeypatch=monkeypatch)
    got = message(case, kind, (0.1, 0.05), fused=True, monkeypatch=monkeypatch)
    assert got == want
    if "passes" in scenario[0]:
        assert want is None
    else:
        assert want is not None


@pytest.mark.parametrize("name", ["mean_bound", "cov_bound"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf], ids=["zero", "negative", "nan", "inf"])
@pytest.mark.parametrize("shape", [(2, 3), (2, 1), ()], ids=["per_state", "broadcast", "scalar_tensor"])
def test_bad_bound_tensor_same_message(name, value, shape, monkeypatch):
    case = list(make_case("kl", "diag", (2, 3), 4, seed=2, dtype=torch.float32))
    bound = torch.full(shape, 0.1, dtype=torch.float64)
    bound.view(-1)[-1] = value
    bounds = (bound, 0.05) if name == "mean_bound" else (0.1, bound)
    want = message(case, "kl", bounds, fused=False, monkeypatch=monkeypatch)
    assert want == f"{name} must be finite and > 0 everywhere"
    assert message(case, "kl", bounds, fused=True, monkeypatch=monkeypatch) == want


def test_several_bad_values_report_the_first_in_order(monkeypatch):
    case = [t.clone() for t in make_case("w2", "diag", (9,), 3, seed=3, dtype=torch.float32)]
    case[3][1, 1] = -1.0  # old_std <= 0 (checked after the finite checks)
    case[2][8, 0] = math.nan  # old_mean non-finite: reported first
    bound = torch.tensor([0.1] * 8 + [0.0])
    for mode in ("sync", "deferred"):
        want = message(case, "w2", (bound, 0.05), fused=False, monkeypatch=monkeypatch, mode=mode)
        assert want.startswith("old_mean has non-finite values")
        assert message(case, "w2", (bound, 0.05), fused=True, monkeypatch=monkeypatch, mode=mode) == want
    case[2][8, 0] = 0.0
    want = message(case, "w2", (bound, 0.05), fused=False, monkeypatch=monkeypatch)
    assert want == "mean_bound must be finite and > 0 everywhere"
    assert message(case, "w2", (bound, 0.05), fused=True, monkeypatch=monkeypatch) == want


@pytest.mark.parametrize("kind", ["frob", "w2", "kl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_good_inputs_pass_in_one_launch(kind, dtype, monkeypatch):
    """Good inputs (odd shapes, inside rows, a non-contiguous view): no error, and one
    launch of the check kernel per call."""
    from trpl_fast.kernels import validation as check_kernels

    case = [t.to(dtype) for t in make_case(kind, "diag", (5, 3), 7, seed=4, conditioning="ill")]
    case[0] = case[0].transpose(0, 1).contiguous().transpose(0, 1)
    launches = []
    original = check_kernels.launch_check_diag
    monkeypatch.setattr(check_kernels, "launch_check_diag", lambda *a, **k: launches.append(1) or original(*a, **k))
    assert message(case, kind, (0.1, torch.full((5, 1), 0.05)), fused=True, monkeypatch=monkeypatch) is None
    assert launches == [1]
    empty = [t[:0] for t in case]
    assert message(empty, kind, (0.1, 0.05), fused=True, monkeypatch=monkeypatch) is None


def test_float64_w2_ratio_beyond_float32_passes(monkeypatch):
    """float64 std ratios past float32's range are valid W2 input (no overflow in float64):
    the kernel keeps the ratio in float64 as the torch check does."""
    case = [t.clone() for t in make_case("w2", "diag", (5,), 3, seed=6)]
    case[1][2, 1], case[3][2, 1] = 1e30, 1e-10
    assert message(case, "w2", (0.1, 0.05), fused=False, monkeypatch=monkeypatch) is None
    assert message(case, "w2", (0.1, 0.05), fused=True, monkeypatch=monkeypatch) is None


@pytest.mark.parametrize("bound_shape", [(), (1, 3)], ids=["scalar_tensor", "broadcast"])
def test_empty_batch_still_checks_the_bounds(bound_shape, monkeypatch):
    """An empty batch has no rows to check, but a bad bound tensor is still refused (the
    torch checks run: the kernel would see the bound expanded to no rows)."""
    case = [t[:0].reshape(0, 3, 4) for t in make_case("kl", "diag", (2,), 4, seed=7)]
    bound = torch.full(bound_shape, -1.0)
    want = "mean_bound must be finite and > 0 everywhere"
    assert message(case, "kl", (bound, 0.05), fused=False, monkeypatch=monkeypatch) == want
    assert message(case, "kl", (bound, 0.05), fused=True, monkeypatch=monkeypatch) == want
