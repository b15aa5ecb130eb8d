"""Independent plain-PyTorch references (fp32) for the kernels.

``fake_quantize`` re-implements, operation for operation, the scalar quantizers of
``csrc/include/pagedkv/quant_ref.h``, so a kernel's round trip (append, then gather) must equal it
bit for bit. ``dense_attention`` is the attention reference: gather, upcast to fp32, softmax.
"""

from __future__ import annotations

import math

import torch

NF4_CODEBOOK = torch.tensor(
    [-1.00000000, -0.69619289, -0.52507304, -0.39491749, -0.28444136, -0.18477344, -0.09104999, 0.0,
     0.07958033, 0.16093017, 0.24611229, 0.33791519, 0.44070980, 0.56261697, 0.72295673, 1.00000000],
    dtype=torch.float32,
)
FP16_MAX = 65504.0
FP8_MAX = 448.0


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


ASYM_FIT_ROUNDS = 12  # kAsymFitRounds in quant_ref.h (2-bit keys only)


def _stored(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _fp16_round(scale.clamp(max=FP16_MAX)), _fp16_round(zero.clamp(-FP16_MAX, FP16_MAX))


def _codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: float) -> torch.Tensor:
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return torch.where(s == 0, torch.zeros_like(x), torch.round((x - z) / safe).clamp(0.0, qmax))


def _asym(x: torch.Tensor, dim: int, bits: int, fit: bool = False) -> torch.Tensor:
    """Asymmetric ``bits`` quantization over ``dim``: the min/max grid, or with ``fit`` asym_fit's
    alternating least squares (sums taken token by token in the kernels' order, so it is bit-exact)."""
    qmax = float(2**bits - 1)
    mn = x.amin(dim=dim, keepdim=True)
    mx = x.amax(dim=dim, keepdim=True)
    s, z = _stored((mx - mn) / qmax, mn)
    if fit:
        n = x.shape[dim]
        xs = [x.narrow(dim, t, 1) for t in range(n)]

        def one_pass(s: torch.Tensor, z: torch.Tensor) -> list[torch.Tensor]:
            """asym_pass: the squared error under (s, z) and the sums of the next fit, token by token."""
            e, sc, sx, scc, scx = (torch.zeros_like(s) for _ in range(5))
            for v in xs:
                c = _codes(v, s, z, qmax)
                d = c * s + z - v
                e, sc, sx, scc, scx = e + d * d, sc + c, sx + v, scc + c * c, scx + c * v
            return [e, sc, sx, scc, scx]

        cur = one_pass(s, z)
        active = torch.ones_like(s, dtype=torch.bool)
        for _ in range(ASYM_FIT_ROUNDS):
            e, sc, sx, scc, scx = cur
            det = n * scc - sc * sc
            scale = (n * scx - sc * sx) / torch.where(det > 0, det, torch.ones_like(det))
            s2, z2 = _stored(scale, (sx - scale * sc) / n)
            nxt = one_pass(s2, z2)
            active = active & (det > 0) & (scale > 0) & (nxt[0] < e)
            s, z = torch.where(active, s2, s), torch.where(active, z2, z)
            cur = [torch.where(active, a, b) for a, b in zip(nxt, cur)]
            if not bool(active.any()):
                break
    return _codes(x, s, z, qmax) * s + z


def _nf4(x: torch.Tensor, dim: int, super_dims: tuple[int, ...]) -> torch.Tensor:
    book = NF4_CODEBOOK.to(x.device)
    mids = (book[:-1] + book[1:]) * 0.5
    s2 = _fp16_round((x.abs().amax(dim=super_dims, keepdim=True) / 255.0).clamp(max=FP16_MAX))
    a = x.abs().amax(dim=dim, keepdim=True)
    safe_s2 = torch.where(s2 == 0, torch.ones_like(s2), s2)
    acode = torch.where(s2 == 0, torch.zeros_like(a), torch.ceil(a / safe_s2).clamp(max=255.0))
    us = acode * s2
    safe_us = torch.where(us == 0, torch.ones_like(us), us)
    v = (x / safe_us).clamp(-1.0, 1.0)
    code = torch.bucketize(v, mids)
    code = torch.where(us == 0, torch.full_like(code, 7), code)
    return book[code] * us


def fake_quantize(x: torch.Tensor, fmt: str, role: int, group: int = 1) -> torch.Tensor:
    """Quantize then dequantize ``x [num_tokens, num_kv_heads, head_dim]`` exactly as the kernels do.

    For grouped keys (``int4 int2 nf4``, ``role=0``) tokens form groups of ``group`` consecutive
    tokens starting at token 0; ``num_tokens`` must be a multiple of ``group``.
    """
    x = x.to(torch.float32)
    T, H, D = x.shape
    if fmt == "fp32":
        return x.clone()
    if fmt == "bf16":
        return x.to(torch.bfloat16).float()
    if fmt == "fp16":
        return x.to(torch.float16).float()
    if fmt in ("int8", "fp8_e4m3"):
        amax = x.abs().amax(dim=-1, keepdim=True)
        scale = amax / (127.0 if fmt == "int8" else FP8_MAX)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        if fmt == "int8":
            q = torch.round(x / safe).clamp(-127.0, 127.0)
        else:
            q = (x / safe).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        return torch.where(scale == 0, torch.zeros_like(x), q * scale)
    if fmt in ("int4", "int2", "nf4"):
        if role == 0:
            if T % group:
                raise ValueError(f"num_tokens={T} is not a multiple of the key group {group}")
            xg = x.reshape(T // group, group, H, D)
            out = _asym(xg, 1, 4 if fmt == "int4" else 2, fit=fmt == "int2") if fmt != "nf4" else _nf4(xg, 1, (1, 3))
        else:
            xg = x.reshape(T, H, D // group, group)
            out = _asym(xg, 3, 4 if fmt == "int4" else 2) if fmt != "nf4" else _nf4(xg, 3, (2, 3))
        return out.reshape(T, H, D)
    raise ValueError(f"unknown format {fmt!r}")


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
    causal_offset: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 attention of ``query [B, Hq, S, D]`` over ``key/value [B, Hkv, T, D]`` (GQA by repeat).

    Query ``i`` sits at position ``causal_offset + i`` and sees key positions ``<=`` it (and, with a
    sliding window, ``> pos - sliding_window``). ``causal_offset=None`` disables masking.
    ``key_mask [B, T]`` (bool) hides keys where it is False. Rows that see no key are zero.
    """
    q, k, v = query.float(), key.float(), value.float()
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if causal_offset is not None:
        qpos = torch.arange(q.shape[2], device=q.device)[:, None] + causal_offset
        kpos = torch.arange(k.shape[2], device=q.device)[None, :]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        s = s.masked_fill(~mask, float("-inf"))
    if key_mask is not None:
        s = s.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: zero
    return torch.matmul(p, v)
