"""Decode step time of one format with cache options at their defaults and changed, alternating, and
optionally the top ops of three steps of the first variant. Variants: defaults; neither
(exact_prefix=0, value_rotation=False); nocheck (check_finite=False); dynamic (DynamicCache + sdpa, the
baseline). Each variant reports the median step (synchronized) and the median host time of a step (until
the forward returns, before the synchronization): the host's share of a step. GPU: random-init
Llama-3.2-1B shape in bf16; CPU (--device cpu): real SmolLM2-135M in fp32 on --threads threads, batch 1.

python scripts/decode_variants.py --fmt int4 --batch 16 --prompt 16384 --new 64 --variants defaults nocheck
python scripts/decode_variants.py --device cpu --batch 1 --prompt 2048 --new 24 --variants dynamic defaults --cprofile
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from transformers import DynamicCache

from pagedkv import PagedKVCache
from pagedkv.bench.generate import llama32_1b, prompt_ids, smollm2


VARIANTS = {"defaults": {}, "neither": dict(exact_prefix=0, value_rotation=False), "nocheck": dict(check_finite=False),
            "dynamic": None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--fmt", default="int4")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=16384)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--variants", nargs="+", default=["defaults", "neither"], choices=sorted(VARIANTS))
    ap.add_argument("--profile", action="store_true", help="print the top ops of three steps of the first variant")
    ap.add_argument("--sort", default=None, help="profiler table order (cpu_time_total, self_cpu_time_total, "
                    "cuda_time_total, ...; default cuda_time_total on the GPU, self_cpu_time_total on the CPU)")
    ap.add_argument("--cprofile", action="store_true", help="print the Python functions with the most host time "
                    "over the decode steps of the first variant")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    if gpu:
        model = llama32_1b(dev, torch.bfloat16)
    else:
        torch.set_num_threads(args.threads)
        model = smollm2(dev, torch.float32)
    ids = prompt_ids(model, args.batch, args.prompt, dev, not gpu)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    for name in args.variants * 2:  # alternate: order effects
        kw = VARIANTS[name]
        if kw is None:
            cache = DynamicCache(config=model.config)
            model.set_attn_implementation("sdpa")
        else:
            cache = PagedKVCache(model.config, kv_format=args.fmt, **kw)
            model.set_attn_implementation("pagedkv")
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            times, host = [], []
            prof_py = cProfile.Profile() if args.cprofile and name == args.variants[0] else None
            if prof_py is not None:
                prof_py.enable()
            for i in range(args.new):
                sync()
                t = time.perf_counter()
                out = model(tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                host.append(time.perf_counter() - t)
                sync()
                times.append(time.perf_counter() - t)
            if prof_py is not None:
                prof_py.disable()
                pstats.Stats(prof_py).sort_stats("tottime").print_stats(25)
                args.cprofile = False
            if name == args.variants[0] and args.profile:
                with torch.profiler.profile(activities=activities) as prof:
                    for _ in range(3):
                        out = model(tok, past_key_values=cache, use_cache=True)
                        tok = out.logits[:, -1:].argmax(-1)
                    sync()
                sort = args.sort or ("cuda_time_total" if gpu else "self_cpu_time_total")
                print(prof.key_averages().table(sort_by=sort, row_limit=25))
                args.profile = False
        times.sort()
        host.sort()
        print(f"{args.fmt if kw is not None else str(model.dtype).removeprefix('torch.')} {name}: median decode step {1e3 * times[len(times) // 2]:.2f} ms, "
              f"host {1e3 * host[len(host) // 2]:.2f} ms", flush=True)
        del cache, out
        if gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
