"""Long context at fixed memory: chunked prefill of a very long prompt into the quantized cache.

A random-initialized model with Qwen3-0.6B's shape (28 layers, 16 query / 8 KV heads, head_dim 128)
prefills ``--tokens`` tokens (default 200k on a GPU, 32k on a CPU) in chunks of ``--chunk`` tokens
through ``pagedkv.prefill``. After every ``--every`` tokens it records the KV bytes held (pages and
residual window, every scale counted), the page bytes reserved, and on a GPU the peak allocated memory.
Printed per format: KV GiB at the end against the target, bytes per token at each checkpoint (flat =
linear growth), peak memory, and the bf16 ``DynamicCache`` bytes for the same tokens (computed from the
shape: 2 x layers x KV heads x head_dim x 2 bytes per token, not allocated).

``--layers`` shrinks the model for the CPU variant (bytes per token scale with it; the checkpoints show
linearity, the GPU run shows the full-shape totals).
"""

from __future__ import annotations

import argparse
import time

import torch

import pagedkv
from pagedkv.bench.common import environment, markdown_table, write_json

TARGETS_GIB = {"int2": 4.0, "int4": 6.5}


def qwen3_06b_shape(layers: int, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                      tie_word_embeddings=True, rope_theta=1_000_000.0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv.bench longctx", description=__doc__)
    gpu = torch.cuda.is_available()
    ap.add_argument("--tokens", type=int, default=200_000 if gpu else 32_768)
    ap.add_argument("--formats", nargs="+", default=["int2", "int4"])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--chunk", default="2048", help="tokens per prefill chunk, or 'auto'")
    ap.add_argument("--every", type=int, default=None, help="checkpoint interval (default tokens / 8)")
    ap.add_argument("--device", default="cuda" if gpu else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1) if args.device == "cpu" else None
    chunk = args.chunk if args.chunk == "auto" else int(args.chunk)
    every = args.every or max(args.tokens // 8, 1)
    model = qwen3_06b_shape(args.layers, args.device, torch.bfloat16)
    ids = torch.randint(0, 151936, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
    cfg = model.config
    dense_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2

    rows, curve_rows, records = [], [], []
    for fmt in args.formats:
        cache = pagedkv.PagedKVCache(cfg, fmt)
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        curve = []
        next_mark = [every]

        def record(done: int, total: int) -> None:
            if done >= next_mark[0] or done == total:
                s = cache.memory_stats()
                curve.append(dict(tokens=done, kv_bytes=s["bytes_used"], reserved_bytes=s["reserved_bytes"],
                                  bytes_per_token=s["bytes_used"] / done))
                while next_mark[0] <= done:
                    next_mark[0] += every

        start = time.perf_counter()
        pagedkv.prefill(model, ids, cache, chunk_size=chunk, callback=record)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
        final = curve[-1]
        gib = final["kv_bytes"] / 2**30
        target = TARGETS_GIB.get(fmt)
        met = "" if target is None or args.layers != 28 else (" (met)" if gib <= target else " (NOT met)")
        rows.append([fmt, f"{args.tokens:,}", f"{gib:.3f} GiB" + (f" / {target} GiB{met}" if target else ""),
                     f"{final['reserved_bytes'] / 2**30:.3f} GiB", f"{dense_per_token * args.tokens / 2**30:.2f} GiB",
                     f"{final['kv_bytes'] / (dense_per_token * args.tokens):.3f}x",
                     f"{peak / 2**30:.2f} GiB" if peak is not None else "-", f"{seconds:.1f} s",
                     f"{args.tokens / seconds:,.0f}"])
        # Slope between checkpoints: constant when memory grows linearly with tokens.
        slopes = [(b["kv_bytes"] - a["kv_bytes"]) / (b["tokens"] - a["tokens"]) for a, b in zip(curve, curve[1:])]
        spread = f"{(max(slopes) - min(slopes)) / min(slopes):.2%}" if slopes else "-"
        curve_rows.append([fmt] + [f"{c['tokens']:,}: {c['kv_bytes'] / 2**20:,.1f} MiB" for c in curve]
                          + [", ".join(f"{x:,.0f}" for x in slopes), spread])
        records.append(dict(format=fmt, tokens=args.tokens, kv_bytes=final["kv_bytes"], peak_bytes=peak,
                            seconds=seconds, curve=curve, dense_bf16_bytes=dense_per_token * args.tokens))
        del cache
    print(f"## Chunked prefill of {args.tokens:,} tokens, Qwen3-0.6B shape ({args.layers} layers, 8 KV heads x 128), "
          f"chunk {args.chunk}, {args.device}\n")
    print(markdown_table(["format", "tokens", "KV held (target)", "pages reserved", "bf16 DynamicCache (computed)",
                          "vs bf16", "peak allocated", "prefill time", "tok/s"], rows))
    print("\nKV bytes at each checkpoint, and the bytes added per token between checkpoints (equal slopes = "
          "linear growth; the first checkpoint also holds the fixed full-precision residual window):\n")
    n = max(len(r) for r in curve_rows)
    print(markdown_table(["format"] + [f"checkpoint {i}" for i in range(1, n - 2)] + ["slopes (B/token)",
                                                                                      "slope spread"],
                         [r[:-2] + [""] * (n - len(r)) + r[-2:] for r in curve_rows]))
    write_json(args.json, dict(environment(), args=vars(args), results=records))


if __name__ == "__main__":
    main()
