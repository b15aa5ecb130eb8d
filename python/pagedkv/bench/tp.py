"""Tensor-parallel decode: ``torchrun --nproc-per-node N -m pagedkv.bench tp [options]``.

A Llama-3-8B-shaped random-init model (32 layers, 32 / 8 heads, head_dim 128; sizes are options) is
sharded over the N ranks by :func:`pagedkv.tp.shard_heads` (attention heads and MLP, all-reduced), each
rank holding a ``PagedKVCache(tp_size=N)`` with its share of the KV heads. A ``--context``-token prompt
is prefilled in chunks, then ``--new`` tokens are decoded greedily with the fused attention. Reported
per format: decode tokens/s and each rank's KV page bytes and peak device memory. Run it with N = 1 and
N = 2 on the same machine kind to compare single-GPU and tensor-parallel figures. NCCL on GPUs (NVLink
multicast stays off), gloo on CPUs; without torchrun it runs as one process.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from pagedkv.bench.common import environment, markdown_table, write_json
from pagedkv.hf_compat import cache_kwargs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv.bench tp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4"])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import pagedkv
    from pagedkv.tp import shard_heads
    from transformers import LlamaConfig, LlamaForCausalLM

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dtype = torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                          max_position_embeddings=args.context + args.new + 16, eos_token_id=None)
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
        torch.set_default_dtype(default)
        if world > 1:
            shard_heads(model, rank, world)
        model.set_attn_implementation("pagedkv")
        ids = torch.randint(3, args.vocab, (args.batch, args.context), generator=torch.Generator().manual_seed(1))
        ids = ids.to(device)
        rows = []
        for fmt in args.formats:
            cache = pagedkv.PagedKVCache(cfg, fmt, tp_size=world)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad():
                logits = pagedkv.prefill(model, ids, cache, chunk_size=args.chunk)
                nxt = logits.argmax(-1, keepdim=True)
                model(input_ids=nxt, use_cache=True, **cache_kwargs(model, cache))  # warm-up step
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(args.new):
                    nxt = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1].argmax(-1, keepdim=True)
                _sync(device)
                dt = time.perf_counter() - t0
            kv = cache.store.memory_bytes()["used_bytes"]
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            rows.append(dict(format=fmt, world=world, rank=rank, tokens_per_s=args.batch * args.new / dt,
                             kv_bytes=kv, peak_bytes=peak, local_kv_heads=cache.num_kv_heads))
            del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
        gathered = [rows]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rows)
        if rank == 0:
            env = environment()
            table = [[r["format"], r["world"], r["rank"], r["local_kv_heads"], f"{r['tokens_per_s']:.1f}",
                      f"{r['kv_bytes'] / 2**20:.1f}", f"{r['peak_bytes'] / 2**30:.2f}"]
                     for per_rank in gathered for r in per_rank]
            print(f"\n{env['device']}, {world} rank(s), batch {args.batch}, context {args.context}, "
                  f"{args.new} decode tokens, {args.layers} layers ({env['date']})\n")
            print(markdown_table(["format", "ranks", "rank", "KV heads held", "decode tok/s", "KV MiB (this rank)",
                                  "peak GiB (this rank)"], table))
            write_json(args.json, {"env": env, "args": vars(args), "results": gathered})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
