"""Host time of one paged_attention call on the GPU: the CPU wall time of back-to-back calls at a
small shape (its kernels take less time than the host spends, so the queue never fills), median
over rounds, beside SDPA's in the same process. Run it under two builds to compare their host paths.

    python scripts/host_time.py --fmt int8 int4 --batch 1 8 --context 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pagedkv.bench.attention import SHAPES, Pages
from pagedkv.config import DEFAULT_BLOCK_SIZE


def host_us(fn, calls: int, rounds: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", nargs="+", default=["int8", "int4"])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, nargs="+", default=[1024])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    hq, hkv, d = SHAPES[a.shape]
    dev = torch.device("cuda")
    print("| batch | context | method | host µs per call |")
    print("|---|---|---|---|")
    for b in a.batch:
        for n in a.context:
            q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
            k = torch.randn(b, hkv, n, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            us = host_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), a.calls, a.rounds)
            print(f"| {b} | {n} | sdpa | {us:.1f} |", flush=True)
            for fmt in a.fmt:
                p = Pages(k, v, fmt, DEFAULT_BLOCK_SIZE)
                print(f"| {b} | {n} | {fmt} | {host_us(lambda: p(q), a.calls, a.rounds):.1f} |", flush=True)


if __name__ == "__main__":
    main()
