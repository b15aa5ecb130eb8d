"""Attention sinks + recent window (StreamingLLM) as a cache policy."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import pagedkv
from models import tiny_model

S, W = 4, 40


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", dtype=torch.float32)


def _rope(model, raw, positions):
    """Keys ``raw [B, H, T, D]`` rotated to ``positions [T]`` by the model's own rotary code."""
    cos, sin = model.model.rotary_emb(raw, positions[None])
    _, k = apply_rotary_pos_emb(raw, raw, cos, sin)
    return k


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_sinks_are_rerotated_to_sit_before_the_window(llama, fmt):
    cfg = llama.config
    cache = pagedkv.PagedKVCache(cfg, fmt, recent_window=W, sink_tokens=S, rotary=llama.model.rotary_emb)
    h, d = cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(1, h, 202, d, generator=g)
    vals = torch.randn(1, h, 202, d, generator=g)
    rotated = _rope(llama, raw, torch.arange(202))
    t = 0
    for step in [30, 1, 1, 25, 1, 1, 60, 1, 1, 1, 79, 1]:
        kv_len, kv_off = cache.get_mask_sizes(step, 0)
        k, v = cache.update(rotated[:, :, t:t + step], vals[:, :, t:t + step], 0)
        assert k.shape[2] == kv_len
        visible = max(t - W + 1, 0)
        shown = min(S, visible)
        assert kv_off == visible - shown
        # Window part: the stored keys at their own positions; sink part: re-rotated to kv_off + i.
        ref_k = torch.cat([_rope(llama, raw[:, :, :shown], torch.arange(kv_off, kv_off + shown)),
                           rotated[:, :, visible:t + step]], dim=2)
        ref_v = torch.cat([vals[:, :, :shown], vals[:, :, visible:t + step]], dim=2)
        tol = dict(rtol=1e-5, atol=1e-5) if fmt == "fp32" else dict(rtol=0.1, atol=0.5)
        torch.testing.assert_close(k[:, :, :shown], ref_k[:, :, :shown], rtol=1e-5, atol=1e-5)  # sinks: full precision
        torch.testing.assert_close(k, ref_k, **tol)
        torch.testing.assert_close(v, ref_v, **tol)
        t += step
    # Memory stays bounded: only the window's blocks (plus one partial) are held.
    held = len(cache._groups[0].tables.blocks(cache._groups[0].seqs[0]))
    assert held * cache.block_size <= W + 2 * cache.block_size + cache.residual_length


def test_long_stream_decodes_with_bounded_memory_and_positions_past_the_context(llama):
    cfg = llama.config  # max_position_embeddings 512
    cache = pagedkv.PagedKVCache(cfg, "int8", recent_window=60, sink_tokens=S, rotary=llama.model.rotary_emb)
    ids = torch.randint(0, 256, (1, 700), generator=torch.Generator().manual_seed(1))
    logits = pagedkv.prefill(llama, ids, cache, chunk_size=1)
    assert torch.isfinite(logits).all()
    assert cache.get_seq_length() == 700
    held = len(cache._groups[0].tables.blocks(cache._groups[0].seqs[0]))
    assert held <= 60 // cache.block_size + 2
    assert cache.memory_stats()["paged_bytes"] == held * cache._groups[0].pool.bytes_per_block


def test_sink_arguments_are_checked(llama):
    with pytest.raises(ValueError, match="recent_window"):
        pagedkv.PagedKVCache(llama.config, sink_tokens=4, rotary=llama.model.rotary_emb)
    with pytest.raises(ValueError, match="rotary"):
        pagedkv.PagedKVCache(llama.config, recent_window=32, sink_tokens=4)
    with pytest.raises(ValueError, match="sink_tokens"):
        pagedkv.PagedKVCache(llama.config, recent_window=32, sink_tokens=-1)
    with pytest.raises(ValueError, match="recent_window"):
        pagedkv.PagedKVCache(llama.config, recent_window=0)
    plain = pagedkv.PagedKVCache(llama.config, recent_window=32, sink_tokens=4, rotary=llama.model.rotary_emb,
                                 attn_implementation="pagedkv")
    assert not plain.fused  # sinks use the dense path
