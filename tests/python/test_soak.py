"""Soak: 10k sequences created and freed on one store, and 1M tokens streamed through the sinks policy.

Pool memory must return to its baseline (no block held after release) and the process RSS must stay
flat (no leak per sequence or per token). The figures are printed (``pytest -s``) and recorded in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import gc
import os
import random

import torch

import pagedkv
from models import tiny_config

SEQUENCES = int(os.environ.get("PAGEDKV_SOAK_SEQS", 10_000))
STREAM = int(os.environ.get("PAGEDKV_SOAK_TOKENS", 1_000_000))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_create_and_free_10k_sequences():
    rng = random.Random(0)
    store = pagedkv.KVStore(None, "int4", num_layers=2, num_kv_heads=2, head_dim=32, block_size=16,
                            residual_length=16, prefix_caching=True, max_memory_bytes=4 << 20)
    k = torch.randn(4, 2, 400, 32)
    system = torch.randint(0, 50, (1, 48))
    baseline = None
    rss = []
    for i in range(SEQUENCES):
        batch, n = rng.randint(1, 4), rng.randint(1, 400)
        cache = pagedkv.PagedKVCache(store=store)
        if i % 3 == 0:  # a third of the requests share a cached system prompt
            ids = torch.cat([system.expand(batch, -1), torch.randint(0, 50, (batch, n))], 1)
            got = cache.attach_prefix(ids)
            rest = ids.shape[1] - got
        else:
            ids, rest = None, n
        for layer in range(2):
            cache.update(k[:batch, :, :rest], k[:batch, :, :rest], layer)
        if ids is not None and i % 6 == 0:
            cache.cache_prefix(ids[:, :48], flush=True)
        cache.release()
        if i == 999:
            gc.collect()
            baseline = rss_mib()
        if i % 1000 == 999:
            rss.append(rss_mib())
    gc.collect()
    used_by_seqs = store.memory_bytes()["used_bytes"] - store.prefix_stats()["cached_bytes"]
    for g in store.groups:
        g.pool.check_invariants()
        g.index.check_invariants()
        assert g.tables.num_sequences == 0
    assert used_by_seqs == 0, "blocks still held after every sequence was released"
    assert store.num_caches == 0
    store.clear_prefixes()
    assert store.memory_bytes()["used_bytes"] == 0
    growth = rss[-1] - baseline
    print(f"\nsoak: {SEQUENCES} sequences, RSS after 1k {baseline:.1f} MiB, after {SEQUENCES} {rss[-1]:.1f} MiB "
          f"(+{growth:.1f}); page bytes reserved {store.memory_bytes()['reserved_bytes']}; "
          f"prefix {store.prefix_stats()}")
    assert growth < 8, f"RSS grew {growth:.1f} MiB over {SEQUENCES - 1000} sequences: {rss}"


def test_stream_1m_tokens_through_sinks():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = tiny_config("llama")
    rotary = LlamaRotaryEmbedding(cfg)
    cache = pagedkv.PagedKVCache(cfg, "int4", recent_window=252, sink_tokens=4, rotary=rotary, block_size=16,
                                 residual_length=16)
    h, d = cfg.num_key_value_heads, cfg.head_dim
    chunk = 250
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, h, chunk, d, generator=g)
    rss, held = [], []
    baseline = None
    for step in range(STREAM // chunk):
        for layer in range(cfg.num_hidden_layers):
            out_k, _ = cache.update(k, k, layer)
            assert out_k.shape[2] <= 4 + 252 + chunk
        if step == STREAM // chunk // 10:
            gc.collect()
            baseline = rss_mib()
        if step % (STREAM // chunk // 10) == 0:
            rss.append(rss_mib())
            held.append(cache._groups[0].pool.num_used)
    assert cache.get_seq_length() == STREAM // chunk * chunk
    gc.collect()
    growth = rss_mib() - baseline
    stats = cache.memory_stats()
    print(f"\nsinks stream: {cache.get_seq_length():,} tokens, blocks held over time {held}, "
          f"bytes held {stats['bytes_used']:,}, RSS after 10% {baseline:.1f} MiB, at end {rss_mib():.1f} MiB "
          f"(+{growth:.1f})")
    assert max(held) == min(held[1:]), f"blocks held changed while streaming: {held}"
    assert growth < 8, f"RSS grew {growth:.1f} MiB while streaming: {rss}"
    cache.release()
    assert cache._groups[0].pool.num_used == 0
