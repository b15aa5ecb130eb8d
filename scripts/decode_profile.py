"""Where a graph decode step's GPU time goes: the kernels of 20 replayed steps, by total time.

    python scripts/decode_profile.py --model gemma3-1b --fmt int4 [--residual-length N] [--batch 16 --prompt 8192]

Builds the bench's random-init model, prefills one prompt, then replays GraphDecoder steps under the
torch profiler and prints its CUDA kernel table (top 15) and the mean step time."""

from __future__ import annotations

import argparse
import time

import torch

import pagedkv
from pagedkv.bench.generate import gemma3_1b, llama32_1b, prompt_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["gemma3-1b", "llama3.2-1b"], default="gemma3-1b")
    ap.add_argument("--fmt", default="int4")
    ap.add_argument("--residual-length", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = (gemma3_1b if args.model == "gemma3-1b" else llama32_1b)(dev, torch.bfloat16)
    model.set_attn_implementation("pagedkv")
    ids = prompt_ids(model, args.batch, args.prompt, dev, real_text=False)
    cache = pagedkv.PagedKVCache(model.config, kv_format=args.fmt, residual_length=args.residual_length)
    with torch.inference_mode():
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    with pagedkv.GraphDecoder(model, cache, max_new_tokens=3 * args.steps + 8) as dec:
        tok = logits.argmax(-1, keepdim=True)
        for _ in range(args.steps):  # eager steps, captures, replays
            tok = dec.step(tok).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                tok = dec.step(tok).argmax(-1, keepdim=True)
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
    print(f"{args.model} {args.fmt} residual {cache.residual_length}: {dt * 1e3:.2f} ms a step (profiled)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
