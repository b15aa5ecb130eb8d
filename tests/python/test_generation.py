"""pagedkv.generate / prefill: chunked prefill, cancellation and rollback, sampling, streaming."""

from __future__ import annotations

import threading

import pytest
import torch

import pagedkv
from models import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", dtype=torch.float32)


def _prompt(n, batch=1, seed=0):
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])
def test_chunked_prefill_matches_one_shot(llama, fmt):
    ids = _prompt(300, batch=2)
    one = pagedkv.PagedKVCache(llama.config, fmt)
    full = pagedkv.prefill(llama, ids, one, chunk_size=10_000)
    chunked = pagedkv.PagedKVCache(llama.config, fmt)
    part = pagedkv.prefill(llama, ids, chunked, chunk_size=64)
    assert chunked.get_seq_length() == 300
    torch.testing.assert_close(part, full, rtol=1e-4, atol=2e-4 if fmt == "fp32" else 5e-2)
    with torch.no_grad():
        ref = llama(ids).logits[:, -1]
    if fmt == "fp32":
        torch.testing.assert_close(part, ref, rtol=1e-4, atol=2e-4)


def test_auto_chunk_size_is_bounded_and_used(llama):
    cache = pagedkv.PagedKVCache(llama.config, "fp32")
    n = pagedkv.auto_chunk_size(llama, cache, 100_000, torch.device("cpu"), torch.float32)
    assert 128 <= n <= 16384 and n % 128 == 0
    ids = _prompt(200)
    logits = pagedkv.prefill(llama, ids, cache, chunk_size="auto")
    with torch.no_grad():
        torch.testing.assert_close(logits, llama(ids).logits[:, -1], rtol=1e-4, atol=2e-4)


def test_cancel_between_chunks_keeps_whole_chunks(llama):
    ids = _prompt(200)
    seen = []
    cache = pagedkv.PagedKVCache(llama.config, "fp32")
    with pytest.raises(pagedkv.PrefillCancelled) as info:
        pagedkv.prefill(llama, ids, cache, chunk_size=64, callback=lambda done, total: seen.append(done) or done < 128)
    assert info.value.positions == 128 and seen == [64, 128]
    assert cache.get_seq_length() == 128
    # The kept prefix is consistent: resuming gives the uninterrupted result.
    resumed = pagedkv.prefill(llama, ids, cache, chunk_size=64)
    ref = pagedkv.prefill(llama, ids, pagedkv.PagedKVCache(llama.config, "fp32"), chunk_size=64)
    torch.testing.assert_close(resumed, ref, rtol=0, atol=0)
    stop = threading.Event()
    stop.set()
    other = pagedkv.PagedKVCache(llama.config, "fp32")
    with pytest.raises(pagedkv.PrefillCancelled):
        pagedkv.prefill(llama, ids, other, chunk_size=150, cancel=stop)
    assert other.get_seq_length() == 150


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_failure_inside_a_chunk_rolls_that_chunk_back(llama, fmt):
    ids = _prompt(200, batch=2)
    cache = pagedkv.PagedKVCache(llama.config, fmt)
    calls = {"n": 0}

    def explode(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # third chunk, after layers 0-1 stored it
            raise KeyboardInterrupt

    handle = llama.model.layers[2].register_forward_pre_hook(explode, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            pagedkv.prefill(llama, ids, cache, chunk_size=64)
    finally:
        handle.remove()
    assert [layer.num_tokens for layer in cache.layers] == [128] * 4
    resumed = pagedkv.prefill(llama, ids, cache, chunk_size=64)
    ref = pagedkv.prefill(llama, ids, pagedkv.PagedKVCache(llama.config, fmt), chunk_size=64)
    torch.testing.assert_close(resumed, ref, rtol=0, atol=0)
    for g in cache._groups:
        g.pool.check_invariants()


def test_budget_exhaustion_mid_prefill_rolls_back(llama):
    ids = _prompt(256)
    probe = pagedkv.PagedKVCache(llama.config, "fp32", block_size=16)
    pagedkv.prefill(llama, ids[:, :16], probe)
    per_block = probe._groups[0].pool.bytes_per_block
    cache = pagedkv.PagedKVCache(llama.config, "fp32", max_memory_bytes=10 * per_block, blocks_per_chunk=1,
                                 block_size=16)
    with pytest.raises(pagedkv.BudgetExhaustedError):
        pagedkv.prefill(llama, ids, cache, chunk_size=64)
    assert cache.get_seq_length() == 128  # chunks 0-1 fit (8 blocks of 16); chunk 2 was rolled back
    assert cache._groups[0].pool.num_used == 8


def test_sampling_strategies(llama):
    ids = _prompt(20, batch=3)
    greedy = pagedkv.generate(llama, ids, max_new_tokens=10)
    hf = llama.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(greedy, hf)
    topk1 = pagedkv.generate(llama, ids, max_new_tokens=10, do_sample=True, top_k=1, temperature=0.7, seed=1)
    assert torch.equal(topk1, greedy)
    tiny_p = pagedkv.generate(llama, ids, max_new_tokens=10, do_sample=True, top_p=1e-6, seed=1)
    assert torch.equal(tiny_p, greedy)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=50, top_p=0.9)
    a = pagedkv.generate(llama, ids, seed=123, **kw)
    b = pagedkv.generate(llama, ids, seed=123, **kw)
    c = pagedkv.generate(llama, ids, seed=124, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    k2 = pagedkv.sample_next(logits, do_sample=True, top_k=2, generator=g)
    assert set(k2.tolist()) == {3, 4}
    # top_p=0.7: probabilities (softmax) 0.636, 0.234, ... -> tokens 4 and 3 (0.636 < 0.7 <= 0.87)
    p = pagedkv.sample_next(logits, do_sample=True, top_p=0.7, generator=g)
    assert set(p.tolist()) == {3, 4}
    both = pagedkv.sample_next(logits, do_sample=True, top_k=3, top_p=0.5, generator=g)
    assert set(both.tolist()) == {4}
    cold = pagedkv.sample_next(logits, do_sample=True, temperature=1e-3, generator=g)
    assert set(cold.tolist()) == {4}
    hot = pagedkv.sample_next(logits, do_sample=True, temperature=100.0, generator=g)
    assert set(hot.tolist()) == {0, 1, 2, 3, 4}
    for bad, match in ((dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"),
                       (dict(top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=match):
            pagedkv.sample_next(logits, do_sample=True, **bad)
    with pytest.raises(ValueError, match="NaN"):
        pagedkv.sample_next(torch.full((1, 4), float("nan")))


def test_generate_streams_stops_at_eos_and_pads(stories):
    model, tok = stories
    rows = [tok(t).input_ids for t in ("Once upon a time there was", "The cat sat")]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    streamer = pagedkv.CachedTextStreamer(tok, skip_prompt=True)
    chunks = []
    streamer.on_finalized_text = lambda text, stream_end=False: chunks.append(text)
    out = pagedkv.generate(model, ids[:1], max_new_tokens=30, streamer=streamer)
    assert "".join(chunks) == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    eos = int(out[0, ids.shape[1] + 3])
    short = pagedkv.generate(model, ids[:1], max_new_tokens=30, eos_token_id=eos)
    assert short.shape[1] == ids.shape[1] + 4 and int(short[0, -1]) == eos
    batch = pagedkv.generate(model, ids, attention_mask=mask, max_new_tokens=12)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(batch, ref)


def test_generate_rejects_bad_arguments(llama):
    ids = _prompt(8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pagedkv.generate(llama, ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="input_ids"):
        pagedkv.generate(llama, ids.float())
    with pytest.raises(ValueError, match="empty"):
        pagedkv.generate(llama, ids[:, :0])
    with pytest.raises(TypeError, match="cache"):
        pagedkv.generate(llama, ids, cache="dynamic")
    with pytest.raises(ValueError, match="chunk_size"):
        pagedkv.prefill(llama, ids, pagedkv.PagedKVCache(llama.config), chunk_size=0)
    with pytest.raises(ValueError, match="start"):
        pagedkv.prefill(llama, ids, pagedkv.PagedKVCache(llama.config), start=8)
