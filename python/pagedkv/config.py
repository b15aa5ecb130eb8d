"""Storage formats, their per-format defaults, and the bits-per-element table.

Every format stores keys and values; the two may differ, and each layer may have its own pair.
The exact byte layouts are defined in ``csrc/include/pagedkv/formats.h``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from pagedkv import _C

#: Format name -> id used by the C++ core and the torch ops.
FORMATS: dict[str, int] = {
    name: _C.format_id(name) for name in ("fp32", "bf16", "fp16", "fp8_e4m3", "int8", "int4", "int2", "nf4")
}
KEY, VALUE = 0, 1

#: Grouped formats: KIVI-style keys per channel over token groups, values per token over channel groups.
GROUPED = frozenset({"int4", "int2", "nf4"})
#: Default key group (tokens) and value group (channels). Chosen so int4 stays <= 0.30x bf16 and
#: int2 <= 0.18x with every scale and zero point counted (see ``python -m pagedkv.bench memory``).
#: int2 spends its metadata on the keys (32-token key groups, 64-channel value groups): the same bits
#: per element as 64 / 32 for head_dim >= 64, and measured better (benchmarks/RESULTS.md, "int2 probe").
DEFAULT_KEY_GROUP = {"int4": 64, "int2": 32, "nf4": 64}
DEFAULT_VALUE_GROUP = {"int4": 64, "int2": 64, "nf4": 64}
#: Newest tokens kept in full precision when any layer uses a grouped format.
DEFAULT_RESIDUAL_LENGTH = 128
#: Tokens per page when the caller gives none. 64 for every format: on the H100 the decode kernel reads
#: 64-token pages as fast as 16-token ones or faster (int8 at batch 8 / 32k: 1.70x SDPA against 1.61x;
#: benchmarks/RESULTS.md, "Decode kernel, session 15"); shared prefixes are reused in whole pages.
DEFAULT_BLOCK_SIZE = 64

KVFormat = str

ALIASES = {"fp8": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def canonical_format(name: str, argument: str = "kv_format") -> str:
    """Return the canonical name of a format, raising ``ValueError`` naming ``argument`` otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a format name (str), got {type(name).__name__} {name!r}")
    canon = ALIASES.get(name, name)
    if canon not in FORMATS:
        raise ValueError(f"{argument}={name!r} is not a known format; expected one of {sorted(FORMATS)}")
    return canon


@dataclasses.dataclass(frozen=True)
class LayerFormat:
    """Key and value formats of one layer.

    Parameters
    ----------
    key, value:
        Format names (``fp32 bf16 fp16 fp8_e4m3 int8 int4 int2 nf4``).
    """

    key: str
    value: str

    @property
    def grouped(self) -> bool:
        return self.key in GROUPED or self.value in GROUPED


def resolve_layer_formats(
    num_layers: int,
    kv_format: str | None,
    key_format: str | None,
    value_format: str | None,
    layer_formats: Sequence[str | tuple[str, str] | LayerFormat] | Mapping[int, str | tuple[str, str]] | None,
) -> list[LayerFormat]:
    """Build one :class:`LayerFormat` per layer from the cache's format arguments."""
    base = canonical_format(kv_format if kv_format is not None else "bf16")
    k = canonical_format(key_format, "key_format") if key_format is not None else base
    v = canonical_format(value_format, "value_format") if value_format is not None else base
    out = [LayerFormat(k, v) for _ in range(num_layers)]
    if layer_formats is None:
        return out
    items = layer_formats.items() if isinstance(layer_formats, Mapping) else enumerate(layer_formats)
    if not isinstance(layer_formats, Mapping) and len(layer_formats) != num_layers:
        raise ValueError(f"layer_formats has {len(layer_formats)} entries but the model has {num_layers} layers")
    for idx, spec in items:
        if not isinstance(idx, int) or not 0 <= idx < num_layers:
            raise ValueError(f"layer_formats names layer {idx!r}, outside [0, {num_layers})")
        if isinstance(spec, LayerFormat):
            out[idx] = LayerFormat(canonical_format(spec.key, "layer_formats"), canonical_format(spec.value, "layer_formats"))
        elif isinstance(spec, str):
            f = canonical_format(spec, f"layer_formats[{idx}]")
            out[idx] = LayerFormat(f, f)
        else:
            kf, vf = spec
            out[idx] = LayerFormat(canonical_format(kf, f"layer_formats[{idx}]"), canonical_format(vf, f"layer_formats[{idx}]"))
    return out


def group_for(fmt: str, role: int, head_dim: int, key_group: int | None, value_group: int | None, block_size: int) -> int:
    """Quantization group of one tensor: tokens for grouped keys, channels for grouped values, else 1."""
    if fmt not in GROUPED:
        return 1
    if role == KEY:
        return key_group if key_group is not None else min(DEFAULT_KEY_GROUP[fmt], block_size)
    # The largest power-of-two divisor of head_dim up to the default (head_dim 80 -> 16, 96 -> 32).
    return value_group if value_group is not None else math.gcd(DEFAULT_VALUE_GROUP[fmt], head_dim)


def layout(fmt: str, role: int, num_kv_heads: int, head_dim: int, block_size: int, group: int) -> dict:
    """Byte layout of one of K/V of one layer in one block (validated by the C++ core)."""
    return _C.page_layout(FORMATS[fmt], role, num_kv_heads, head_dim, block_size, group)


def format_table(num_kv_heads: int = 8, head_dim: int = 128, block_size: int = 64) -> str:
    """Markdown table of exact storage bits per element for every format, metadata included."""
    rows = [
        "| format | key bits/elem | value bits/elem | K+V bytes/token/layer | vs bf16 | key metadata | value metadata |",
        "|---|---|---|---|---|---|---|",
    ]
    meta = {
        "fp32": ("none", "none"),
        "bf16": ("none", "none"),
        "fp16": ("none", "none"),
        "fp8_e4m3": ("fp32 scale / token / head", "fp32 scale / token / head"),
        "int8": ("fp32 scale / token / head", "fp32 scale / token / head"),
        "int4": ("fp16 scale + fp16 zero / channel / {kg} tokens", "fp16 scale + fp16 zero / {vg} channels / token"),
        "int2": ("fp16 scale + fp16 zero / channel / {kg} tokens", "fp16 scale + fp16 zero / {vg} channels / token"),
        "nf4": (
            "uint8 absmax / channel / {kg} tokens + fp16 super-scale / {kg} tokens / head",
            "uint8 absmax / {vg} channels / token + fp16 super-scale / token / head",
        ),
    }
    bf16 = layout("bf16", KEY, num_kv_heads, head_dim, block_size, 1)["block_bytes"] * 2
    for name in FORMATS:
        kg = group_for(name, KEY, head_dim, None, None, block_size)
        vg = group_for(name, VALUE, head_dim, None, None, block_size)
        kl = layout(name, KEY, num_kv_heads, head_dim, block_size, kg)
        vl = layout(name, VALUE, num_kv_heads, head_dim, block_size, vg)
        per_tok = (kl["block_bytes"] + vl["block_bytes"]) / block_size
        km, vm = (m.format(kg=kg, vg=vg) for m in meta[name])
        rows.append(
            f"| {name} | {kl['bits_per_element']:.4f} | {vl['bits_per_element']:.4f} | {per_tok:.1f} | "
            f"{(kl['block_bytes'] + vl['block_bytes']) / bf16:.4f}x | {km} | {vm} |"
        )
    return "\n".join(rows)
