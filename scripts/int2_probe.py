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
  kclip/vclip=N  per group, search the clipped range [mn + a r/N, mx - b r/N], a, b in 0..N/4, for the
             least squared error of that group (write side only; the stored format is unchanged);
             crange=M widens or narrows the searched clip to M per mille of the range on each side
  vls=N      the same for values
  ktok       keys: rotate each key group along its tokens (random-sign Hadamard), undone after
  prerope    quantize keys before RoPE (undo the rotation of each position, quantize, redo it)
  kls=N      keys: N rounds of alternating least squares from the min/max fit (codes given scale and
             zero by rounding, then scale and zero given the codes by a linear fit)
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

DEFAULTS = dict(R=128, kg=64, vg=32, kbits=2, vbits=2, sinks=0, sinkx=0, vrot=False, k2l=0, klev=0, vlev=0, vsym=False, skipl=-1, kclip=0, vclip=0, crange=250, kls=0, vls=0, prerope=False, ktok=False)


def asym(x: torch.Tensor, dim: int, bits: int, lev: int = 0, clip: int = 0, crange: int = 250,
         ls: int = 0) -> torch.Tensor:
    qmax = 2 ** bits - 1
    mn, mx = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    if ls:
        s, z = ((mx - mn) / qmax).clamp(min=1e-8), mn
        n = x.shape[dim]
        for _ in range(ls):
            c = torch.round((x - z) / s).clamp(0, qmax)
            sc, sx = c.sum(dim, keepdim=True), x.sum(dim, keepdim=True)
            scc, scx = (c * c).sum(dim, keepdim=True), (c * x).sum(dim, keepdim=True)
            det = n * scc - sc * sc
            ok = det > 0
            s_new = torch.where(ok, (n * scx - sc * sx) / torch.where(ok, det, 1.0), s)
            z_new = torch.where(ok, (sx - s_new * sc) / n, z)
            good = s_new > 1e-8
            s, z = torch.where(good, s_new, s), torch.where(good, z_new, z)
        return torch.round((x - z) / s).clamp(0, qmax) * s + z
    if clip:
        r = mx - mn
        best, best_err = None, None
        for a in range(clip * crange // 1000 + 1):
            for b in range(clip * crange // 1000 + 1):
                lo, hi = mn + r * (a / clip), mx - r * (b / clip)
                s = ((hi - lo) / qmax).clamp(min=1e-8)
                y = torch.round((x - lo) / s).clamp(0, qmax) * s + lo
                err = (y - x).square().sum(dim=dim, keepdim=True)
                if best is None:
                    best, best_err = y, err
                else:
                    better = err < best_err
                    best = torch.where(better, y, best)
                    best_err = torch.where(better, err, best_err)
        return best
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


INV_FREQ: torch.Tensor | None = None  # the model's RoPE frequencies (set in main)


def rope_tables(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * INV_FREQ[None, :]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def fake_quantize(k: torch.Tensor, v: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    n = k.shape[2]
    q = max(n - cfg["R"], 0) // 64 * 64
    if q == 0:
        return k, v
    B, H, _, D = k.shape
    kq, vq = k[:, :, :q].float().clone(), v[:, :, :q].float()
    if cfg["prerope"]:
        cos, sin = rope_tables(q)
        kq = kq * cos - rotate_half(kq) * sin
    if cfg["sinkx"]:
        kq[:, :, :cfg["sinkx"]] = kq[:, :, cfg["sinkx"]:cfg["sinkx"] + 1]
    if cfg["k2l"]:
        kq = two_level_keys(kq, cfg["kg"], cfg["k2l"])
    else:
        kg_rot = hadamard_rotation(cfg["kg"], seed=4321) if cfg["ktok"] else None
        if kg_rot is not None:
            kq = (kg_rot.T @ kq.reshape(B, H, q // cfg["kg"], cfg["kg"], D)).reshape(B, H, q, D)
        kq = asym(kq.reshape(B, H, q // cfg["kg"], cfg["kg"], D), 3, cfg["kbits"], cfg["klev"], cfg["kclip"], cfg["crange"], cfg["kls"]).reshape(B, H, q, D)
        if kg_rot is not None:
            kq = (kg_rot @ kq.reshape(B, H, q // cfg["kg"], cfg["kg"], D)).reshape(B, H, q, D)
    if cfg["prerope"]:
        kq = kq * cos + rotate_half(kq) * sin
    rot = hadamard_rotation(D, seed=1234) if cfg["vrot"] else None
    if rot is not None:
        vq = vq @ rot
    vg = min(cfg["vg"], D)
    if cfg["vsym"]:  # symmetric 2-bit: levels (-1.5, -0.5, 0.5, 1.5) * absmax / 1.5, one scale per group
        g = vq.reshape(B, H, q, D // vg, vg)
        s = (g.abs().amax(4, keepdim=True) / 1.5).clamp(min=1e-8)
        vq = ((torch.floor(g / s).clamp(-2, 1) + 0.5) * s).reshape(B, H, q, D)
    else:
        vq = asym(vq.reshape(B, H, q, D // vg, vg), 4, cfg["vbits"], cfg["vlev"], cfg["vclip"], cfg["crange"], cfg["vls"]).reshape(B, H, q, D)
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
    global INV_FREQ
    INV_FREQ = model.model.rotary_emb.inv_freq.float()
    assert float(getattr(model.model.rotary_emb, "attention_scaling", 1.0)) == 1.0
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
