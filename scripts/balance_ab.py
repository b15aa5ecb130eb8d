"""Decode attention with the balanced schedule (the default for splits of >= 1024 entries) against the
static one (``torch.use_deterministic_algorithms(True)``) and torch SDPA on a dense bf16 cache, timed
side by side in one run: rounds alternate the methods, and each method's figure is its median over
the rounds. GPU only. Also prints the largest difference between the two schedules' outputs.

    python scripts/balance_ab.py --fmt int8 fp8_e4m3 int4 int2 --batch 8 --context 8192 32768
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from pagedkv.bench.attention import SHAPES, Pages
from pagedkv.bench.timing import stream_time_us
from pagedkv.config import DEFAULT_BLOCK_SIZE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", nargs="+", default=["int8", "fp8_e4m3", "int4", "int2"])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--context", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    hq, hkv, d = SHAPES[a.shape]
    dev = torch.device("cuda")
    print("| format | batch | context | SDPA µs | static µs | balanced µs | static ratio | balanced ratio | max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in a.batch:
        for n in a.context:
            q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
            k = torch.randn(b, hkv, n, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            for fmt in a.fmt:
                p = Pages(k, v, fmt, a.block_size)

                def sdpa():
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

                def static_time(fn):  # the static schedule for the whole timing
                    torch.use_deterministic_algorithms(True, warn_only=True)
                    try:
                        return fn()
                    finally:
                        torch.use_deterministic_algorithms(False)

                diff = (static_time(lambda: p(q)).float() - p(q).float()).abs().max().item()
                t = {"sdpa": [], "static": [], "balanced": []}
                for _ in range(a.rounds):
                    t["sdpa"].append(stream_time_us(sdpa, dev, reps=a.reps))
                    t["static"].append(static_time(lambda: stream_time_us(lambda: p(q), dev, reps=a.reps)))
                    t["balanced"].append(stream_time_us(lambda: p(q), dev, reps=a.reps))
                m = {key: statistics.median(x) for key, x in t.items()}
                print(f"| {fmt} | {b} | {n} | {m['sdpa']:.1f} | {m['static']:.1f} | {m['balanced']:.1f} | "
                      f"{m['sdpa'] / m['static']:.2f} | {m['sdpa'] / m['balanced']:.2f} | {diff:.2e} |", flush=True)
                del p
            del k, v
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
