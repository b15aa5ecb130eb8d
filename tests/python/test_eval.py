"""Quality regression checks on a reduced budget (the full tables: python -m pagedkv.eval ppl).

Thresholds come from the measured reduced-budget tables (benchmarks/RESULTS.md) with a margin; a
broken quantizer moves these deltas by orders of magnitude."""

from __future__ import annotations

import math

import pytest
import torch

from pagedkv import data
from pagedkv.eval.common import bits_per_element, load_model, text_path
from pagedkv.eval.ppl import stream_nll


def _windows(tok, text: str, context: int, tokens: int) -> torch.Tensor:
    ids = tok(text_path(text).read_text(encoding="utf-8"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = tokens // context
    return ids[:n * context].reshape(n, context)


def _deltas(model, windows, formats, chunk=64):
    nll, n = stream_nll(model, windows, "dynamic", chunk, batch=4)
    ref = math.exp(nll / n)
    out = {}
    for f in formats:
        nll_f, n_f = stream_nll(model, windows, f, chunk, batch=4)
        assert n_f == n
        out[f] = 100 * (math.exp(nll_f / n_f) / ref - 1)
    return ref, out


def test_stories260k_tinystories_deltas():
    if not data.stories260k().exists():
        pytest.skip("stories260K not available")
    model, tok, _ = load_model("stories260k", torch.float32)
    windows = _windows(tok, "tinystories", 256, 2048)
    ref, d = _deltas(model, windows, ["fp32", "bf16", "int8", "int4", "int2"])
    print(f"stories260K ppl {ref:.4f}, deltas % {d}")
    assert abs(d["fp32"]) < 1e-9  # fp32 pages hold the exact values: same protocol, same numbers
    assert abs(d["bf16"]) <= 0.05 and abs(d["int8"]) <= 0.1
    # measured 2026-11-24: bf16 0.000, int8 0.008, int4 -0.020, int2 -0.001
    assert abs(d["int4"]) <= 0.5 and abs(d["int2"]) <= 1.0


def test_smollm2_wikitext_deltas():
    try:
        model, tok, _ = load_model("smollm2", torch.float32)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    windows = _windows(tok, "wikitext2", 512, 2048)
    ref, d = _deltas(model, windows, ["bf16", "fp8_e4m3", "int8", "int4", "nf4", "int2"])
    print(f"SmolLM2 ppl {ref:.4f}, deltas % {d}")
    # measured (2026-11-24, defaults: exact first position, rotated values, fitted 2-bit keys): bf16 -0.002,
    # fp8 +0.039, int8 +0.102, int4 -0.017, nf4 +0.596, int2 +2.857 (+15.546 with min/max keys and no
    # rotation). Bounds: about twice the measured delta, at least 0.5 points.
    assert abs(d["bf16"]) <= 0.05
    assert abs(d["fp8_e4m3"]) <= 0.5 and abs(d["int8"]) <= 0.5
    assert abs(d["int4"]) <= 0.5 and abs(d["nf4"]) <= 1.5
    assert 0 < d["int2"] <= 6.0 and d["int2"] > abs(d["int4"])


def test_bits_per_element_count_metadata():
    model, _, _ = load_model("stories260k", torch.float32)  # head_dim 8
    assert bits_per_element("bf16", model) == 16.0
    assert bits_per_element("int8", model) == 8 + 32 / 8  # one fp32 scale per 8-element token row
    assert bits_per_element("int4", model) > 4.0
