"""GPU time of one CUDA-graph decode step, by kernel (torch profiler over replays), per format.

python scripts/graph_profile.py --formats int4 int8 --batch 16 --prompt 16384
Random-init Llama-3.2-1B shape (as the generate benchmark); prefill, a few GraphDecoder steps (the
eager first steps and the captures), then timed and profiled replays.
"""
from __future__ import annotations

import argparse
import time

import torch

from pagedkv import GraphDecoder, PagedKVCache, prefill
from pagedkv.bench.generate import llama32_1b, prompt_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="+", default=["int4", "int8"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=14)
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = llama32_1b(dev, torch.bfloat16)
    model.set_attn_implementation("pagedkv")
    ids = prompt_ids(model, args.batch, args.prompt, dev, False)
    for fmt in args.formats:
        cache = PagedKVCache(model.config, kv_format=fmt)
        logits = prefill(model, ids, cache, chunk_size=4096)
        tok = logits.argmax(-1, keepdim=True)
        with GraphDecoder(model, cache, max_new_tokens=args.steps + 10) as dec:
            for _ in range(args.steps // 2):  # eager first steps, captures, replays of both kinds
                tok = dec.step(tok).argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            n = args.steps // 2 - 5
            for _ in range(n):
                tok = dec.step(tok).argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            ms = 1e3 * (time.perf_counter() - t) / n
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    tok = dec.step(tok).argmax(-1, keepdim=True)
                torch.cuda.synchronize()
        print(f"\n{fmt}: {ms:.3f} ms per graph step (batch {args.batch}, prompt {args.prompt}); top kernels over 5 steps:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
        del cache, dec
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
