"""Format probe for 2-bit KV (issue 5): what would each candidate change buy, before building it?

Runs the teacher-forced streaming perplexity protocol of ``python -m pagedkv.eval ppl`` with a
DynamicCache whose returned keys and values are fake-quantized in plain fp32 PyTorch the way pagedkv
stores them (positions older than the residual window, in whole 64-token blocks; keys per channel over
groups of ``kg`` tokens, values per token over groups of ``vg`` channels, asymmetric min/max), plus
candidate changes:

  sinks=N    keep the first N positions in full precision
  sinkx=N    the same, and leave them out of their key group's range
  vrot       rotate values by a fixed random-sign Hadamard matrix along head_dim before quantizing
             (undone after; attention is unchanged by an orthogonal rotation of V)
  k2l=L      two-level key metadata: per (64-token block, channel) a range, per key group its min and
             max as codes on an L-step grid of that range (L=15: 4-bit codes)
  klev/vlev=A  2-bit levels at 0, A, 1000 - A, 1000 (per mille) of the group range instead of thirds
  vsym       symmetric 2-bit values (one scale per group, no zero point: 0.25 bit less at 64 channels)
  skipl=L     leave layer L unquantized (per-layer sensitivity)
  kbits/vbits  other code widths for keys / values (8 = near lossless, to split the error)

Usage: python scripts/int2_probe.py --context 2048 --tokens 8192 --variant base "" \\
         --variant "kg32 vg64" "kg=32 vg=64" ...
Scale and zero are kept in fp32 here (the cache stores fp16), so the baseline differs slightly from
the real int2 cache; compare variants with each other.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import DynamicCache

from pagedkv.eval import common as eval_common
from pagedkv.eval import ppl as eval_ppl
from pagedkv.store import hadamard_rotation

DEFAULTS = dict(R=128, kg=64, vg=32, kbits=2, vbits=2, sinks=0, sinkx=0, vrot=False, k2l=0, klev=0, vlev=0, vsym=False, skipl=-1)


def asym(x: torch.Tensor, dim: int, bits: int, lev: int = 0) -> torch.Tensor:
    qmax = 2 ** bits - 1
    mn, mx = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    if lev and bits == 2:  # 4 levels at 0, a, 1 - a, 1 of the range (a = lev / 1000)
        a = lev / 1000
        levels = torch.tensor([0.0, a, 1 - a, 1.0])
        r = (mx - mn).clamp(min=1e-8)
        u = ((x - mn) / r).unsqueeze(-1)
        return levels[(u - levels).abs().argmin(-1)] * r + mn
    s = ((mx - mn) / qmax).clamp(min=1e-8)
    return torch.round((x - mn) / s).clamp(0, qmax) * s + mn


def two_level_keys(k: torch.Tensor, kg: int, steps: int) -> torch.Tensor:
    """k [B, H, T, D], T a multiple of 64: 2-bit codes on group ranges snapped to a per-block grid."""
    B, H, T, D = k.shape
    kb = k.reshape(B, H, T // 64, 64, D)
    bmn, bmx = kb.amin(3, keepdim=True), kb.amax(3, keepdim=True)
    step = ((bmx - bmn) / steps).clamp(min=1e-8).unsqueeze(3)
    bmn = bmn.unsqueeze(3)
    g = kb.reshape(B, H, T // 64, 64 // kg, kg, D)
    lo = torch.floor((g.amin(4, keepdim=True) - bmn) / step).clamp(0, steps) * step + bmn
    hi = torch.ceil((g.amax(4, keepdim=True) - bmn) / step).clamp(0, steps) * step + bmn
    s = ((hi - lo) / 3).clamp(min=1e-8)
    return (torch.round((g - lo) / s).clamp(0, 3) * s + lo).reshape(B, H, T, D)


def fake_quantize(k: torch.Tensor, v: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    n = k.shape[2]
    q = max(n - cfg["R"], 0) // 64 * 64
    if q == 0:
        return k, v
    B, H, _, D = k.shape
    kq, vq = k[:, :, :q].float().clone(), v[:, :, :q].float()
    if cfg["sinkx"]:
        kq[:, :, :cfg["sinkx"]] = kq[:, :, cfg["sinkx"]:cfg["sinkx"] + 1]
    if cfg["k2l"]:
        kq = two_level_keys(kq, cfg["kg"], cfg["k2l"])
    else:
        kq = asym(kq.reshape(B, H, q // cfg["kg"], cfg["kg"], D), 3, cfg["kbits"], cfg["klev"]).reshape(B, H, q, D)
    rot = hadamard_rotation(D, seed=1234) if cfg["vrot"] else None
    if rot is not None:
        vq = vq @ rot
    vg = min(cfg["vg"], D)
    if cfg["vsym"]:  # symmetric 2-bit: levels (-1.5, -0.5, 0.5, 1.5) * absmax / 1.5, one scale per group
        g = vq.reshape(B, H, q, D // vg, vg)
        s = (g.abs().amax(4, keepdim=True) / 1.5).clamp(min=1e-8)
        vq = ((torch.floor(g / s).clamp(-2, 1) + 0.5) * s).reshape(B, H, q, D)
    else:
        vq = asym(vq.reshape(B, H, q, D // vg, vg), 4, cfg["vbits"], cfg["vlev"]).reshape(B, H, q, D)
    if rot is not None:
        vq = vq @ rot.T
    keep = max(cfg["sinks"], cfg["sinkx"])
    if keep:
        kq[:, :, :keep], vq[:, :, :keep] = k[:, :, :keep], v[:, :, :keep]
    return (torch.cat([kq.to(k.dtype), k[:, :, q:]], 2), torch.cat([vq.to(v.dtype), v[:, :, q:]], 2))


class ProbeCache(DynamicCache):
    cfg: dict = DEFAULTS

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self.cfg["skipl"]:
            return k, v
        return fake_quantize(k, v, self.cfg)


def parse(spec: str) -> dict:
    cfg = dict(DEFAULTS)
    for item in spec.split():
        key, _, val = item.partition("=")
        cfg[key] = True if val == "" else int(val)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "SPEC"), required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, name = eval_common.load_model(args.model, torch.float32)
    ids = tok(eval_common.text_path("wikitext2").read_text(encoding="utf-8"), return_tensors="pt",
              add_special_tokens=False).input_ids[0]
    n_win = args.tokens // args.context
    windows = ids[:n_win * args.context].reshape(n_win, args.context)
    base_make = eval_common.make_cache
    eval_ppl.make_cache = lambda m, mdl, **kw: ProbeCache(config=mdl.config) if m == "probe" else base_make(m, mdl, **kw)
    nll, n = eval_ppl.stream_nll(model, windows, "dynamic", 64, 4)
    ref = math.exp(nll / n)
    print(f"{name}, WikiText-2, context {args.context}, {n} scored tokens; DynamicCache ppl {ref:.4f}\n")
    print("| variant | spec | ppl | delta vs unquantized |\n|---|---|---|---|")
    for label, spec in args.variant:
        ProbeCache.cfg = parse(spec)
        t = time.time()
        nll, n = eval_ppl.stream_nll(model, windows, "probe", 64, 4)
        p = math.exp(nll / n)
        print(f"| {label} | `{spec}` | {p:.4f} | {100 * (p / ref - 1):+.3f}% |  <!-- {time.time() - t:.0f} s -->",
              flush=True)


if __name__ == "__main__":
    main()
