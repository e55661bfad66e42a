"""Sweep the row kernels' tile size and warps on a GPU (not a test).

Every diagonal kernel gives each program ``TILE_ELEMENTS / BLOCK_D`` whole rows
(``kernels/_common.py``). This times each fused kernel through its launcher with
``triton.testing.do_bench`` (median, CUDA events) for every (tile, warps) pair, at 1M
states, d = 17, float32, every state projected, and prints the time and the fraction of the
copy bandwidth measured in the same run (the floor: ``bench.conftest.bytes_moved`` over
``measure_copy_bandwidth``)::

    python -m bench.tune_rows --out tune.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import trpl_fast.kernels._common as common
from trpl_fast.kernels.frobenius import launch_frob_diag_bwd, launch_frob_diag_fwd
from trpl_fast.kernels.kl import launch_kl_diag_bwd, launch_kl_diag_fwd
from trpl_fast.kernels.wasserstein import launch_w2_diag_bwd, launch_w2_diag_fwd

from .conftest import bytes_moved, make_inputs, measure_copy_bandwidth


def cases(n, d, device="cuda"):
    out, bounds = {}, (None, None, 0.03, 0.001)  # scalar bounds: (tensor, tensor, value, value)
    for kind, fwd, bwd in (
        ("frob", launch_frob_diag_fwd, launch_frob_diag_bwd),
        ("w2", launch_w2_diag_fwd, launch_w2_diag_bwd),
        ("kl", launch_kl_diag_fwd, launch_kl_diag_bwd),
    ):
        mean, std, old_mean, old_std = make_inputs(kind, "diag", n, d, device)
        g = (torch.randn_like(mean), torch.randn_like(std))
        a = (mean, std, old_mean, old_std)
        out[(kind, "fwd")] = lambda f=fwd, a=a: f(*a, *bounds)
        # the KL backward also takes the forward's solved dual variable t
        extra = (fwd(*a, *bounds)[2],) if kind == "kl" else ()
        out[(kind, "bwd")] = lambda f=bwd, a=a, g=g, extra=extra: f(*g, *a, *extra, *bounds)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1 << 20)
    p.add_argument("--d", type=int, default=17)
    p.add_argument("--tiles", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    bw = measure_copy_bandwidth("cuda")
    print(
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"n={args.n} d={args.d} float32 | copy bandwidth {bw / 1e9:.0f} GB/s"
    )
    results = []
    for (kind, mode), fn in cases(args.n, args.d).items():
        floor_ms = bytes_moved(args.n, args.d, mode) / bw * 1e3
        line = []
        for tile in args.tiles:
            for warps in args.warps:
                common.TILE_ELEMENTS, common.NUM_WARPS = tile, warps
                ms = triton.testing.do_bench(fn, return_mode="median")
                results.append(dict(kind=kind, mode=mode, tile=tile, warps=warps, ms=ms, floor_ms=floor_ms))
                line.append((ms, tile, warps))
        best = min(line)
        print(
            f"{kind:4s} {mode:3s} floor {floor_ms:.3f} ms | best {best[0]:.3f} ms (tile {best[1]}, "
            f"{best[2]} warps, {floor_ms / best[0]:.0%} of copy BW) | "
            + " ".join(f"{t}/{w}:{m:.3f}" for m, t, w in line),
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_bandwidth": bw, "gpu": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
