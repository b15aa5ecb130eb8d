"""Quantizer quality: NMSE bounds per format on Gaussian and heavy-tailed inputs, and exact round trips
for values on each format's grid (through the reference and through the real cache kernels).

NMSE bounds are the values measured on these seeded inputs (CPU dev machine, 2026-11-23) times 1.5,
rounded up: a format that regresses by more than half fails.
"""

from __future__ import annotations

import pytest
import torch

import pagedkv
from pagedkv.config import GROUPED, KEY, VALUE
from pagedkv.reference import fake_quantize

FORMATS = ["bf16", "fp16", "fp8_e4m3", "int8", "int4", "nf4", "int2"]


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (256, 4, 128)
    gauss = torch.randn(shape, generator=g)
    student = _student_t(shape, g)
    channel_scale = torch.where(torch.rand(128, generator=g) < 0.05, 20.0, 1.0)  # outlier channels, as in keys
    return {"gaussian": gauss, "student_t3": student, "outlier_channels": torch.randn(shape, generator=g) * channel_scale}


def _student_t(shape, g, df: float = 3.0) -> torch.Tensor:
    """Student-t samples from a seeded generator: normal / sqrt(chi2 / df)."""
    z = torch.randn(shape, generator=g)
    chi2 = (torch.randn((*shape, int(df)), generator=g) ** 2).sum(-1)
    return z / torch.sqrt(chi2 / df)


# (format, input) -> NMSE bound for (keys, values); measured x 1.5, rounded up.
BOUNDS = {
    "bf16": {"gaussian": (5e-6, 5e-6), "student_t3": (5e-6, 5e-6), "outlier_channels": (5e-6, 5e-6)},
    "fp16": {"gaussian": (1e-7, 1e-7), "student_t3": (1e-7, 1e-7), "outlier_channels": (1e-7, 1e-7)},
    "fp8_e4m3": {"gaussian": (1e-3, 1e-3), "student_t3": (1e-3, 1e-3), "outlier_channels": (1e-3, 1e-3)},
    "int8": {"gaussian": (7e-5, 7e-5), "student_t3": (4e-4, 4e-4), "outlier_channels": (4e-4, 4e-4)},
    "int4": {"gaussian": (1.3e-2, 1.3e-2), "student_t3": (3e-2, 3e-2), "outlier_channels": (1.3e-2, 4.2e-2)},
    "nf4": {"gaussian": (1.3e-2, 1.3e-2), "student_t3": (3e-2, 3e-2), "outlier_channels": (1.3e-2, 3e-2)},
    "int2": {"gaussian": (0.31, 0.31), "student_t3": (0.7, 0.7), "outlier_channels": (0.31, 1.0)},
}


def _group(fmt: str) -> int:
    return 64 if fmt in GROUPED else 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_nmse_bounds(fmt):
    for name, x in _inputs().items():
        for role, bound in zip((KEY, VALUE), BOUNDS[fmt][name]):
            y = fake_quantize(x, fmt, role, _group(fmt))
            nmse = float(((y - x) ** 2).sum() / (x**2).sum())
            assert nmse < bound, (fmt, name, "key" if role == KEY else "value", nmse)


def test_per_channel_keys_absorb_outlier_channels():
    """Why keys are quantized per channel (KIVI): outlier channels hurt per-token groups, not per-channel ones."""
    x = _inputs()["outlier_channels"]
    for fmt in ("int4", "int2"):
        key = fake_quantize(x, fmt, KEY, 64)
        value = fake_quantize(x, fmt, VALUE, 64)
        nmse_k = float(((key - x) ** 2).sum() / (x**2).sum())
        nmse_v = float(((value - x) ** 2).sum() / (x**2).sum())
        assert nmse_k < 0.5 * nmse_v, (fmt, nmse_k, nmse_v)


@pytest.mark.parametrize("fmt", FORMATS)
def test_grid_values_round_trip_exactly(fmt):
    """Dequantized values lie on the format's grid, so quantizing them again changes nothing. nf4's
    double-quantized scales are the exception on keys with outlier channels: re-deriving a channel's
    uint8 absmax code from its dequantized maximum moves 59 of 131,072 values (relative error 1.5e-7).
    So are int2 keys, which are fitted by least squares (asym_fit): refitting a fitted heavy-tailed group
    starts from a min/max grid one rounding away, and 1 of 131,072 values moves (relative error 2e-10)."""
    for name, x in _inputs().items():
        for role in (KEY, VALUE):
            y = fake_quantize(x, fmt, role, _group(fmt))
            again = fake_quantize(y, fmt, role, _group(fmt))
            if (fmt == "nf4" and name == "outlier_channels" or fmt == "int2" and name == "student_t3") and role == KEY:
                assert float(((again - y) ** 2).sum() / (y**2).sum()) < 1e-6
                continue
            assert torch.equal(again, y), (fmt, name, role)


def _grid(fmt: str, tokens: int, heads: int, dim: int) -> torch.Tensor:
    """Values exactly on the grid of ``fmt`` for keys (groups of 64 tokens per channel) and values (groups
    of 64 channels per token) at once: every group attains both ends of the code range."""
    g = torch.Generator().manual_seed(1)
    if fmt in ("int4", "int2"):
        top = 15 if fmt == "int4" else 3
        k = torch.randint(0, top + 1, (tokens, heads, dim), generator=g)
        k[::64, :, :] = 0                      # each key group (64 tokens of a channel) holds 0 and top
        k[1::64, :, :] = top
        k[:, :, ::64] = 0                      # each value group (64 channels of a token) holds 0 and top
        k[:, :, 1::64] = top
        return -1.0 + k.float() * (0.125 if fmt == "int4" else 0.5)
    if fmt == "int8":
        k = torch.randint(-127, 128, (tokens, heads, dim), generator=g)
        k[:, :, 0] = 127                       # absmax 127 * 2^-4 in every token and head
        return k.float() / 16
    if fmt == "fp8_e4m3":
        v = (torch.randn(tokens, heads, dim, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).float()
        v[:, :, 0] = 448.0                     # absmax 448 -> scale 1
        return v / 16
    return torch.randn(tokens, heads, dim, generator=g).to(torch.bfloat16).float()


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "int8", "int4", "int2"])
def test_grid_values_round_trip_through_the_cache_kernels(fmt):
    x = _grid(fmt, 128, 2, 128)  # [tokens, heads, dim]
    states = x.permute(1, 0, 2)[None].contiguous()  # [1, heads, tokens, dim]
    for role in (KEY, VALUE):
        assert torch.equal(fake_quantize(x, fmt, role, _group(fmt)), x), (fmt, role)
    cache = pagedkv.PagedKVCache(None, fmt, num_layers=1, num_kv_heads=2, head_dim=128, residual_length=0,
                                 value_rotation=False, exact_prefix=0)  # the stored grid, as given
    k, v = cache.update(states, states, 0)
    assert cache.layers[0].num_paged == 128  # everything went through the pages
    k, v = cache._group_of[0].read(0, 0, 128, torch.float32, torch.device("cpu"))
    assert torch.equal(k, states) and torch.equal(v, states)
