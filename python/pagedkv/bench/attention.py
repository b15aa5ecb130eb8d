"""Decode attention: the fused ``paged_attention`` op per format against torch SDPA on a dense cache
(bf16 on GPU, fp32 on CPU), measured side by side in one run.

For every (head shape, batch, context) it reports µs, the ratio SDPA time / our time, and the
effective bandwidth: bytes actually read (pages of the used blocks, scales included; SDPA: the dense
K/V) over time. The device's copy bandwidth is measured first, as the ceiling. On GPU two timings are
taken for every method: "isolated" (events around one call, synchronized after it: the host's time to
issue the call is inside) and "stream" (calls issued back to back, as a model's decode loop or a CUDA
graph issues them: device time per call). Bandwidth and the plot use the stream time.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pagedkv import ops
from pagedkv.bench.common import environment, markdown_table, write_json
from pagedkv.bench.timing import copy_bandwidth_gbs, median_time_us, plot_lines, stream_time_us
from pagedkv.config import DEFAULT_BLOCK_SIZE, FORMATS, KEY, VALUE, group_for, layout

SHAPES = {"llama3-8b": (32, 8, 128), "llama3.2-1b": (32, 8, 64), "gemma3-1b": (4, 1, 256)}
ALL_FORMATS = ["bf16", "fp8_e4m3", "int8", "nf4", "int4", "int2"]


class Pages:
    """Keys/values of ``batch`` sequences of ``ctx`` tokens in shuffled blocks of one format."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, fmt: str, block_size: int, tail: int = 0):
        # The last `tail` tokens stay dense beside the pages, as a cache's full-precision residual window.
        self.k_tail = k[:, :, k.shape[2] - tail:] if tail else None
        self.v_tail = v[:, :, v.shape[2] - tail:] if tail else None
        k, v = k[:, :, :k.shape[2] - tail], v[:, :, :v.shape[2] - tail]
        b, h, n, d = k.shape
        dev = k.device
        self.fmt, self.bs, self.h = fmt, block_size, h
        self.kg = group_for(fmt, KEY, d, None, None, block_size)
        self.vg = group_for(fmt, VALUE, d, None, None, block_size)
        kl = layout(fmt, KEY, h, d, block_size, self.kg)
        vl = layout(fmt, VALUE, h, d, block_size, self.vg)
        per_seq = -(-n // block_size)
        total = b * per_seq
        self.bpc = total
        self.table = torch.randperm(total, device=dev, dtype=torch.int64).reshape(b, per_seq)
        self.k_pages = [torch.empty(total, kl["block_bytes"], dtype=torch.uint8, device=dev)]
        self.v_pages = [torch.empty(total, vl["block_bytes"], dtype=torch.uint8, device=dev)]
        pos = torch.arange(n, device=dev)
        slots = (self.table[:, pos // block_size] * block_size + pos % block_size).reshape(-1)
        kw = dict(block_size=block_size, blocks_per_chunk=self.bpc)
        ops.append(k.transpose(1, 2).reshape(b * n, h, d), self.k_pages, slots, format=FORMATS[fmt], role=KEY,
                   group=self.kg, **kw)
        ops.append(v.transpose(1, 2).reshape(b * n, h, d), self.v_pages, slots, format=FORMATS[fmt], role=VALUE,
                   group=self.vg, **kw)
        self.table = self.table.to(torch.int32)
        self.lens = torch.full((b,), n, dtype=torch.int32, device=dev)
        self.bytes = total * (kl["block_bytes"] + vl["block_bytes"]) + (2 * self.k_tail.nbytes if tail else 0)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        f = FORMATS[self.fmt]
        return ops.paged_attention(q, self.k_pages, self.v_pages, self.table, self.lens, k_format=f, v_format=f,
                                   k_group=self.kg, v_group=self.vg, block_size=self.bs, blocks_per_chunk=self.bpc,
                                   num_kv_heads=self.h, scale=q.shape[-1] ** -0.5, k_tail=self.k_tail,
                                   v_tail=self.v_tail)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv.bench attention", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=["llama3-8b", "llama3.2-1b"], choices=list(SHAPES),
                    help="head shapes (gemma3-1b: 4 query heads on 1 KV head of 256 channels)")
    ap.add_argument("--batches", nargs="+", type=int, default=None)
    ap.add_argument("--contexts", nargs="+", type=int, default=None)
    ap.add_argument("--formats", nargs="+", default=ALL_FORMATS, choices=list(FORMATS))
    ap.add_argument("--block-sizes", nargs="+", type=int, default=None,
                    help="tokens per page, each format measured at each (default: the cache's, 64)")
    ap.add_argument("--max-tokens", type=int, default=None, help="skip batch x context above this")
    ap.add_argument("--tails", nargs="+", type=int, default=[0],
                    help="of each context, the newest tokens kept dense beside the pages (the cache's residual "
                         "window: up to residual_length + key group with grouped formats), each measured")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (timings on 2 cores are noise otherwise)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    if any(t < 0 for t in args.tails):
        ap.error(f"--tails must be >= 0, got {args.tails}")
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    batches = args.batches or ([1, 8, 32] if gpu else [1, 8])
    contexts = args.contexts or ([1024, 4096, 16384, 32768, 131072] if gpu else [1024, 4096, 16384])
    max_tokens = args.max_tokens or ((1 << 20) if gpu else (1 << 17))
    dense_dtype = torch.bfloat16 if gpu else torch.float32
    env = environment()
    copy_bw = copy_bandwidth_gbs(dev, (2 << 30) if gpu else (256 << 20))
    print(f"device {env['device']}: measured copy bandwidth {copy_bw:.0f} GB/s (read + write)")
    rows, records = [], []
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    torch.manual_seed(0)
    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        for b in batches:
            panel = panels.setdefault(f"{shape} batch {b}", {})
            for n in contexts:
                if b * n > max_tokens:
                    continue
                q = torch.randn(b, hq, 1, d, device=dev, dtype=dense_dtype)
                k = torch.randn(b, hkv, n, d, device=dev, dtype=dense_dtype)
                v = torch.randn(b, hkv, n, d, device=dev, dtype=dense_dtype)
                def sdpa():
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

                sdpa_us = median_time_us(sdpa, dev, reps=args.reps)
                sdpa_st = stream_time_us(sdpa, dev, reps=args.reps) if gpu else sdpa_us
                sdpa_bytes = k.nbytes + v.nbytes
                name = f"sdpa {str(dense_dtype).split('.')[-1]}"
                panel.setdefault(name, []).append((n, sdpa_st))
                rec = dict(shape=shape, batch=b, context=n, method=name, us=sdpa_us, speedup=1.0, us_stream=sdpa_st,
                           speedup_stream=1.0, gbs=sdpa_bytes / sdpa_st / 1e3, bytes=sdpa_bytes)
                records.append(rec)
                rows.append([shape, b, n, name, f"{sdpa_us:.1f}", "1.00"] + ([f"{sdpa_st:.1f}", "1.00"] if gpu else [])
                            + [f"{rec['gbs']:.0f}", f"{100 * rec['gbs'] / copy_bw:.0f}%"])
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
                runs = [(f, bs, t) for f in args.formats for bs in (args.block_sizes or [DEFAULT_BLOCK_SIZE])
                        for t in args.tails if t < n]
                for fmt, bs, tail in runs:
                    method = fmt + ("" if args.block_sizes is None else f" bs{bs}") + (f" tail{tail}" if tail else "")
                    pages = Pages(k, v, fmt, bs, tail)
                    out = pages(q)
                    err = (out.transpose(1, 2).float() - ref).abs().max().item()
                    us = median_time_us(lambda: pages(q), dev, reps=args.reps)
                    st = stream_time_us(lambda: pages(q), dev, reps=args.reps) if gpu else us
                    rec = dict(shape=shape, batch=b, context=n, method=method, block_size=bs, tail=tail, us=us,
                               speedup=sdpa_us / us, us_stream=st, speedup_stream=sdpa_st / st,
                               gbs=pages.bytes / st / 1e3, bytes=pages.bytes, max_abs_err_vs_dense=err)
                    records.append(rec)
                    panel.setdefault(method, []).append((n, st))
                    rows.append([shape, b, n, method, f"{us:.1f}", f"{sdpa_us / us:.2f}"]
                                + ([f"{st:.1f}", f"{sdpa_st / st:.2f}"] if gpu else [])
                                + [f"{rec['gbs']:.0f}", f"{100 * rec['gbs'] / copy_bw:.0f}%"])
                    del pages
                del k, v
                if gpu:
                    torch.cuda.empty_cache()
                print(f"done {shape} batch {b} context {n}", flush=True)
    print(f"\n{env['device']} ({env['date']}), copy bandwidth {copy_bw:.0f} GB/s; speedup = SDPA µs / ours\n")
    timing = ["µs isolated", "vs SDPA isolated", "µs stream", "vs SDPA stream"] if gpu else ["µs", "speedup vs SDPA"]
    print(markdown_table(["shape", "batch", "context", "method"] + timing + ["GB/s read", "% of copy bw"], rows))
    write_json(args.json, {"env": env, "copy_bandwidth_gbs": copy_bw, "results": records})
    if args.plot:
        plot_lines(args.plot, f"decode attention, {env['device']}", panels, "context (tokens)", "µs")


if __name__ == "__main__":
    main()
