"""Turn pytest-benchmark JSON files into the markdown tables of bench/RESULTS.md.

    python -m bench.report bench/results/cpu_frob_w2.json [more.json ...]

One row per (device, kind, form, d, n, mode): the median time of each provider with its
interquartile range, the speedup of trpl over eager torch and over torch.compile(eager),
and for the diagonal ops the bandwidth trpl achieves (bytes that must move / median) as
a fraction of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def load(paths):
    rows = defaultdict(dict)
    meta = {}
    for path in paths:
        data = json.load(open(path))
        meta[path] = data.get("machine_info", {})
        for b in data["benchmarks"]:
            info = b["extra_info"]
            key = (info["device"], info["kind"], info["form"], info["d"], info["n"], info["mode"])
            rows[key][info["provider"]] = (b["stats"], info)
    return rows, meta


def _cell(prov: dict, p: str) -> str:
    """Median (IQR) of provider ``p`` in one row of results."""
    if p not in prov:
        return "-"
    st = prov[p][0]
    return f"{fmt_time(st['median'])} ({fmt_time(st['iqr'])})"


def _ratio(prov: dict, p: str) -> str:
    """Provider ``p``'s median over ours."""
    if "trpl" not in prov or p not in prov:
        return "-"
    return f"{prov[p][0]['median'] / prov['trpl'][0]['median']:.2f}x"


def table(rows) -> str:
    out = [
        "| device | kind | form | d | states | mode | trpl | eager | compiled | vs eager | vs compiled | trpl GB/s | of copy BW |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(rows, key=lambda k: (k[0], k[1], k[2], k[3], k[4], ["fwd", "bwd", "full"].index(k[5]))):
        device, kind, form, d, n, mode = key
        prov = rows[key]

        bw = frac = "-"
        if "trpl" in prov and "bytes" in prov["trpl"][1]:
            st, info = prov["trpl"]
            gbs = info["bytes"] / st["median"] / 1e9
            bw = f"{gbs:.1f}"
            frac = f"{info['bytes'] / st['median'] / info['copy_bandwidth']:.0%}"
        out.append(
            f"| {device} | {kind} | {form} | {d} | {n:,} | {mode} | {_cell(prov, 'trpl')} | {_cell(prov, 'eager')} | "
            f"{_cell(prov, 'compiled')} | {_ratio(prov, 'eager')} | {_ratio(prov, 'compiled')} | {bw} | {frac} |"
        )
    return "\n".join(out)


def main(paths) -> None:
    rows, meta = load(paths)
    bws = {
        info.get("device"): info.get("copy_bandwidth")
        for r in rows.values()
        for _, info in r.values()
        if info.get("copy_bandwidth")
    }
    for dev, bw in sorted(bws.items()):
        print(f"- copy bandwidth measured in the run ({dev}): {bw / 1e9:.1f} GB/s (read + write)")
    for path, m in meta.items():
        print(
            f"- {path}: {m.get('cpu', {}).get('brand_raw', '?')}, {m.get('cpu', {}).get('count', '?')} cores, "
            f"python {m.get('python_version', '?')}"
        )
    print()
    print("Medians (interquartile range); float32; every state outside its trust region.")
    print()
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
