"""Bad input to PagedKVCache: a clear exception naming the argument and value, and no state change."""

from __future__ import annotations

import pytest
import torch

import pagedkv

KW = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16)


def _cache(**extra):
    c = pagedkv.PagedKVCache(None, kv_format="int8", **{**KW, **extra})
    kv = torch.randn(3, 2, 20, 16)
    c.update(kv, kv, 0)
    c.update(kv, kv, 1)
    return c


def _snapshot(c):
    dense = []
    for layer in range(2):
        g = c._group_of[layer]
        dense.append(g.read(layer, 0, c.layers[layer].num_paged, torch.float32, torch.device("cpu")))
    return (c.get_seq_length(), c.batch_size, [l.num_paged for l in c.layers], c.memory_stats()["paged_bytes"], dense)


def _same(a, b):
    assert a[:4] == b[:4]
    for (k1, v1), (k2, v2) in zip(a[4], b[4]):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def good(shape=(3, 2, 1, 16), dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


UPDATE_CASES = [
    ("int dtype", lambda c: c.update(torch.ones(3, 2, 1, 16, dtype=torch.int64), good(), 0), TypeError, "key_states must be float32"),
    ("fp64", lambda c: c.update(good(dtype=torch.float64), good(), 0), TypeError, "torch.float64"),
    ("not a tensor", lambda c: c.update([1.0], good(), 0), TypeError, "key_states must be a torch.Tensor"),
    ("rank 3", lambda c: c.update(torch.randn(3, 2, 16), good(), 0), ValueError, r"got shape \(3, 2, 16\)"),
    ("kv heads", lambda c: c.update(good((3, 4, 1, 16)), good((3, 4, 1, 16)), 0), ValueError, "num_key_value_heads=2"),
    ("head_dim", lambda c: c.update(good((3, 2, 1, 32)), good((3, 2, 1, 32)), 0), ValueError, "head_dim=16"),
    ("value shape", lambda c: c.update(good(), good((3, 2, 2, 16)), 0), ValueError, "value_states shape"),
    ("batch", lambda c: c.update(good((2, 2, 1, 16)), good((2, 2, 1, 16)), 0), ValueError, "batch size 2"),
    ("dtype change", lambda c: c.update(good(dtype=torch.bfloat16), good(dtype=torch.bfloat16), 0), TypeError, "filled with torch.float32"),
    ("layer high", lambda c: c.update(good(), good(), 2), IndexError, "layer_idx=2 is out of range"),
    ("layer negative", lambda c: c.update(good(), good(), -1), IndexError, "layer_idx=-1"),
    ("layer type", lambda c: c.update(good(), good(), "0"), TypeError, "layer_idx must be an int"),
    ("nan key", lambda c: c.update(good().fill_(float("nan")), good(), 0), ValueError, "key_states contains NaN"),
    ("inf value", lambda c: c.update(good(), good().fill_(float("inf")), 1), ValueError, "value_states contains NaN or Inf"),
    ("crop past start", lambda c: c.crop(-21), ValueError, r"crop\(-21\) goes past the start"),
    ("crop type", lambda c: c.crop(1.5), TypeError, "crop takes an int"),
    ("beam index", lambda c: c.reorder_cache(torch.tensor([0, 1, 3])), IndexError, "batch index 3"),
    ("beam length", lambda c: c.reorder_cache(torch.tensor([0, 1])), ValueError, "beam_idx has 2 entries"),
    ("repeats", lambda c: c.batch_repeat_interleave(0), ValueError, "repeats must be an int >= 1, got 0"),
    ("select bool", lambda c: c.batch_select_indices(torch.tensor([True, False])), ValueError, "boolean indices"),
    ("select range", lambda c: c.batch_select_indices(torch.tensor([0, 5])), IndexError, "batch index 5"),
    ("beam rank", lambda c: c.reorder_cache(torch.tensor([[0, 1, 2]])), ValueError, "1-D tensor"),
    ("beam list", lambda c: c.reorder_cache([0, 1, 2]), ValueError, "beam_idx must be a 1-D tensor"),
    ("repeats type", lambda c: c.batch_repeat_interleave(2.0), ValueError, "repeats must be an int"),
    ("device", lambda c: c.update(good().to("meta"), good().to("meta"), 0), ValueError, "is on meta but the cache"),
    ("value dtype", lambda c: c.update(good(), good(dtype=torch.bfloat16), 0), ValueError, "must match key_states"),
    ("rank 5", lambda c: c.update(torch.randn(3, 2, 1, 16, 1), good(), 0), ValueError, "got shape"),
    ("layer bool", lambda c: c.update(good(), good(), True), TypeError, "layer_idx must be an int"),
    ("crop float tensor", lambda c: c.crop(torch.tensor(1.5)), TypeError, "crop takes an int"),
    ("seq length layer", lambda c: c.get_seq_length(-1), IndexError, "layer_idx must be an int >= 0"),
    ("budget", lambda c: _exhaust(c), pagedkv.BudgetExhaustedError, "budget"),
    ("value nan", lambda c: c.update(good(), good().index_fill_(3, torch.tensor([3]), float("nan")), 0),
     ValueError, "value_states contains NaN"),
]


def _exhaust(c):
    """Lower the byte budget to what is held, then ask for more blocks than the held chunks have."""
    c._budget.limit_bytes = c._budget.reserved_bytes
    pool = c._groups[0].pool
    n = (pool.capacity - pool.num_used) * 16 // 3 + 32  # 3 sequences of 16-token blocks
    kv = good((3, 2, n, 16))
    c.update(kv, kv, 0)


@pytest.mark.parametrize("name,call,exc,msg", UPDATE_CASES, ids=[c[0] for c in UPDATE_CASES])
def test_bad_input_leaves_cache_unchanged(name, call, exc, msg):
    c = _cache()
    before = _snapshot(c)
    with pytest.raises(exc, match=msg):
        call(c)
    _same(before, _snapshot(c))


CONSTRUCT_CASES = [
    (dict(kv_format="int3"), ValueError, "kv_format='int3' is not a known format"),
    (dict(key_format="q4"), ValueError, "key_format='q4'"),
    (dict(kv_format=4), TypeError, "kv_format must be a format name"),
    (dict(block_size=24), ValueError, "block_size must be a positive multiple of 16, got 24"),
    (dict(residual_length=-1), ValueError, "residual_length must be an int >= 0, got -1"),
    (dict(max_memory_bytes=-5), ValueError, "max_memory_bytes must be an int >= 0"),
    (dict(layer_formats=["int8"]), ValueError, "layer_formats has 1 entries but the model has 2 layers"),
    (dict(layer_formats={5: "int8"}), ValueError, "layer_formats names layer 5"),
    (dict(kv_format="int4", key_group_size=48), ValueError, "key group size"),
    (dict(kv_format="int4", value_group_size=5), ValueError, "value group size"),
]


@pytest.mark.parametrize("kwargs,exc,msg", CONSTRUCT_CASES, ids=[str(c[0]) for c in CONSTRUCT_CASES])
def test_bad_construction(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        pagedkv.PagedKVCache(None, **{**KW, **kwargs})


def test_budget_exhaustion_is_atomic_and_recoverable():
    per_block = pagedkv.PagedKVCache(None, kv_format="int8", **KW)._groups[0].pool.bytes_per_block
    c = _cache(max_memory_bytes=per_block * 6, blocks_per_chunk=1)  # 3 seqs x 2 blocks used
    before = _snapshot(c)
    kv = torch.randn(3, 2, 20, 16)
    with pytest.raises(pagedkv.BudgetExhaustedError, match="budget exhausted") as info:
        c.update(kv, kv, 0)
    assert isinstance(info.value, MemoryError)
    _same(before, _snapshot(c))
    c.crop(-5)  # still usable: shrink, then grow within the budget
    c.update(kv[:, :, :1], kv[:, :, :1], 0)
    assert c.layers[0].num_tokens == 16


def test_sliding_crop_beyond_window_is_refused():
    from models import tiny_config

    c = pagedkv.PagedKVCache(tiny_config("gemma3"), kv_format="bf16", block_size=16)
    kv = torch.randn(1, 2, 100, 16, dtype=torch.bfloat16)
    for layer in range(4):
        c.update(kv, kv, layer)
    kv1 = kv[:, :, :1]
    for layer in range(4):
        c.update(kv1, kv1, layer)
    with pytest.raises(ValueError, match="already dropped"):
        c.crop(-60)
    assert c.get_seq_length() == 101
    c.crop(-2)
    assert c.get_seq_length() == 99


def test_extension_messages_avoid_ostream():
    """Numbers inserted into a std::ostream from the extension crash the GPU image's process
    (benchmarks/RESULTS.md, "Errors on the GPU image"), so csrc builds messages with
    pagedkv::detail::concat / pagedkv::msg, and torch's checks only through PKV_CHECK_*."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "csrc"
    if not root.exists():
        pytest.skip("no source tree")
    bad = []
    for f in sorted(root.rglob("*")):
        if f.suffix not in {".h", ".cpp", ".cu", ".cuh"}:
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if any(k in line for k in ("<sstream>", "<iostream>", "ostringstream", "std::cout", "std::cerr",
                                       "c10::str(")):
                bad.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
            if "TORCH_CHECK" in line and not line.startswith("#define PKV_CHECK_"):
                bad.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
