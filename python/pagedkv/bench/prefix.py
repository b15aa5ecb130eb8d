"""Shared-prompt serving: requests that share a long prompt, with and without prefix caching.

``--requests`` requests (default 32) share a ``--prompt``-token prompt (default 4096) and each add a
``--suffix``-token suffix (default 64). All requests stay resident together (as concurrent requests
would). Printed side by side, per cache format:

- prefill tokens the model computed, against one prompt plus the suffixes (target <= 1.1x);
- KV bytes held by all requests, against one prompt plus the suffixes stored once in the same format
  (target <= 1.1x);
- the prefix-cache hit rate, and the prefill wall time with and without prefix caching.

The model is random-initialized from a Llama config (shapes matter here, not quality).
"""

from __future__ import annotations

import argparse
import time

import torch

import pagedkv
from pagedkv.bench.common import environment, markdown_table, write_json


def build_model(layers: int, hidden: int, kv_heads: int, head_dim: int, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // head_dim, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=16384)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def serve(model, requests: list[torch.Tensor], fmt: str, prefix_caching: bool, chunk: int) -> dict:
    store = pagedkv.KVStore(model.config, fmt, prefix_caching=prefix_caching)
    caches, computed = [], 0
    start = time.perf_counter()
    for ids in requests:
        cache = pagedkv.PagedKVCache(model.config, store=store)
        reused = cache.prepare(ids)
        pagedkv.prefill(model, ids, cache, start=reused, chunk_size=chunk)
        computed += ids.shape[1] - reused
        if prefix_caching:
            cache.cache_prefix(ids)
        caches.append(cache)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    residual = sum(layer.residual_keys.nbytes + layer.residual_values.nbytes for c in caches for layer in c.layers
                   if layer.residual_keys is not None)
    held = store.memory_bytes()["used_bytes"] + residual
    out = dict(computed_tokens=computed, kv_bytes=held, seconds=seconds)
    if prefix_caching:
        out.update(store.prefix_stats())
    for c in caches:
        c.release()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv.bench prefix", description=__doc__)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--suffix", type=int, default=64)
    ap.add_argument("--formats", nargs="+", default=["bf16", "int4"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dtype = torch.bfloat16
    model = build_model(args.layers, args.hidden, args.kv_heads, args.head_dim, args.device, dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 32000, (1, args.prompt), generator=g)
    requests = [torch.cat([prompt, torch.randint(0, 32000, (1, args.suffix), generator=g)], 1).to(args.device)
                for _ in range(args.requests)]
    ideal_tokens = args.prompt + args.requests * args.suffix

    # Warm-up (lazy initialization, kernel selection) so the first timed format is not penalized.
    for fmt in args.formats:  # full-size requests: the allocator and attention kernels see every shape once
        serve(model, requests[:2], fmt, True, args.chunk)
        serve(model, requests[:2], fmt, False, args.chunk)

    rows, records = [], []
    for fmt in args.formats:
        # Bytes of one prompt plus the suffixes stored once in this format (a single sequence of that length).
        once = pagedkv.PagedKVCache(model.config, fmt)
        pagedkv.prefill(model, torch.randint(0, 32000, (1, ideal_tokens), generator=g).to(args.device), once,
                        chunk_size=args.chunk)
        ideal_bytes = once.memory_stats()["bytes_used"]
        once.reset()
        with_pc = serve(model, requests, fmt, True, args.chunk)
        without = serve(model, requests, fmt, False, args.chunk)
        rows.append([fmt, f"{with_pc['computed_tokens']:,} ({with_pc['computed_tokens'] / ideal_tokens:.3f}x)",
                     f"{without['computed_tokens']:,} ({without['computed_tokens'] / ideal_tokens:.2f}x)",
                     f"{with_pc['kv_bytes'] / 2**20:,.1f} MiB ({with_pc['kv_bytes'] / ideal_bytes:.3f}x)",
                     f"{without['kv_bytes'] / 2**20:,.1f} MiB ({without['kv_bytes'] / ideal_bytes:.2f}x)",
                     f"{with_pc['hit_rate']:.3f}", f"{with_pc['seconds']:.2f} s", f"{without['seconds']:.2f} s",
                     f"{without['seconds'] / with_pc['seconds']:.1f}x"])
        records.append(dict(format=fmt, ideal_tokens=ideal_tokens, ideal_bytes=ideal_bytes, prefix_caching=with_pc,
                            no_prefix_caching=without))
    print(f"## {args.requests} requests sharing a {args.prompt}-token prompt, {args.suffix}-token suffixes "
          f"(random Llama: {args.layers} layers, {args.kv_heads} KV heads x {args.head_dim}, {args.device})\n")
    print(markdown_table(["format", "prefill tokens, prefix cache (vs ideal)", "prefill tokens, none",
                          "KV bytes, prefix cache (vs ideal)", "KV bytes, none", "hit rate", "prefill time, prefix cache",
                          "prefill time, none", "speed-up"], rows))
    write_json(args.json, dict(environment(), args=vars(args), results=records))


if __name__ == "__main__":
    main()
