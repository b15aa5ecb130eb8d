"""Kernel-level view of one decode-attention configuration (run under ncu, or alone for a torch
profiler table): where the op's time goes, kernel by kernel.

    python scripts/profile_attention.py --fmt int4 --context 32768 --batch 8
    python scripts/profile_attention.py --fmt int4 --shape gemma3-1b --batch 16 --context 8192 --tail 192
    ncu --kernel-name regex:attention --launch-skip 3 --launch-count 1 --section SpeedOfLight \
        python scripts/profile_attention.py --fmt int4 --calls 5 --no-table
"""

from __future__ import annotations

import argparse

import torch

from pagedkv.bench.attention import SHAPES, Pages
from pagedkv.config import DEFAULT_BLOCK_SIZE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", default="int4")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--tail", type=int, default=0, help="newest tokens kept dense beside the pages")
    ap.add_argument("--no-table", action="store_true")
    a = ap.parse_args()
    hq, hkv, d = SHAPES[a.shape]
    q = torch.randn(a.batch, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(a.batch, hkv, a.context, d, device="cuda", dtype=torch.bfloat16)
    pages = Pages(k, k, a.fmt, DEFAULT_BLOCK_SIZE, a.tail)
    del k
    for _ in range(3):
        pages(q)
    torch.cuda.synchronize()
    if a.no_table:
        for _ in range(a.calls):
            pages(q)
        torch.cuda.synchronize()
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(a.calls):
            pages(q)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
