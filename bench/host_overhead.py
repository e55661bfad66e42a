"""Host work per projection call: the operators against the ops' eager fast path (issue 12,
"no host work per call"), in one process, the two paths alternated round by round.

Per case (kind, form, rows, d, dtype): the median over ``--rounds`` of the wall time per
call of a loop of ``--calls`` calls -- forward only under ``torch.no_grad`` and forward +
backward (``autograd.grad`` of the outputs against fixed upstream gradients) -- through
``trpl_fast.functional.project`` with ``check_values=False`` (the value checks are their
own cost: ``--checks`` adds the forward with the default checks -- deferred, on CUDA one
check kernel for diagonal covariances), by the operators and by the fast path.

``--device cuda``: the kernels run; at small sizes the loop is host-bound, so its time per
call is the host work per call; ``--graph`` adds the same forward + backward captured in one
CUDA graph and replayed, timed with CUDA events (the GPU work alone: no host work per call
at all, the floor the eager paths are measured against).

``--device cpu``: the CPU implementations (the KL ops' C kernels, ``kernels/kl_cpu.c``,
and batched torch for the others) through the fast path and through the operators, and
for KL beside the operators on the torch solve (no C kernel): the per-call cost of an
eager CPU call at the training loop's size.

``--device cpu --stub-kernels``: no GPU. The launchers are replaced by stubs that only
allocate their outputs, and "cpu" joins the kernel device types, so both paths do all their
host work except the kernel launch itself (Triton's own launch cost, ~10-20 us, is then the
same for both): what the fast path removes, measured on this machine's CPU.

    python -m bench.host_overhead --device cpu --stub-kernels --out bench/results/host_overhead_cpu_stub.json
    python -m bench.host_overhead --device cpu --out bench/results/host_overhead_cpu.json
    python -m bench.host_overhead --device cuda --graph --out $OUT/host_overhead_cuda.json

Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

from ._output import emit

DIAG_CASES = [("frob", 32, 6), ("w2", 32, 6), ("kl", 32, 6), ("kl", 4096, 17), ("kl", 65536, 17)]
FULL_CASES = [("frob", 32, 6), ("w2", 32, 6), ("kl", 32, 6), ("kl", 512, 17)]


def _case(kind, form, rows, d, dtype, device):
    import torch

    gen = torch.Generator().manual_seed(rows + d)
    f64 = torch.float64
    old_mean = torch.randn(rows, d, generator=gen, dtype=f64)
    mean = old_mean + 0.5 * torch.randn(rows, d, generator=gen, dtype=f64)
    if form == "diag":
        old_cov = torch.exp(0.3 * torch.randn(rows, d, generator=gen, dtype=f64))
        cov = old_cov * torch.exp(0.5 * torch.randn(rows, d, generator=gen, dtype=f64))
    else:

        def chol():  # a lower Cholesky factor; W2 takes the symmetric root instead
            a = torch.randn(rows, d, d, generator=gen, dtype=f64) / d**0.5
            s = a @ a.mT + 0.5 * torch.eye(d, dtype=f64)
            if kind != "w2":
                return torch.linalg.cholesky(s)
            ev, u = torch.linalg.eigh(s)
            return u @ torch.diag_embed(ev.sqrt()) @ u.mT

        old_cov, cov = chol(), chol()
    # contiguous (as a network builds them; cholesky returns column-major factors)
    return [t.to(dtype).to(device).contiguous() for t in (mean, cov, old_mean, old_cov)]


@contextlib.contextmanager
def _stub_kernels():
    """Launchers that allocate their outputs and launch nothing; "cpu" a kernel device."""
    import torch

    from trpl_fast.ops import OPS, _common
    from trpl_fast.ops import kl as kl_ops

    saved = [(_common, "KERNEL_DEVICE_TYPES", _common.KERNEL_DEVICE_TYPES)]
    saved.append((kl_ops, "FUSED_DEVICE_TYPES", kl_ops.FUSED_DEVICE_TYPES))
    _common.KERNEL_DEVICE_TYPES = ("cuda", "cpu")
    kl_ops.FUSED_DEVICE_TYPES = ("cuda", "cpu")

    def forward_stub(op):
        def launch(mean, cov, *rest):
            rows, d = mean.shape
            outs = [torch.empty_like(mean), torch.empty_like(cov)]
            for a in op.aux:
                outs.append(a.empty((rows,), d, mean.dtype, mean.device))
            return tuple(outs)

        return launch

    def backward_stub(grad_mean, grad_cov, *rest):
        return torch.empty_like(grad_mean), torch.empty_like(grad_cov)

    for op in OPS.values():
        if op.launch is not None:
            saved += [(op, "launch", op.launch), (op, "launch_backward", op.launch_backward)]
            op.launch, op.launch_backward = forward_stub(op), backward_stub
        for path in op.eager:
            saved += [(path, "forward", path.forward), (path, "backward", path.backward)]
            path.forward, path.backward = forward_stub(op), backward_stub
    # the full KL op's implementation calls the fused launchers by name
    saved += [(kl_ops, "launch_kl_full_fwd", kl_ops.launch_kl_full_fwd)]
    saved += [(kl_ops, "launch_kl_full_bwd", kl_ops.launch_kl_full_bwd)]
    kl_ops.launch_kl_full_fwd = forward_stub(OPS[("kl", "full")])
    kl_ops.launch_kl_full_bwd = backward_stub
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _time_loop(fn, calls: int, sync) -> float:
    """Seconds per call of ``calls`` calls of ``fn`` (synchronized before and after)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls


def measure(kind, form, rows, d, dtype, device, calls, rounds, graph, checks=False, torch_baseline=False):
    import torch

    import trpl_fast
    from trpl_fast.functional import project

    case = _case(kind, form, rows, d, dtype, device)
    mean, cov = case[0].clone().requires_grad_(True), case[1].clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    up = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype).to(device) for t in case[:2]]
    kw = dict(kind=kind, mean_bound=0.05, cov_bound=0.01, check_values=False)

    def forward():
        with torch.no_grad():
            project(form, mean, cov, case[2], case[3], **kw)

    def forward_backward():
        mt, ct = project(form, mean, cov, case[2], case[3], **kw)
        torch.autograd.grad([mt, ct], [mean, cov], up)

    def forward_checked():  # the default value checks (deferred on CUDA)
        with torch.no_grad():
            project(form, mean, cov, case[2], case[3], **{**kw, "check_values": True})

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    paths = {"operator": (False, True), "fast_path": (True, True)}
    if torch_baseline and kind == "kl":
        paths["torch_solve"] = (False, False)  # the operator on the torch path: no C kernel
    times = {f"{p}_{w}": [] for p in paths for w in ("fwd", "fwd_bwd")}
    from trpl_fast.ops import kl as kl_ops

    c_kernels = kl_ops.CPU_KERNEL_DEVICE_TYPES
    for _ in range(rounds):
        for path, (fast, c_kernel) in paths.items():
            trpl_fast.ops.set_eager_fast_path(fast)
            kl_ops.CPU_KERNEL_DEVICE_TYPES = c_kernels if c_kernel else ()
            try:
                forward(), forward_backward()  # warm: plans, caches, compilation
                times[f"{path}_fwd"].append(_time_loop(forward, calls, sync))
                times[f"{path}_fwd_bwd"].append(_time_loop(forward_backward, calls, sync))
                if checks:
                    forward_checked()
                    times.setdefault(f"{path}_fwd_checked", []).append(_time_loop(forward_checked, calls, sync))
                    trpl_fast.raise_deferred_errors()
            finally:
                trpl_fast.ops.set_eager_fast_path(True)
                kl_ops.CPU_KERNEL_DEVICE_TYPES = c_kernels
    out = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    out = {f"{k}_us": round(v, 2) for k, v in out.items()}
    out["fwd_ratio"] = round(out["operator_fwd_us"] / out["fast_path_fwd_us"], 2)
    out["fwd_bwd_ratio"] = round(out["operator_fwd_bwd_us"] / out["fast_path_fwd_bwd_us"], 2)
    if "torch_solve" in paths:
        out["torch_solve_fwd_bwd_ratio"] = round(out["torch_solve_fwd_bwd_us"] / out["fast_path_fwd_bwd_us"], 2)
    if device == "cuda":
        out.update(_cuda_floor(form, case, mean, cov, up, kw, calls, graph))
    return out


def _cuda_floor(form, case, mean, cov, up, kw, calls, graph):
    """With ``graph``: the forward + backward captured once and replayed ``calls`` times,
    GPU time per replay from CUDA events."""
    import torch

    from trpl_fast.functional import project

    def step():
        mt, ct = project(form, mean, cov, case[2], case[3], **kw)
        return torch.autograd.grad([mt, ct], [mean, cov], up)

    res = {}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            g.replay()
        end.record()
        end.synchronize()
        res["graph_replay_fwd_bwd_us"] = round(start.elapsed_time(end) * 1e3 / calls, 2)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--stub-kernels", action="store_true", help="CPU: launchers that launch nothing (see the module)")
    p.add_argument("--graph", action="store_true", help="CUDA: also forward + backward as one replayed CUDA graph")
    p.add_argument("--checks", action="store_true", help="CUDA: also the forward with the default value checks")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cpu" and args.checks:
        p.error("--checks needs --device cuda (the CPU checks are synchronous torch reductions)")
    import torch

    import trpl_fast

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ctx = _stub_kernels() if args.stub_kernels else contextlib.nullcontext()
    results = []
    cpu_kernels = args.device == "cpu" and not args.stub_kernels
    with ctx:
        for form, cases in (("diag", DIAG_CASES), ("full", FULL_CASES)):
            for kind, rows, d in cases:
                if args.stub_kernels and (rows > 4096 or (form == "full" and kind != "kl")):
                    continue  # stubs: the size does not matter; full Frobenius / W2 have no kernel
                if cpu_kernels and rows > 4096:
                    continue  # the CPU fast path at the training loop's sizes
                r = measure(
                    kind,
                    form,
                    rows,
                    d,
                    dtype,
                    args.device,
                    args.calls,
                    args.rounds,
                    args.graph,
                    args.checks,
                    cpu_kernels,
                )
                results.append(dict(kind=kind, form=form, rows=rows, d=d, **r))
                print(results[-1], flush=True)
    env = dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        torch=torch.__version__,
        python=platform.python_version(),
        trpl_fast=getattr(trpl_fast, "__version__", "dev"),
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    emit(dict(args=vars(args), env=env, results=results), args.out)


if __name__ == "__main__":
    main()
