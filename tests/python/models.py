"""Small random-initialized models built from real architectures' configs (shapes, not quality)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM


def tiny_config(arch: str):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, head_dim=16)
    if arch == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(**common)
    if arch == "qwen3":
        from transformers import Qwen3Config
        return Qwen3Config(**common)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig
        cfg = Gemma3TextConfig(**common, sliding_window=24, query_pre_attn_scalar=16)
        cfg.layer_types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
        return cfg
    raise ValueError(arch)


def tiny_model(arch: str, dtype=torch.bfloat16):
    torch.manual_seed(1234)
    cfg = tiny_config(arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return model
