"""Where a decode-attention call's device time goes, kernel by kernel, against context length: the
stream time per call (calls back to back), the graph time per call (calls replayed from one CUDA
graph: no host time), each kernel's duration and the idle gaps between them, for
our op per format and for SDPA on a dense bf16 cache. A line through time against context separates
the per-token cost (slope) from the fixed cost per call (intercept). GPU only.

    python scripts/fixed_cost.py --fmt int8 int4 --batch 8 --context 8192 32768 131072
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from pagedkv.bench.attention import SHAPES, Pages
from pagedkv.bench.timing import graph_time_us, stream_time_us
from pagedkv.config import DEFAULT_BLOCK_SIZE


def kernel_trace(fn, calls: int) -> tuple[dict[str, float], float]:
    """(mean duration per call of each kernel name in µs, mean idle µs per call between kernels)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    per: dict[str, float] = {}
    for a, b, name in spans:
        per[name] = per.get(name, 0.0) + (b - a) / calls
    busy = sum(b - a for a, b, _ in spans)
    idle = (spans[-1][1] - spans[0][0] - busy) / calls if spans else 0.0
    return per, idle


def short(name: str) -> str:
    for key in ("attention_decode", "merge", "attention_mma", "attention_kernel", "flash", "fmha", "splitkv",
                "combine", "reduce"):
        if key in name.lower():
            return key
    return name[:40]


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", nargs="+", default=["int8", "int4"])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--calls", type=int, default=20, help="calls traced by the profiler")
    a = ap.parse_args()
    hq, hkv, d = SHAPES[a.shape]
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, {a.shape} heads, batch {a.batch}, {DEFAULT_BLOCK_SIZE}-token pages")
    print("| method | context | stream µs | graph µs | kernels µs (mean per call) | idle µs between kernels |")
    print("|---|---|---|---|---|---|")
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for n in a.context:
        q = torch.randn(a.batch, hq, 1, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(a.batch, hkv, n, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        methods = {"sdpa-bf16": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
        pages = {f: Pages(k, v, f, DEFAULT_BLOCK_SIZE) for f in a.fmt}
        methods.update({f: (lambda p=p: p(q)) for f, p in pages.items()})
        for name, fn in methods.items():
            us = stream_time_us(fn, dev, reps=a.reps)
            gus = graph_time_us(fn, reps=a.reps)
            per, idle = kernel_trace(fn, a.calls)
            ks = ", ".join(f"{short(kn)} {t:.1f}" for kn, t in sorted(per.items(), key=lambda x: -x[1]))
            print(f"| {name} | {n} | {us:.1f} | {gus:.1f} | {ks} | {idle:.1f} |", flush=True)
            xs, ys = lines.setdefault(name, ([], []))
            xs.append(n / 1024)
            ys.append(us)
        del pages, k, v
        torch.cuda.empty_cache()
    if len(a.context) > 1:
        print("\n| method | µs per 1k tokens | µs at 0 (fixed cost per call) |")
        print("|---|---|---|")
        for name, (xs, ys) in lines.items():
            slope, icpt = fit(xs, ys)
            print(f"| {name} | {slope:.2f} | {icpt:.1f} |")


if __name__ == "__main__":
    main()
