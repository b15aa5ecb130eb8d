"""End-to-end cache fuzz: random update / crop / reorder / select / repeat sequences on PagedKVCache
(bf16 storage, bf16 states) against DynamicCache under the same operations; the dense K/V must match
exactly after every step."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

import pagedkv

LAYERS, HEADS, DIM = 3, 2, 16
STEPS = 300


def _check(out_p, out_d, step, op):
    for a, b, name in ((out_p[0], out_d[0], "keys"), (out_p[1], out_d[1], "values")):
        assert a.shape == b.shape, f"step {step} ({op}): {name} shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.equal(a, b), f"step {step} ({op}): {name} differ"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_size", [16, 32])
def test_random_operations_match_dynamic_cache(seed, block_size):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    paged = pagedkv.PagedKVCache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, kv_format="bf16",
                                 block_size=block_size)
    dyn = DynamicCache()
    batch = rng.randint(1, 4)
    ops = 0
    for step in range(STEPS):
        length = paged.get_seq_length()
        op = rng.choices(["update", "crop", "reorder", "select", "repeat"], weights=[8, 2, 2, 1, 1])[0]
        if op == "update" or length == 0:
            n = rng.choice([1, 1, 1, 2, 5, 17, 33])
            for layer in range(LAYERS):
                k = torch.randn(batch, HEADS, n, DIM, generator=gen).to(torch.bfloat16)
                v = torch.randn(batch, HEADS, n, DIM, generator=gen).to(torch.bfloat16)
                _check(paged.update(k, v, layer), dyn.update(k, v, layer), step, f"update {n}")
            op = "update"
        elif op == "crop":
            n = rng.randint(1, length)
            paged.crop(-n)
            dyn.crop(-n)
        elif op == "reorder":
            idx = torch.tensor([rng.randrange(batch) for _ in range(batch)])
            paged.reorder_cache(idx)
            dyn.reorder_cache(idx)
        elif op == "select":
            keep = sorted(rng.sample(range(batch), rng.randint(1, batch)))
            idx = torch.tensor(keep)
            paged.batch_select_indices(idx)
            dyn.batch_select_indices(idx)
            batch = len(keep)
        elif op == "repeat" and batch <= 3:
            paged.batch_repeat_interleave(2)
            dyn.batch_repeat_interleave(2)
            batch *= 2
        ops += 1
        assert paged.get_seq_length() == dyn.get_seq_length(), f"step {step} ({op})"
        _check_accounting(paged, step, op)
    assert ops == STEPS


def _check_accounting(cache: pagedkv.PagedKVCache, step: int, op: str) -> None:
    """Reference counts equal the uses in the block tables; no leaked or doubly-owned block."""
    from collections import Counter

    for g in cache._groups:
        g.pool.check_invariants()
        uses = Counter(b for s in g.seqs for b in g.tables.blocks(s))
        assert g.pool.num_used == len(uses), f"step {step} ({op}): {g.pool.num_used} used, {len(uses)} referenced"
        for b, n in uses.items():
            assert g.pool.refcount(b) == n, f"step {step} ({op}): block {b} refcount {g.pool.refcount(b)} != {n}"
