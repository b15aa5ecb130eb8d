"""End-to-end ``model.generate`` decode speed and KV memory for every cache, side by side in one run.

Methods: DynamicCache (sdpa); transformers ``QuantizedCache`` with the quanto backend (nbits 4 and 2)
and the fp8 backend, where installed; pagedkv in each format with ``attn_implementation="pagedkv"``
(``pagedkv-<fmt>``: ``model.generate`` with transformers' loop; ``pagedkv-<fmt>-graph``: ``model.generate(...,
custom_generate=pagedkv.graph_generate)``, decode steps replayed as CUDA graphs).
Decode tokens/s counts the tokens of every sequence after the first new one (prefill excluded), timed
by a logits processor at each step. KV memory is the memory the cache still holds after generation.

GPU default: random-init Llama-3.2-1B-shaped model, batch 16, 16k-token prompt, 128 new tokens
(``--model gemma3-1b``: Gemma-3-1B's shape, with sliding-window layers).
CPU default (``--model smollm2``): real SmolLM2-135M in fp32, 1 thread, batch 1, 2k-token prompt.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from pagedkv import PagedKVCache, graph_generate
from pagedkv.bench.common import environment, markdown_table, write_json
from pagedkv.hf_compat import cache_kwargs

FORMATS = ["int8", "fp8_e4m3", "int4", "nf4", "int2", "bf16"]


class StepTimer:
    """LogitsProcessor recording a timestamp after each forward step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def llama32_1b(device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                      rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def gemma3_1b(device: torch.device, dtype: torch.dtype):
    """Gemma-3-1B's shape (26 layers, five sliding-window layers of 512 to each full one, 4 query / 1 KV
    head of 256 channels), random weights: the sliding layers' speed path."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                           query_pre_attn_scalar=256, max_position_embeddings=32768)
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3ForCausalLM(cfg).to(dtype).eval()
    return model


def smollm2(device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from pagedkv import data

    return AutoModelForCausalLM.from_pretrained(data.smollm2(), dtype=dtype).to(device).eval()


def prompt_ids(model, batch: int, length: int, device: torch.device, real_text: bool) -> torch.Tensor:
    if real_text:
        from transformers import AutoTokenizer

        from pagedkv import data

        tok = AutoTokenizer.from_pretrained(model.name_or_path)
        ids = tok(data.text_file("wikitext2").read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
        rows = [ids[i * length:(i + 1) * length] for i in range(batch)]
        return torch.stack(rows).to(device)
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, model.config.vocab_size - 100, (batch, length), generator=g).to(device)


def make_cache(method: str, model, residual_length: int | None = None):
    from transformers import DynamicCache, QuantizedCache

    if method == "dynamic":
        return DynamicCache(config=model.config), "sdpa"
    if method.startswith("quanto"):
        return QuantizedCache(backend="quanto", config=model.config, nbits=int(method[-1])), "sdpa"
    if method == "hf-fp8":
        return QuantizedCache(backend="fp8", config=model.config), "sdpa"
    fmt = method.removeprefix("pagedkv-").removesuffix("-graph")
    return PagedKVCache(model.config, kv_format=fmt, residual_length=residual_length), "pagedkv"


def run(method: str, model, ids: torch.Tensor, new_tokens: int, device: torch.device,
        residual_length: int | None = None) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    cache, impl = make_cache(method, model, residual_length)
    model.set_attn_implementation(impl)
    timer = StepTimer(device)
    t0 = time.perf_counter()
    # -graph: transformers' generate with pagedkv's decoding loop, whose steps replay CUDA graphs
    # (GraphDecoder); the eager first step of each kind and the captures count in the decode time.
    extra = dict(custom_generate=graph_generate) if method.endswith("-graph") else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, **cache_kwargs(model, cache),
                             logits_processor=[timer], pad_token_id=0, **extra)
    total = time.perf_counter() - t0
    steps = len(timer.times) - 1
    decode_s = timer.times[-1] - timer.times[0]
    rec = dict(method=method, decode_tok_s=ids.shape[0] * steps / decode_s, prefill_s=timer.times[0] - t0,
               total_s=total, new_tokens=out.shape[1] - ids.shape[1])
    if device.type == "cuda":
        torch.cuda.synchronize()
        rec["kv_bytes"] = torch.cuda.memory_allocated() - base - out.nbytes
        rec["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    elif isinstance(cache, PagedKVCache):
        rec["kv_bytes"] = cache.memory_stats()["bytes_used"]
    else:
        rec["kv_bytes"] = cache_bytes(cache)
    rec["tokens"] = out[:, ids.shape[1]:].cpu()
    del cache, out
    return rec


def cache_bytes(cache) -> int:
    """Bytes of every tensor a transformers cache holds (quantized payloads included)."""
    seen, total = set(), 0

    def visit(obj, depth=0):
        nonlocal total
        if depth > 8 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if type(obj) is torch.Tensor or isinstance(obj, torch.nn.Parameter):
                total += obj.untyped_storage().nbytes() if obj.numel() else 0
            # Quantized tensor subclasses (quanto) hold their payload in inner tensors.
            for attr in ("_data", "_scale", "_shift", "_zeropoint"):
                inner = getattr(obj, attr, None)
                if isinstance(inner, torch.Tensor):
                    visit(inner, depth + 1)
            return
        if isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o, depth + 1)
        elif hasattr(obj, "__dict__"):
            for o in vars(obj).values():
                visit(o, depth + 1)

    visit(cache)
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv.bench generate", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=["llama3.2-1b", "gemma3-1b", "smollm2"], default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--residual-length", type=int, default=None,
                    help="pagedkv caches' full-precision residual window (default: the format's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    name = args.model or ("llama3.2-1b" if gpu else "smollm2")
    dtype = torch.bfloat16 if gpu else torch.float32
    model = {"llama3.2-1b": llama32_1b, "gemma3-1b": gemma3_1b, "smollm2": smollm2}[name](dev, dtype)
    batch = args.batch or (16 if gpu else 1)
    plen = args.prompt or (16384 if gpu else 2048)
    new = args.new_tokens or (128 if gpu else 64)
    ids = prompt_ids(model, batch, plen, dev, real_text=name == "smollm2")
    methods = args.methods or (["dynamic", "quanto-4", "quanto-2", "hf-fp8"] + [f"pagedkv-{f}" for f in FORMATS])
    env = environment()
    records = []
    for m in methods:
        try:
            run(m, model, ids[:, :64], 4, dev, args.residual_length)  # warm-up: one-time builds stay out of the timing
            rec = run(m, model, ids, new, dev, args.residual_length)
        except Exception as e:  # a rival's backend may be missing on this machine: say so, go on
            print(f"{m}: not run ({type(e).__name__}: {str(e).splitlines()[0][:200]})", flush=True)
            records.append(dict(method=m, error=f"{type(e).__name__}: {e}"))
            continue
        records.append(rec)
        print(f"{m}: {rec['decode_tok_s']:.1f} tok/s, KV {rec['kv_bytes'] / 2**20:.1f} MiB", flush=True)
    ref = next((r for r in records if r.get("method") == "dynamic" and "error" not in r), None)
    quanto4 = next((r for r in records if r.get("method") == "quanto-4" and "error" not in r), None)
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["method"], "not run", "", "", "", ""])
            continue
        agree = (r["tokens"] == ref["tokens"]).float().mean().item() if ref else float("nan")
        rows.append([r["method"], f"{r['decode_tok_s']:.1f}",
                     f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}" if ref else "",
                     f"{r['decode_tok_s'] / quanto4['decode_tok_s']:.2f}" if quanto4 else "",
                     f"{r['kv_bytes'] / 2**20:.1f} ({r['kv_bytes'] / ref['kv_bytes']:.3f}x)" if ref else "",
                     f"{100 * agree:.1f}%"])
    res = "" if args.residual_length is None else f", pagedkv residual_length {args.residual_length}"
    print(f"\n{name}, batch {batch}, prompt {plen}, {new} new tokens{res}, {dtype}, {env['device']}, "
          f"{env['cpu_threads']} CPU threads, {env['date']}\n")
    print(markdown_table(["method", "decode tok/s", "vs DynamicCache", "vs quanto-4", "KV MiB (vs Dynamic)",
                          "greedy tokens = Dynamic"], rows))
    for r in records:
        r.pop("tokens", None)
    write_json(args.json, {"env": env, "model": name, "batch": batch, "prompt": plen, "new_tokens": new,
                           "residual_length": args.residual_length, "results": records})


if __name__ == "__main__":
    main()
