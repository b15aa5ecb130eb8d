"""Timeline of the decode-attention kernel's blocks, from a build with -DPAGEDKV_CTA_TIMES (each warp
prints its launch, start, loop start, loop end and exit times from %globaltimer, and its SM): how
long the prologue, the loop and the epilogue take, and how far the blocks' starts and ends spread.
GPU only; an experiment, not part of the package's build.

    CUDA_FLAGS=-DPAGEDKV_CTA_TIMES bash scripts/gpu.sh build
    python scripts/cta_times.py --fmt int8 int4 --batch 8 --context 32768
    python scripts/cta_times.py --fmt int4 --shape gemma3-1b --batch 16 --context 8192 --tail 192

--tail keeps the newest tokens dense beside the pages (as the cache's residual window); the loop
time then includes the warp's tail steps, and the table splits the warps with one from the others.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import sys


def child(a: argparse.Namespace) -> None:
    import torch

    from pagedkv.bench.attention import SHAPES, Pages
    from pagedkv.config import DEFAULT_BLOCK_SIZE

    hq, hkv, d = SHAPES[a.shape]
    q = torch.randn(a.batch, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(a.batch, hkv, a.context, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pages = Pages(k, v, a.fmt, DEFAULT_BLOCK_SIZE, a.tail)
    del k, v
    for i in range(a.calls):
        print(f"CALL {i}", flush=True)
        pages(q)
        torch.cuda.synchronize()
    print("END", flush=True)


def q(xs: list[float]) -> str:
    """min / 5th percentile / median / 95th percentile / max."""
    if not xs:
        return "none"
    xs = sorted(xs)
    pc = lambda f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    return f"{xs[0]:.1f} / {pc(0.05):.1f} / {statistics.median(xs):.1f} / {pc(0.95):.1f} / {xs[-1]:.1f}"


def summarize(fmt: str, text: str, tail: int = 0) -> None:
    calls: list[list[list[int]]] = []
    for line in text.splitlines():
        if line.startswith("CALL"):
            calls.append([])
        elif line.startswith("CTA") and calls:
            calls[-1].append([int(x) for x in line.split()[1:]])
    rows = calls[-1]  # the last call: warm
    t0 = min(r[5] for r in rows)
    us = lambda x: (x - t0) / 1e3  # noqa: E731
    per_sm = collections.Counter()
    for r in rows:
        if r[3] == 0:
            per_sm[r[4]] += 1
    span = max(r[9] for r in rows) - t0
    print(f"\n{fmt}: {len(rows) // 4} blocks on {len(per_sm)} SMs ({dict(sorted(collections.Counter(per_sm.values()).items()))} "
          f"SMs by blocks), kernel span {span / 1e3:.1f} µs from the first launch")
    print("| µs over warps (min / p5 / median / p95 / max) | value |")
    print("|---|---|")
    print(f"| launch (from the first) | {q([us(r[5]) for r in rows])} |")
    print(f"| wait for the kernel before | {q([(r[6] - r[5]) / 1e3 for r in rows])} |")
    print(f"| prologue (start to loop) | {q([(r[7] - r[6]) / 1e3 for r in rows])} |")
    print(f"| loop | {q([(r[8] - r[7]) / 1e3 for r in rows])} |")
    print(f"| epilogue (loop end to exit) | {q([(r[9] - r[8]) / 1e3 for r in rows])} |")
    print(f"| loop end (from the first launch) | {q([us(r[8]) for r in rows])} |")
    print(f"| exit (from the first launch) | {q([us(r[9]) for r in rows])} |")
    for n in sorted(set(per_sm.values())):
        sel = [r for r in rows if per_sm[r[4]] == n]
        print(f"| loop, SMs with {n} blocks | {q([(r[8] - r[7]) / 1e3 for r in sel])} |")
    blocks = collections.defaultdict(list)
    for r in rows:
        blocks[(r[0], r[1], r[2])].append(r)
    print(f"| loop-end spread within a block | {q([(max(r[8] for r in b) - min(r[8] for r in b)) / 1e3 for b in blocks.values()])} |")
    print(f"| loop end, block mean (from the first launch) | {q([us(statistics.fmean(r[8] for r in b)) for b in blocks.values()])} |")
    if tail:  # tail step j goes to warp j of the sequence's splits x 4 (one wave: j < splits x 4)
        has = [r for r in rows if 4 * r[0] + r[3] < -(-tail // 16)]
        rest = [r for r in rows if 4 * r[0] + r[3] >= -(-tail // 16)]
        print(f"| loop, warps with a tail step ({len(has)}) | {q([(r[8] - r[7]) / 1e3 for r in has])} |")
        print(f"| loop, the other warps ({len(rest)}) | {q([(r[8] - r[7]) / 1e3 for r in rest])} |")
    steps = [r[10] for r in rows]
    print(f"| tokens per warp | {min(steps)} / {max(steps)} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", nargs="+", default=["int8"])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--tail", type=int, default=0)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        a.fmt = a.child
        child(a)
        return
    for fmt in a.fmt:
        cmd = [sys.executable, __file__, "--child", fmt, "--shape", a.shape, "--batch", str(a.batch), "--context",
               str(a.context), "--calls", str(a.calls), "--tail", str(a.tail)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        summarize(fmt, out, a.tail)


if __name__ == "__main__":
    main()
