"""CPU decode step of SmolLM2-135M (fp32, 1 thread, batch 1, 2k-token prompt): median forward time per
step for DynamicCache + sdpa and pagedkv formats with attn_implementation="pagedkv", alternating, then
the Python profile (cProfile, by own time) of 16 steps of the first pagedkv format.

python scripts/cpu_decode_profile.py --formats int4 int8 [--prompt 2048] [--steps 24] [--rounds 2]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from transformers import DynamicCache

from pagedkv import PagedKVCache
from pagedkv.bench.generate import prompt_ids, smollm2


def step_times(model, ids, kind: str, steps: int, profile: bool = False) -> float:
    if kind == "dynamic":
        cache = DynamicCache(config=model.config)
        model.set_attn_implementation("sdpa")
    else:
        cache = PagedKVCache(model.config, kv_format=kind)
        model.set_attn_implementation("pagedkv")
    times = []
    prof = cProfile.Profile() if profile else None
    with torch.inference_mode():
        out = model(ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            if prof is not None and i == steps - 16:
                prof.enable()
            t = time.perf_counter()
            out = model(tok, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
            tok = out.logits[:, -1:].argmax(-1)
    if prof is not None:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    times.sort()
    return times[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="+", default=["int4", "int8"])
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = smollm2(torch.device("cpu"), torch.float32)
    ids = prompt_ids(model, 1, args.prompt, torch.device("cpu"), True)
    for r in range(args.rounds):
        base = step_times(model, ids, "dynamic", args.steps)
        line = [f"round {r}: dynamic {base:.2f} ms"]
        for fmt in args.formats:
            ms = step_times(model, ids, fmt, args.steps)
            line.append(f"{fmt} {ms:.2f} ms ({base / ms:.2f}x)")
        print(", ".join(line), flush=True)
    step_times(model, ids, args.formats[0], args.steps, profile=True)


if __name__ == "__main__":
    main()
