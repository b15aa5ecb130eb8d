"""KV bytes per token for every format on a Llama-3-8B-shaped cache, measured from a filled cache.

Pages are counted in whole blocks, every scale and zero point included; the full-precision residual
window of the grouped formats (int4/int2/nf4) is excluded from bytes/token and reported apart. The
second table fills one cache step by step and shows reserved memory following the tokens stored.
"""

from __future__ import annotations

import argparse

import torch

from pagedkv import PagedKVCache
from pagedkv.bench.common import environment, markdown_table, write_json

SHAPES = {"llama3-8b": (32, 8, 128), "llama3.2-1b": (16, 8, 64)}
FORMATS = ["bf16", "fp8_e4m3", "int8", "nf4", "int4", "int2"]


def fill(cache: PagedKVCache, num_layers: int, heads: int, dim: int, tokens: int, step: int) -> None:
    done = 0
    while done < tokens:
        n = min(step, tokens - done)
        kv = torch.randn(1, heads, n, dim, dtype=torch.bfloat16)
        for layer in range(num_layers):
            cache.update(kv, kv, layer)
        done += n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv.bench memory", description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and growth points")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    num_layers, heads, dim = SHAPES[args.shape]
    tokens = 1024 if args.quick else args.tokens

    rows, records = [], []
    bf16_per_token = None
    for fmt in FORMATS:
        cache = PagedKVCache(None, kv_format=fmt, num_layers=num_layers, num_kv_heads=heads, head_dim=dim)
        fill(cache, num_layers, heads, dim, tokens, step=tokens)
        s = cache.memory_stats()
        paged_tokens = cache.layers[0].num_paged
        per_token = s["paged_bytes"] / paged_tokens
        bf16_per_token = bf16_per_token or per_token
        lay = cache._pages[0]
        bits_k = lay.key_layout["bits_per_element"]
        bits_v = lay.value_layout["bits_per_element"]
        rows.append([fmt, f"{bits_k:.3f}", f"{bits_v:.3f}", f"{per_token:,.0f}", f"{per_token / bf16_per_token:.3f}x",
                     paged_tokens, f"{s['residual_bytes']:,}"])
        records.append(dict(format=fmt, key_bits=bits_k, value_bits=bits_v, bytes_per_token=per_token,
                            ratio_vs_bf16=per_token / bf16_per_token, paged_tokens=paged_tokens,
                            residual_bytes=s["residual_bytes"]))
    print(f"## KV bytes per token, {args.shape} shape ({num_layers} layers x {heads} KV heads x head_dim {dim}), "
          f"{tokens} tokens, batch 1\n")
    print(markdown_table(["format", "key bits/elem", "value bits/elem", "paged bytes/token", "vs bf16",
                          "tokens in pages", "residual window bytes (excluded)"], rows))

    growth = []
    cache = PagedKVCache(None, kv_format="int4", num_layers=num_layers, num_kv_heads=heads, head_dim=dim)
    points = [256, 1024] if args.quick else [256, 1024, 4096, 8192]
    done = 0
    for p in points:
        fill(cache, num_layers, heads, dim, p - done, step=256)
        done = p
        s = cache.memory_stats()
        growth.append([p, f"{s['paged_bytes'] / 2**20:.1f}", f"{s['reserved_bytes'] / 2**20:.1f}",
                       f"{s['dense_bf16_bytes'] / 2**20:.1f}", f"{s['ratio_vs_bf16']:.3f}"])
    print("\n## int4 memory follows the tokens stored (no maximum is reserved)\n")
    print(markdown_table(["tokens", "pages used MiB", "reserved MiB (pages + residual)", "bf16 DynamicCache MiB",
                          "used / bf16"], growth))
    write_json(args.json, dict(env=environment(), shape=args.shape, tokens=tokens, formats=records,
                               growth=[dict(zip(["tokens", "paged_mib", "reserved_mib", "dense_mib", "ratio"], g))
                                       for g in growth]))


if __name__ == "__main__":
    main()
