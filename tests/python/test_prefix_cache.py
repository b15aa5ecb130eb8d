"""Prefix caching through KVStore / PagedKVCache: sharing, references, copy-on-write, eviction, TTL, budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pagedkv
from pagedkv import _C
from models import tiny_model

BS = 16


def _fill(cache: pagedkv.PagedKVCache, n: int, seed: int = 0, batch: int = 1) -> None:
    """n positions of random K/V in every layer (as a model's forward would write them)."""
    g = torch.Generator().manual_seed(seed)
    for layer in range(len(cache.layers)):
        k = torch.randn(batch, cache.num_kv_heads, n, cache.head_dim, generator=g)
        cache.update(k, torch.randn(k.shape, generator=g), layer)


def _store(**kw) -> pagedkv.KVStore:
    kw.setdefault("block_size", BS)
    return pagedkv.KVStore(None, kw.pop("kv_format", "fp32"), num_layers=2, num_kv_heads=2, head_dim=16,
                           prefix_caching=True, **kw)


def _held(cache: pagedkv.PagedKVCache) -> list[int]:
    g = cache._groups[0]
    return list(g.tables.blocks(g.seqs[0]))


def test_equal_prefixes_share_blocks_and_a_different_token_does_not():
    store = _store()
    ids = torch.arange(100, 164)[None]  # 4 blocks
    a = pagedkv.PagedKVCache(store=store)
    _fill(a, 64)
    assert a.cache_prefix(ids) == 4
    b = pagedkv.PagedKVCache(store=store)
    assert b.attach_prefix(ids) == 48  # capped at seq_len - 1 -> 3 whole blocks
    assert _held(b) == _held(a)[:3]
    c = pagedkv.PagedKVCache(store=store)
    longer = torch.cat([ids, torch.tensor([[1]])], 1)
    assert c.attach_prefix(longer) == 64
    d = pagedkv.PagedKVCache(store=store)
    other = ids.clone()
    other[0, 40] = 7  # third block differs
    assert d.attach_prefix(torch.cat([other, other], 1)) == 32
    assert _held(d) == _held(a)[:2]
    e = pagedkv.PagedKVCache(store=store)
    first = ids.clone()
    first[0, 0] = 7  # first block differs: the chain breaks at the root
    assert e.attach_prefix(first) == 0
    assert e.get_seq_length() == 0 and not e.is_initialized
    s = store.prefix_stats()
    assert s["hit_blocks"] == 3 + 4 + 2 + 0
    assert s["miss_blocks"] == (4 - 3) + 0 + (8 - 2) + 4
    assert s["requests"] == 4
    assert s["bytes_saved"] == 9 * store.groups[0].pool.bytes_per_block
    assert 0 < s["hit_rate"] < 1


def test_salt_and_dtype_separate_hashes():
    pool = _C.BlockPool(64, 8)
    tables = _C.BlockTables(pool, BS)
    index = _C.PrefixIndex(pool, BS)
    seq = tables.add_sequence()
    tables.append([seq], 32)
    toks = np.arange(32, dtype=np.int32)
    assert index.insert(toks, tables.blocks(seq), 1, 0.0) == 2
    assert len(index.match(toks, 1, 0.0)) == 2
    assert index.match(toks, 2, 0.0) == []
    s32 = _store(salt="model-a")
    s32.bind(torch.device("cpu"), torch.float32)
    s16 = _store(salt="model-a")
    s16.bind(torch.device("cpu"), torch.bfloat16)
    other = _store(salt="model-b")
    other.bind(torch.device("cpu"), torch.float32)
    assert len({s32.hash_salt(), s16.hash_salt(), other.hash_salt()}) == 3


def test_references_under_attach_release_and_copy_on_write():
    store = _store()
    ids = torch.arange(48)[None]
    a = pagedkv.PagedKVCache(store=store)
    _fill(a, 48)
    a.cache_prefix(ids)
    blocks = _held(a)
    pool = store.groups[0].pool
    assert [pool.refcount(b) for b in blocks] == [2, 2, 2]  # sequence + index
    ka, va = _read(a, 48)
    a.release()
    assert [pool.refcount(b) for b in blocks] == [1, 1, 1]  # cached, unreferenced
    b = pagedkv.PagedKVCache(store=store)
    assert b.attach_prefix(torch.cat([ids, ids[:, :1]], 1)) == 48
    assert [pool.refcount(x) for x in blocks] == [2, 2, 2]
    c = pagedkv.PagedKVCache(store=store)
    c.attach_prefix(torch.cat([ids, ids[:, :1]], 1))
    assert [pool.refcount(x) for x in blocks] == [3, 3, 3]
    # Crop into the last shared block and write: the write goes to a copy; the cached block is intact.
    b.crop(-8)
    _fill(b, 1, seed=5)
    assert _held(b)[:2] == blocks[:2] and _held(b)[2] != blocks[2]
    assert pool.refcount(blocks[2]) == 2
    kb, _ = _read(b, 40)
    torch.testing.assert_close(kb, ka[:, :, :40], rtol=0, atol=0)
    kc, vc = _read(c, 48)
    torch.testing.assert_close(kc, ka, rtol=0, atol=0)
    torch.testing.assert_close(vc, va, rtol=0, atol=0)
    b.release()
    c.release()
    assert [pool.refcount(x) for x in blocks] == [1, 1, 1]
    assert pool.num_used == 3
    store.groups[0].index.check_invariants()
    pool.check_invariants()


def _read(cache, n):
    """Layer 0's paged positions [0, n), dequantized."""
    return cache._group_of[0].read(0, 0, n, torch.float32, torch.device("cpu"))


def _cached_request(store, ids, seed=0):
    c = pagedkv.PagedKVCache(store=store)
    _fill(c, ids.shape[1], seed=seed)
    c.cache_prefix(ids)
    c.release()


@pytest.mark.parametrize("policy", ["lru", "lfu", "priority"])
def test_eviction_order_under_a_budget(policy):
    probe = _store()
    per_block = probe.groups[0].pool.bytes_per_block
    store = _store(eviction=policy, max_memory_bytes=6 * per_block, blocks_per_chunk=2)
    a, b, c = (torch.arange(32)[None] + 1000 * i for i in range(3))  # 2 blocks each
    _cached_request(store, a)
    if policy == "priority":
        x = pagedkv.PagedKVCache(store=store)
        _fill(x, 32)
        x.cache_prefix(b, priority=1)
        x.release()
    else:
        _cached_request(store, b)
    _cached_request(store, c)
    probe_cache = pagedkv.PagedKVCache(store=store)
    for _ in range(2):  # a: used twice more (LFU keeps it), most recently by c below
        probe_cache.attach_prefix(torch.cat([a, a[:, :1]], 1))
        probe_cache.release()
    probe_cache.attach_prefix(torch.cat([c, c[:, :1]], 1))
    probe_cache.release()
    assert store.prefix_stats()["cached_blocks"] == 6
    # A new request needing 2 blocks evicts one 2-block prefix.
    new = pagedkv.PagedKVCache(store=store)
    _fill(new, 32, seed=9)
    s = store.prefix_stats()
    assert s["evictions"] == 2
    salt = store.hash_salt()
    left = {name: len(store.groups[0].index.match(t.numpy()[0].astype(np.int32), salt, 0.0, -1, False))
            for name, t in (("a", a), ("b", b), ("c", c))}
    # lru: b was used least recently (a and c were attached after it); lfu: b has no hits;
    # priority: b has priority 1, and of a and c (priority 0) a was used less recently.
    gone = {"lru": "b", "lfu": "b", "priority": "a"}[policy]
    assert left == {name: (0 if name == gone else 2) for name in "abc"}, left
    store.groups[0].index.check_invariants()


def test_ttl_expiry_with_an_injected_clock():
    now = [1000.0]
    store = _store(ttl_seconds=10, clock=lambda: now[0])
    a, b = torch.arange(32)[None], torch.arange(32)[None] + 500
    _cached_request(store, a)
    now[0] = 1005.0
    _cached_request(store, b)
    now[0] = 1012.0
    assert store.expire() == 2  # a: both blocks idle 12 s
    c = pagedkv.PagedKVCache(store=store)
    assert c.attach_prefix(torch.cat([a, a[:, :1]], 1)) == 0
    assert c.attach_prefix(torch.cat([b, b[:, :1]], 1)) == 32  # b refreshed at 1012
    now[0] = 1100.0
    assert store.expire() == 0  # referenced by c: never expires
    c.release()
    assert store.expire() == 2
    assert store.prefix_stats()["expired"] == 4


def test_budget_exhaustion_changes_nothing_and_referenced_blocks_are_never_evicted():
    probe = _store()
    per_block = probe.groups[0].pool.bytes_per_block
    store = _store(max_memory_bytes=4 * per_block, blocks_per_chunk=2)
    ids = torch.arange(32)[None]
    holder = pagedkv.PagedKVCache(store=store)
    _fill(holder, 32)
    holder.cache_prefix(ids)  # 2 blocks referenced by holder
    other = pagedkv.PagedKVCache(store=store)
    _fill(other, 32, seed=1)  # the other 2 blocks
    before = (other.get_seq_length(), store.prefix_stats()["cached_blocks"], store.groups[0].pool.num_used)
    k = torch.randn(1, 2, 16, 16)
    with pytest.raises(pagedkv.BudgetExhaustedError, match="evictable"):
        other.update(k, k, 0)
    assert (other.get_seq_length(), store.prefix_stats()["cached_blocks"], store.groups[0].pool.num_used) == before
    assert other.layers[0].num_tokens == 32
    # Once holder lets go, its cached blocks are evictable and the same update succeeds.
    holder.release()
    other.update(k, k, 0)
    other.update(k, k, 1)
    assert other.get_seq_length() == 48
    assert store.prefix_stats()["evictions"] == 1


def test_attach_needs_an_empty_cache_and_prefix_caching():
    store = _store()
    c = pagedkv.PagedKVCache(store=store)
    _fill(c, 16)
    with pytest.raises(RuntimeError, match="empty cache"):
        c.attach_prefix(torch.arange(40)[None])
    plain = pagedkv.PagedKVCache(None, num_layers=1, num_kv_heads=1, head_dim=16)
    with pytest.raises(RuntimeError, match="prefix_caching=True"):
        plain.attach_prefix(torch.arange(40)[None])
    with pytest.raises(ValueError, match="storage options"):
        pagedkv.PagedKVCache(store=store, block_size=32)
    with pytest.raises(ValueError, match="eviction"):
        _store(eviction="fifo")
    with pytest.raises(ValueError, match="ttl_seconds"):
        _store(ttl_seconds=-1)
    with pytest.raises(TypeError, match="integer"):
        c.cache_prefix(torch.zeros(1, 16))
    with pytest.raises(NotImplementedError, match="sliding"):
        pagedkv.KVStore(tiny_model("gemma3").config, prefix_caching=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_with_a_prefix_hit_equals_generate_without(arch):
    model = tiny_model(arch, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    system = torch.randint(0, 256, (1, 70), generator=g)
    store = pagedkv.KVStore(model.config, "bf16", prefix_caching=True, block_size=16)
    outs, stats = [], []
    for i in range(3):
        ids = torch.cat([system, torch.randint(0, 256, (1, 9), generator=g)], 1)
        st: dict = {}
        outs.append(pagedkv.generate(model, ids, store, max_new_tokens=12, stats=st))
        stats.append(st)
        fresh = pagedkv.generate(model, ids, pagedkv.PagedKVCache(model.config, "bf16"), max_new_tokens=12)
        assert torch.equal(outs[-1], fresh)
    assert stats[0]["reused_tokens"] == 0
    assert stats[1]["reused_tokens"] == stats[2]["reused_tokens"] == 64  # 4 whole blocks of the 70 shared
    assert store.prefix_stats()["hit_blocks"] == 8


def test_cache_reused_across_hf_generate_calls(stories):
    model, tok = stories
    pagedkv.enable_prefix_reuse(model)
    try:
        _hf_reuse(model, tok)
    finally:
        del model.generate  # the class's generate again


def _hf_reuse(model, tok):
    turn1 = tok("Once upon a time there was a little dog named Max. Max liked to run.", return_tensors="pt").input_ids
    cache = pagedkv.PagedKVCache(model.config, "bf16", prefix_caching=True)
    out1 = model.generate(turn1, past_key_values=cache, max_new_tokens=16, do_sample=False)
    assert torch.equal(cache.token_ids, out1[:, :cache.get_seq_length()])
    turn2 = torch.cat([out1, tok(" One day Max saw a cat.", return_tensors="pt").input_ids[:, 1:]], 1)
    n_before = cache.store.prefix_stats()["requests"]
    out2 = model.generate(turn2, past_key_values=cache, max_new_tokens=16, do_sample=False)
    ref = model.generate(turn2, max_new_tokens=16, do_sample=False)
    assert torch.equal(out2, ref)
    s = cache.store.prefix_stats()
    assert s["requests"] == n_before + 1 and s["hit_blocks"] >= out1.shape[1] // cache.block_size - 1


def test_reuse_without_prefix_caching_keeps_the_common_prefix(stories):
    model, tok = stories
    ids = tok("The sun was warm and the birds sang in the tall green trees.", return_tensors="pt").input_ids
    cache = pagedkv.PagedKVCache(model.config, "bf16")
    out1 = pagedkv.generate(model, ids, cache, max_new_tokens=8)
    st: dict = {}
    follow = torch.cat([out1, ids[:, 1:6]], 1)
    out2 = pagedkv.generate(model, follow, cache, max_new_tokens=8, stats=st)
    assert st["reused_tokens"] == out1.shape[1] - 1
    ref = pagedkv.generate(model, follow, pagedkv.PagedKVCache(model.config, "bf16"), max_new_tokens=8)
    assert torch.equal(out2, ref)
    # A prompt that diverges early: the cache keeps only the common part.
    st = {}
    other = ids.clone()
    other[0, 4] = (other[0, 4] + 1) % model.config.vocab_size
    pagedkv.generate(model, other, cache, max_new_tokens=4, stats=st)
    assert st["reused_tokens"] == 4
