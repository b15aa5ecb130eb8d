"""Decode attention time against the number of context splits (the planner's choice and forced
counts), to tune the CUDA split planner. GPU only. Times are device time per call with calls issued
back to back (``stream_time_us``).

    python scripts/split_sweep.py --fmt int8 int4 --batch 1 8 --context 32768 --splits 0 8 16 32 64 128
"""

from __future__ import annotations

import argparse

import torch

from pagedkv import ops
from pagedkv.bench.attention import SHAPES, Pages
from pagedkv.bench.timing import stream_time_us
from pagedkv.config import DEFAULT_BLOCK_SIZE, FORMATS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", nargs="+", default=["int8", "int4"])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, nargs="+", default=[32768])
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 8, 16, 32, 64, 128])
    ap.add_argument("--block-size", type=int, default=None, help="tokens per page (default: the cache's)")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    hq, hkv, d = SHAPES[a.shape]
    dev = torch.device("cuda")
    print("| format | batch | context | " + " | ".join(f"splits {s or 'auto'} µs" for s in a.splits) + " |")
    print("|---|---|---|" + "---|" * len(a.splits))
    for b in a.batch:
        for n in a.context:
            q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
            k = torch.randn(b, hkv, n, d, device=dev, dtype=torch.bfloat16)
            for fmt in a.fmt:
                p = Pages(k, k, fmt, a.block_size or DEFAULT_BLOCK_SIZE)
                f = FORMATS[fmt]
                row = []
                for s in a.splits:
                    def call(s=s):
                        return ops.paged_attention(q, p.k_pages, p.v_pages, p.table, p.lens, k_format=f, v_format=f,
                                                   k_group=p.kg, v_group=p.vg, block_size=p.bs,
                                                   blocks_per_chunk=p.bpc, num_kv_heads=p.h, scale=d ** -0.5,
                                                   num_splits=s)
                    row.append(f"{stream_time_us(call, dev, reps=a.reps):.1f}")
                print(f"| {fmt} | {b} | {n} | " + " | ".join(row) + " |", flush=True)
                del p
            del k
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
