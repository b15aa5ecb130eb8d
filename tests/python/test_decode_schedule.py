"""The CUDA decode kernel's two schedules: static (each warp a fixed run of its split's steps) and
balanced (the warps of all of a sequence's splits claim its steps at run time from a zeroed counter).
Automatic choice: balanced for splits of >= 1024 entries, static under
torch.use_deterministic_algorithms(True); PAGEDKV_DECODE_SCHEDULE forces either."""

from __future__ import annotations

import pytest
import torch

import test_attention_op as base
from paged_inputs import PagedInputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DECODE_FORMATS = ["bf16", "fp16", "fp8_e4m3", "int8", "int4", "int2"]  # the decode kernel's page formats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", DECODE_FORMATS)
@pytest.mark.parametrize("case", range(len(base.HALF_CASES)))
def test_balanced_every_case(monkeypatch, dtype, fmt, case):
    """Forced balanced schedule on the half-precision cases (lengths 1 / block-1 / block / block+1 /
    long with skips and a tail, GQA 1/4/8, head_dim 64/128/256, query chunks, window, softcap, mask;
    splits 0 / 1 / 3) against the fp32 reference."""
    monkeypatch.setenv("PAGEDKV_DECODE_SCHEDULE", "balanced")
    base.test_half_precision_models("cuda", dtype, fmt, case)


@pytest.mark.parametrize("fmt", ["int4", "int2"])
@pytest.mark.parametrize("groups", [(16, 64), (32, 64), (64, 128), (16, 128)])
@pytest.mark.parametrize("d", [64, 128])
def test_balanced_grouped(monkeypatch, fmt, groups, d):
    """int4 / int2 claim whole key groups (their refold runs once a group), from sequences starting
    mid-block (skips) and windows."""
    monkeypatch.setenv("PAGEDKV_DECODE_SCHEDULE", "balanced")
    base.test_grouped_formats_any_groups_and_skips("cuda", torch.bfloat16, fmt, groups, d)


def _long_inputs(fmt: str, seed: int = 0):
    lens, skips = [5000, 2100, 1, 1500], [0, 7, 0, 32]
    if fmt in ("int4", "int2"):
        skips = [0, 0, 0, 32]  # on a key-group boundary
    pi = PagedInputs(lens, skips, fmt, fmt, 2, 128, block_size=64, device="cuda", seed=seed)
    q = torch.randn(len(lens), 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    kt, vt = (torch.randn(len(lens), 2, 3, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return pi, q, kt, vt


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "int4", "int2", "bf16"])
def test_automatic_choice_and_determinism(monkeypatch, fmt):
    """Splits of >= 1024 entries take the balanced schedule by default: it matches the reference on
    every call (the counters are zeroed each call) and the static schedule closely; under
    torch.use_deterministic_algorithms(True) calls repeat bit for bit."""
    monkeypatch.delenv("PAGEDKV_DECODE_SCHEDULE", raising=False)
    pi, q, kt, vt = _long_inputs(fmt)
    ref = base.reference(pi, q.float(), kt, vt, scale=128 ** -0.5)
    kw = dict(scale=128 ** -0.5, num_splits=2)
    balanced = [pi.attend(q, kt, vt, **kw) for _ in range(3)]
    for out in balanced:
        base._close(out, ref, torch.bfloat16)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        static = [pi.attend(q, kt, vt, **kw) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(static[0], static[1]) and torch.equal(static[0], static[2])
    base._close(static[0], ref, torch.bfloat16)
    torch.testing.assert_close(balanced[0].float(), static[0].float(), atol=1e-2, rtol=1e-2)
    monkeypatch.setenv("PAGEDKV_DECODE_SCHEDULE", "static")
    assert torch.equal(pi.attend(q, kt, vt, **kw), static[0])


def test_balanced_in_cuda_graph(monkeypatch):
    """The counters' zeroing is captured with the kernel: replays stay right."""
    monkeypatch.setenv("PAGEDKV_DECODE_SCHEDULE", "balanced")
    pi, q, kt, vt = _long_inputs("int8", seed=1)
    kw = dict(scale=128 ** -0.5)
    ref = base.reference(pi, q.float(), kt, vt, **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pi.attend(q, kt, vt, **kw)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = pi.attend(q, kt, vt, **kw)
    for _ in range(3):
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
        base._close(out, ref, torch.bfloat16)
