"""Attention-sink positions kept exact (``exact_prefix``) and rotated values (``value_rotation``)."""

from __future__ import annotations

import pytest
import torch

import pagedkv
from models import tiny_model

SMALL = dict(num_layers=1, num_kv_heads=2, head_dim=16, block_size=16, residual_length=16, key_group_size=16)


@pytest.mark.parametrize("head_dim", [8, 64, 80, 128])
def test_rotation_is_orthogonal_and_fixed(head_dim):
    store = pagedkv.KVStore(None, "int2", num_layers=1, num_kv_heads=1, head_dim=head_dim)
    r = store.rotation(torch.device("cpu"))
    assert r.shape == (head_dim, head_dim)
    torch.testing.assert_close(r @ r.T, torch.eye(head_dim), atol=1e-6, rtol=0)
    other = pagedkv.KVStore(None, "int2", num_layers=1, num_kv_heads=1, head_dim=head_dim)
    assert torch.equal(other.rotation(torch.device("cpu")), r)  # pages written by one store read by another
    assert (r.abs() > 0).sum(1).min() >= min(head_dim & -head_dim, head_dim)  # mixes whole power-of-two blocks


def _stored(cache, k, v):
    """Store k/v in layer 0, then read the layer back (a step of no new tokens sees the pages)."""
    cache.update(k, v, 0)
    return cache.update(k[:, :, :0], v[:, :, :0], 0)


def _keys_with_sink(n=64, sink_scale=200.0):
    torch.manual_seed(0)
    k = torch.randn(1, 2, n, 16)
    k[:, :, 0] *= sink_scale
    return k, torch.randn(1, 2, n, 16)


@pytest.mark.parametrize("fmt", ["int2", "int4", "nf4"])
def test_sink_is_exact_and_out_of_its_key_group(fmt):
    k, v = _keys_with_sink()
    errs = {}
    for exact in (0, 1):
        cache = pagedkv.PagedKVCache(None, fmt, exact_prefix=exact, **SMALL)
        dk, dv = _stored(cache, k, v)
        assert cache.layers[0].num_paged >= 16
        if exact:
            assert torch.equal(dk[:, :, 0], k[:, :, 0])
            torch.testing.assert_close(dv[:, :, 0], v[:, :, 0], atol=1e-5, rtol=0)
        errs[exact] = float((dk[:, :, 1:16] - k[:, :, 1:16]).norm() / k[:, :, 1:16].norm())
    # Left in its group, the 200x sink stretches every channel's grid over the other 15 positions.
    assert errs[1] < 0.5 * errs[0], errs


def test_defaults_follow_the_formats():
    assert pagedkv.KVStore(None, "int2", **{k: SMALL[k] for k in ("num_layers", "num_kv_heads", "head_dim")}
                           ).exact_layers == [1]
    store = pagedkv.KVStore(None, "int8", num_layers=2, num_kv_heads=1, head_dim=16, value_format="int4")
    assert store.exact_layers == [0, 0] and store.rotated_layers == [True, True]
    off = pagedkv.KVStore(None, "int4", num_layers=1, num_kv_heads=1, head_dim=16, value_rotation=False)
    assert off.rotated_layers == [False] and off.exact_layers == [1]


def test_rotated_values_come_back_in_the_model_basis():
    torch.manual_seed(1)
    k, v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    cache = pagedkv.PagedKVCache(None, "int4", **SMALL)
    _, dv = _stored(cache, k, v)
    # Residual positions are exact up to the fp32 rotation round trip; paged ones within int4 error.
    torch.testing.assert_close(dv[:, :, 32:], v[:, :, 32:], atol=1e-5, rtol=0)
    assert float((dv - v).norm() / v.norm()) < 0.15


def test_crop_below_the_pages_restores_exact_rows():
    k, v = _keys_with_sink(80)
    cache = pagedkv.PagedKVCache(None, "int2", **SMALL)
    cache.update(k, v, 0)
    cache.crop(5 - 80)
    dk, dv = cache.update(k[:, :, 5:6], v[:, :, 5:6], 0)
    assert dk.shape[2] == 6 and torch.equal(dk[:, :, 0], k[:, :, 0])  # positions 1-4 come back dequantized
    torch.testing.assert_close(dv[:, :, 0], v[:, :, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(dv[:, :, 5], v[:, :, 5], atol=1e-5, rtol=0)


def test_prefix_cache_carries_exact_rows():
    k, v = _keys_with_sink(80)
    store = pagedkv.KVStore(None, "int2", prefix_caching=True, **SMALL)
    ids = torch.arange(80)
    a = pagedkv.PagedKVCache(store=store)
    ref_k, ref_v = _stored(a, k, v)
    assert a.cache_prefix(ids[None]) > 0
    a.release()
    b = pagedkv.PagedKVCache(store=store)
    got = b.attach_prefix(ids[None])
    assert got == 64
    dk, dv = b.update(k[:, :, got:], v[:, :, got:], 0)
    assert torch.equal(dk[:, :, 0], k[:, :, 0])
    torch.testing.assert_close(dk, ref_k, atol=1e-6, rtol=0)
    torch.testing.assert_close(dv, ref_v, atol=1e-5, rtol=0)


def _logits(model, cache, ids, mask, steps):
    """Teacher-forced: the prompt in one step, then ``steps`` single tokens."""
    n = ids.shape[1] - steps
    out = [model(ids[:, :n], attention_mask=mask[:, :n], past_key_values=cache, use_cache=True).logits[:, -1]]
    for t in range(n, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                         use_cache=True).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("fmt", ["int2", "int4"])
def test_fused_equals_dense_with_exact_prefix_rotation_and_padding(fmt):
    """The fused op sees the exact sinks (moved to the tail, mask reordered) and rotated values the same
    way the dense path does, with left padding: the "pagedkv" mask function hands the cache the padding
    (exact positions move past row 1's 9 pads); the sdpa run is told it by hand."""
    model = tiny_model("llama", dtype=torch.float32)
    torch.manual_seed(3)
    ids = torch.randint(3, 256, (2, 70))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    kw = dict(kv_format=fmt, block_size=16, residual_length=16, key_group_size=16, exact_prefix=3)
    model.set_attn_implementation("sdpa")
    dense_cache = pagedkv.PagedKVCache(model.config, **kw)
    dense_cache.note_padding(mask[:, :40])
    dense = _logits(model, dense_cache, ids, mask, 30)
    model.set_attn_implementation("pagedkv")
    cache = pagedkv.PagedKVCache(model.config, **kw)
    fused = _logits(model, cache, ids, mask, 30)
    assert cache.layers[0].num_paged >= 48 and cache.layers[0].exact == dense_cache.layers[0].exact == 3 + 9
    torch.testing.assert_close(fused, dense, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [-1, 16, 1.5, True])
def test_exact_prefix_is_checked(bad):
    with pytest.raises(ValueError, match="exact_prefix"):
        pagedkv.PagedKVCache(None, "int2", exact_prefix=bad, **SMALL)


def test_value_rotation_is_checked():
    with pytest.raises(TypeError, match="value_rotation"):
        pagedkv.PagedKVCache(None, "int2", value_rotation="yes", **SMALL)


def test_reordered_mask_is_shared_by_a_step_and_follows_in_place_edits():
    cache = pagedkv.PagedKVCache(None, "int2", **SMALL)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :3] = False
    a = cache._exact_order_mask(mask, 0, 1, 32)
    assert cache._exact_order_mask(mask, 0, 1, 32) is a  # the next layer of the step reuses it
    assert torch.equal(a, torch.cat([mask[:, 1:32], mask[:, :1], mask[:, 32:]], 1))
    mask[0, 5] = False  # a loop that edits its mask in place between steps
    b = cache._exact_order_mask(mask, 0, 1, 32)
    assert b is not a and not bool(b[0, 4])
