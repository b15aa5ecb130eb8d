"""Left padding with grouped key formats: padded positions stay out of the real tokens' key groups and
each row's first real token stays exact (``PagedKVCache.note_padding``, called by the "pagedkv" mask
function)."""

from __future__ import annotations

import pytest
import torch

import pagedkv
from models import tiny_model

KW = dict(num_layers=1, num_kv_heads=2, head_dim=16, block_size=16, residual_length=16, key_group_size=16)


def _padded(pads, n=64, pad_scale=100.0, seed=0):
    """Keys / values of len(pads) rows; row b's first pads[b] positions are padding with outlier keys."""
    torch.manual_seed(seed)
    k, v = torch.randn(len(pads), 2, n, 16), torch.randn(len(pads), 2, n, 16)
    mask = torch.ones(len(pads), n, dtype=torch.long)
    for b, p in enumerate(pads):
        k[b, :, :p] *= pad_scale
        mask[b, :p] = 0
    return k, v, mask


def _stored_keys(cache, k, v, chunk=None):
    """Store k / v in layer 0 (in chunks of ``chunk`` positions), then read the layer's keys back."""
    chunk = chunk or k.shape[2]
    for a in range(0, k.shape[2], chunk):
        cache.update(k[:, :, a:a + chunk], v[:, :, a:a + chunk], 0)
    return cache.update(k[:, :, :0], v[:, :, :0], 0)[0]


def _real_error(out, k, pads):
    """Largest key error of each row over its real positions."""
    return [(out[b, :, p:] - k[b, :, p:]).abs().max().item() for b, p in enumerate(pads)]


@pytest.mark.parametrize("fmt", ["int4", "int2", "nf4"])
@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("exact", [0, 1])
def test_padded_keys_stay_out_of_the_real_tokens_key_groups(fmt, chunk, exact):
    """exact_prefix 0: padded positions are stored with a real token's keys; 1: they are exact
    positions (past the padding), whose codes hold the next position's keys."""
    pads = [0, 5, 9]
    k, v, mask = _padded(pads)
    noted = pagedkv.PagedKVCache(None, fmt, exact_prefix=exact, **KW)
    noted.note_padding(mask)
    err = _real_error(_stored_keys(noted, k, v, chunk), k, pads)
    assert noted.layers[0].num_paged == 48 and noted.layers[0].exact == (1 + 9 if exact else 0)
    plain = _stored_keys(pagedkv.PagedKVCache(None, fmt, exact_prefix=exact, **KW), k, v, chunk)
    plain_err = _real_error(plain, k, pads)
    # Without the padding the outlier pad keys set the first group's range (nf4: its absmax).
    assert min(plain_err[1:]) > 5 * max(err)
    assert max(err[1:]) < 2 * plain_err[0] + 0.5


def test_first_real_token_of_each_row_is_exact():
    pads = [0, 5, 9]
    k, v, mask = _padded(pads)
    cache = pagedkv.PagedKVCache(None, "int4", **KW)
    cache.note_padding(mask)
    out = _stored_keys(cache, k, v)
    assert cache.layers[0].exact == 1 + 9  # exact_prefix 1, past the longest padding
    for b, p in enumerate(pads):
        assert torch.equal(out[b, :, p], k[b, :, p])
    cache.release()
    assert cache.layers[0].exact == 1  # a new prompt starts from exact_prefix again
    cache.note_padding(torch.ones_like(mask))
    _stored_keys(cache, k, v)
    assert cache.layers[0].exact == 1


def test_padding_longer_than_a_key_group():
    """A row padded past a key group keeps its real tokens' groups clean but not an exact first token;
    the exact positions move past the other rows' padding only."""
    pads = [0, 3, 40]
    k, v, mask = _padded(pads)
    cache = pagedkv.PagedKVCache(None, "int4", **KW)
    cache.note_padding(mask)
    err = _real_error(_stored_keys(cache, k, v), k, pads)
    assert cache.layers[0].exact == 1 + 3
    plain_err = _real_error(_stored_keys(pagedkv.PagedKVCache(None, "int4", **KW), k, v), k, pads)
    assert plain_err[2] > 10 * err[2]


def test_chunked_prefill_with_padding_past_the_first_chunk():
    """Each chunk's mask is noted as the mask function notes it; a row still all padding after the
    first chunk learns where its tokens start from a later, wider mask."""
    pads = [0, 40]
    k, v, mask = _padded(pads)
    cache = pagedkv.PagedKVCache(None, "int4", **KW)
    for a in range(0, 64, 16):
        cache.note_padding(mask[:, :a + 16])
        cache.update(k[:, :, a:a + 16], v[:, :, a:a + 16], 0)
    err = _real_error(cache.update(k[:, :, :0], v[:, :, :0], 0)[0], k, pads)
    assert cache._lead_pad[1] == 40
    plain_err = _real_error(_stored_keys(pagedkv.PagedKVCache(None, "int4", **KW), k, v, 16), k, pads)
    assert plain_err[1] > 10 * err[1]


def test_prefix_caching_keeps_its_exact_count():
    pads = [0, 5]
    k, v, mask = _padded(pads)
    cache = pagedkv.PagedKVCache(None, "int4", prefix_caching=True, **KW)
    cache.note_padding(mask)
    err = _real_error(_stored_keys(cache, k, v), k, pads)
    assert cache.layers[0].exact == 1
    plain_err = _real_error(_stored_keys(pagedkv.PagedKVCache(None, "int4", **KW), k, v), k, pads)
    assert plain_err[1] > 10 * err[1]


def test_note_padding_is_checked_and_changes_nothing_when_refused():
    k, v, mask = _padded([0, 5])
    cache = pagedkv.PagedKVCache(None, "int4", **KW)
    with pytest.raises(ValueError, match="attention_mask must be a 2-D"):
        cache.note_padding(mask[0])
    with pytest.raises(TypeError, match="attention_mask must be bool or integer, got torch.float32"):
        cache.note_padding(mask.float())
    cache.update(k, v, 0)
    with pytest.raises(ValueError, match="attention_mask has 3 rows but the cache holds 2 sequences"):
        cache.note_padding(torch.ones(3, 64, dtype=torch.long))
    cache.note_padding(mask)  # a cache that holds tokens takes no new padding
    assert cache.layers[0].exact == 1 and cache._lead_pad is None


def _generate(model, cache, ids, mask, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=12, past_key_values=cache, do_sample=False,
                          pad_token_id=0, **kw)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_generate_hands_the_padding_to_the_cache(arch, device):
    """The "pagedkv" mask function tells the cache the prompt's padding; the fused and the dense path
    then agree on the same pages (sdpa is told by hand)."""
    model = tiny_model(arch, dtype=torch.float32).to(device)
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (3, 40), device=device)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :2] = 0
    kw = dict(kv_format="int4", block_size=16, residual_length=16, key_group_size=16)
    model.set_attn_implementation("pagedkv")
    fused = pagedkv.PagedKVCache(model.config, **kw)
    out = _generate(model, fused, ids, mask)
    full = [i for i, layer in enumerate(fused.layers) if not layer.is_sliding]
    assert all(fused.layers[i].exact == 1 + 7 for i in full)
    assert all(layer.exact == 0 for layer in fused.layers if layer.is_sliding)
    model.set_attn_implementation("sdpa")
    dense = pagedkv.PagedKVCache(model.config, **kw)
    _generate(model, dense, ids, mask)
    assert dense.layers[full[0]].exact == 1  # sdpa's mask function does not hand the padding over
    dense = pagedkv.PagedKVCache(model.config, **kw)
    dense.note_padding(mask)
    assert torch.equal(_generate(model, dense, ids, mask), out)
    model.set_attn_implementation("pagedkv")
    beams = pagedkv.PagedKVCache(model.config, **kw)
    _generate(model, beams, ids, mask, num_beams=2)
    assert beams.layers[full[0]].exact == 1 + 7
    if device == "cuda":  # the captured decode steps read the moved exact positions as eager ones do
        graph = pagedkv.PagedKVCache(model.config, **kw)
        assert torch.equal(_generate(model, graph, ids, mask, custom_generate=pagedkv.graph_generate), out)
