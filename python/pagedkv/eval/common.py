"""Shared pieces of the quality evaluations: loading a model, building each cache, bits per element."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pagedkv import PagedKVCache, data
from pagedkv.config import DEFAULT_BLOCK_SIZE, FORMATS, KEY, VALUE, group_for, layout

RIVALS = ["quanto-4", "quanto-2", "hf-fp8"]


def load_model(path: str | None, dtype: torch.dtype, device: str = "cpu") -> tuple[Any, Any, str]:
    """(model, tokenizer, name); ``path`` may be ``stories260k``, ``smollm2`` or a local HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path in (None, "stories260k"):
        p, name = data.stories260k(), "stories260K"
    elif path == "smollm2":
        p, name = data.smollm2(), "SmolLM2-135M"
    else:
        p, name = Path(path), Path(path).name
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(p), name


def text_path(text: str | None) -> Path:
    if text in (None, "wikitext2", "tinystories"):
        return data.text_file(text or "wikitext2")
    return Path(text)


def make_cache(method: str, model: Any, key_group: int | None = None, value_group: int | None = None,
               residual: int | None = None) -> Any:
    """``dynamic``, a pagedkv format name, or a rival (``quanto-4``, ``quanto-2``, ``hf-fp8``)."""
    from transformers import DynamicCache, QuantizedCache

    if method == "dynamic":
        return DynamicCache(config=model.config)
    if method.startswith("quanto-"):
        return QuantizedCache(backend="quanto", config=model.config, nbits=int(method.split("-")[1]))
    if method == "hf-fp8":
        return QuantizedCache(backend="fp8", config=model.config)
    if method not in FORMATS:
        raise ValueError(f"unknown cache {method!r}: use dynamic, a format {sorted(FORMATS)} or {RIVALS}")
    return PagedKVCache(model.config, kv_format=method, key_group_size=key_group, value_group_size=value_group,
                        residual_length=residual)


def bits_per_element(method: str, model: Any, key_group: int | None = None, value_group: int | None = None) -> float:
    """Storage bits per cached element, every scale and zero counted (paged part; rivals: nominal)."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if method == "dynamic":
        return float(torch.finfo(model.dtype).bits)
    if method.startswith("quanto-"):
        nbits = int(method.split("-")[1])
        return nbits + 2 * 16 / 64  # quanto's default: group 64 with a scale and a shift per group (nominal)
    if method == "hf-fp8":
        return 8.0
    block = DEFAULT_BLOCK_SIZE
    kg = group_for(method, KEY, head_dim, key_group, value_group, block)
    vg = group_for(method, VALUE, head_dim, key_group, value_group, block)
    k = layout(method, KEY, heads, head_dim, block, kg)["bits_per_element"]
    v = layout(method, VALUE, heads, head_dim, block, vg)["bits_per_element"]
    return (k + v) / 2
