"""PagedKVCache as a drop-in DynamicCache inside transformers' generate and hand-written loops."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import pagedkv
from models import tiny_model

GEN = dict(do_sample=False, pad_token_id=0)
EXACT = [(torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")]


def _gen(model, ids, cache, n=48, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, past_key_values=cache, **GEN, **kw)


@pytest.mark.parametrize("dtype,fmt", EXACT, ids=[f for _, f in EXACT])
def test_stories_greedy_identical(stories, dtype, fmt):
    model, tok = stories
    model = model.to(dtype)
    try:
        ids = tok(["Once upon a time"], return_tensors="pt").input_ids
        ref = _gen(model, ids, DynamicCache(), n=120)
        out = _gen(model, ids, pagedkv.PagedKVCache(model.config, kv_format=fmt), n=120)
        assert torch.equal(out, ref)
    finally:
        model.to(torch.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_random_configs_greedy(arch, fmt):
    model = tiny_model(arch)
    ids = torch.randint(3, 256, (2, 37))
    ref = _gen(model, ids, DynamicCache(config=model.config), n=60)
    cache = pagedkv.PagedKVCache(model.config, kv_format=fmt, residual_length=16 if fmt == "int4" else None,
                                 key_group_size=16 if fmt == "int4" else None, block_size=16)
    out = _gen(model, ids, cache, n=60)
    if fmt == "bf16":
        assert torch.equal(out, ref)
    else:
        agree = (out[:, 37:] == ref[:, 37:]).float().mean().item()
        print(f"{arch} int4 agreement {agree:.3f}")
        assert out.shape == ref.shape
        # The run really quantized: every group holds int4 pages, and the output differs from a
        # degenerate stream (random-init logits make token agreement itself meaningless here).
        assert all(g.num_paged > 0 for g in cache._groups)
        assert cache.memory_stats()["paged_bytes"] > 0
        assert out[:, 37:].unique().numel() > 1


def test_gemma3_sliding_layers_keep_only_their_window():
    model = tiny_model("gemma3")
    cache = pagedkv.PagedKVCache(model.config, kv_format="bf16", block_size=16)
    ids = torch.randint(3, 256, (1, 10))
    _gen(model, ids, cache, n=150, min_new_tokens=150)  # random weights: an early EOS must not end the run
    sliding = [g for g in cache._groups if g.sliding_window is not None][0]
    full = [g for g in cache._groups if g.sliding_window is None][0]
    assert cache.get_seq_length() == 159
    # window 24: at most (23 + 1 new) positions, i.e. 2-3 blocks of 16, per sequence
    assert sliding.pool.num_used <= 3
    assert full.pool.num_used == -(-159 // 16)
    assert cache.layers[0].get_mask_sizes(1) == (24, 159 - 23)


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_gemma3_long_prompt_never_stores_what_left_the_window(fmt):
    # A 300-token prompt over a window of 24: the sliding layers page only the positions a later query
    # sees, so their pool never grows past the window's blocks (one block per chunk: the pool's
    # capacity is its high-water mark); the full layer holds everything. Same tokens as DynamicCache.
    model = tiny_model("gemma3")
    ids = torch.randint(3, 256, (2, 300), generator=torch.Generator().manual_seed(0))
    ref = _gen(model, ids, DynamicCache(config=model.config), n=40, min_new_tokens=40)
    opts = dict(residual_length=16, key_group_size=16) if fmt == "int4" else {}
    cache = pagedkv.PagedKVCache(model.config, kv_format=fmt, block_size=16, blocks_per_chunk=1, **opts)
    out = _gen(model, ids, cache, n=40, min_new_tokens=40)
    if fmt == "bf16":
        assert torch.equal(out, ref)
    sliding = [g for g in cache._groups if g.sliding_window is not None][0]
    full = [g for g in cache._groups if g.sliding_window is None][0]
    assert sliding.pool.capacity <= 2 * 3  # two sequences, (23 + 16) positions -> at most 3 blocks each
    assert full.pool.capacity >= 2 * (300 // 16)
    assert cache.layers[0].num_paged == cache.layers[2].num_paged  # the layers agree on what is paged


def test_batched_left_padding(stories):
    model, tok = stories
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.unk_token
    prompts = ["Once upon a time", "The little dog ran to the park and", "Lily"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    ref = _gen(model, enc.input_ids, DynamicCache(), attention_mask=enc.attention_mask, n=40)
    out = _gen(model, enc.input_ids, pagedkv.PagedKVCache(model.config, kv_format="fp32"),
               attention_mask=enc.attention_mask, n=40)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_beam_search(stories, fmt):
    model, tok = stories
    ids = tok(["Once upon a time"], return_tensors="pt").input_ids
    ref = _gen(model, ids, DynamicCache(), n=40, num_beams=3)
    cache = pagedkv.PagedKVCache(model.config, kv_format=fmt)
    out = _gen(model, ids, cache, n=40, num_beams=3)
    if fmt == "fp32":
        assert torch.equal(out, ref)
    else:
        assert out.shape[0] == 1
    # Beams share their common prefix blocks instead of copying them.
    g = cache._groups[0]
    shared = sum(1 for b in set(sum((list(g.tables.blocks(s)) for s in g.seqs), [])) if g.pool.refcount(b) > 1)
    assert shared > 0


def test_resume_generation_from_returned_cache(stories):
    model, tok = stories
    ids = tok(["Once upon a time"], return_tensors="pt").input_ids
    ref_cache = DynamicCache()
    ref1 = model.generate(ids, max_new_tokens=30, past_key_values=ref_cache, return_dict_in_generate=True, **GEN)
    ref2 = model.generate(ref1.sequences, max_new_tokens=30, past_key_values=ref1.past_key_values, **GEN)
    cache = pagedkv.PagedKVCache(model.config, kv_format="fp32")
    out1 = model.generate(ids, max_new_tokens=30, past_key_values=cache, return_dict_in_generate=True, **GEN)
    assert out1.past_key_values is cache
    out2 = model.generate(out1.sequences, max_new_tokens=30, past_key_values=out1.past_key_values, **GEN)
    assert torch.equal(out2, ref2)


def test_assisted_decoding_uses_crop(stories):
    model, tok = stories
    ids = tok(["Once upon a time there was a girl. Once upon a time there was a"], return_tensors="pt").input_ids
    ref = _gen(model, ids, DynamicCache(), n=40, prompt_lookup_num_tokens=4)
    out = _gen(model, ids, pagedkv.PagedKVCache(model.config, kv_format="fp32"), n=40, prompt_lookup_num_tokens=4)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_hand_written_loop_matches_dynamic(stories, fmt):
    model, tok = stories
    ids = tok(["Once upon a time"], return_tensors="pt").input_ids

    def run(cache):
        out, cur = [], ids
        with torch.no_grad():
            for _ in range(150):
                logits = model(cur, past_key_values=cache, use_cache=True).logits
                cur = logits[:, -1:].argmax(-1)
                out.append(cur)
        return torch.cat(out, 1)

    ref = run(DynamicCache())
    cache = pagedkv.PagedKVCache(model.config, kv_format=fmt, residual_length=32, key_group_size=16, block_size=16)
    got = run(cache)
    if fmt == "fp32":
        assert torch.equal(got, ref)
    assert cache.get_seq_length() == ids.shape[1] + 149
    if fmt == "int4":
        layer = cache.layers[0]
        assert layer.num_paged > 0 and layer.num_paged % 16 == 0
        assert 32 <= layer.num_tokens - layer.num_paged < 48  # the residual window


def _dense_pair(cache, layer=0):
    k = torch.zeros(cache.batch_size, cache.num_kv_heads, 0, cache.head_dim)
    return cache.update(k, k.clone(), layer)


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_cache_ops_match_dynamic_cache(fmt):
    """update / reorder / repeat / select / crop on the dense K/V against DynamicCache (fp32 exact)."""
    torch.manual_seed(0)
    kw = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16)
    cache = pagedkv.PagedKVCache(None, kv_format=fmt, residual_length=16, key_group_size=16, **kw)
    ref = DynamicCache()

    def step(n):
        k, v = torch.randn(4 if cache.batch_size < 0 else cache.batch_size, 2, n, 16), None
        v = torch.randn_like(k)
        for layer in range(2):
            a = cache.update(k, v, layer)
            b = ref.update(k, v, layer)
            if fmt == "fp32":
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            else:
                assert a[0].shape == b[0].shape
                # Tokens still in the full-precision residual window come back exact.
                assert torch.equal(a[0][:, :, -n:], b[0][:, :, -n:])
                err = (a[0] - b[0]).norm() / b[0].norm()
                assert err < 0.15, float(err)

    step(37)
    step(1)
    cache.reorder_cache(torch.tensor([3, 3, 0, 1]))
    ref.reorder_cache(torch.tensor([3, 3, 0, 1]))
    step(20)
    cache.batch_repeat_interleave(2)
    ref.batch_repeat_interleave(2)
    step(5)
    cache.batch_select_indices(torch.tensor([0, 5, 7]))
    ref.batch_select_indices(torch.tensor([0, 5, 7]))
    step(3)
    cache.crop(-10)
    ref.crop(-10)
    assert cache.get_seq_length() == ref.get_seq_length() == 56
    step(2)
    cache.crop(-30)
    ref.crop(-30)
    step(1)
    for g in cache._groups:
        g.pool.check_invariants()
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_stats()["reserved_bytes"] == 0


def test_memory_grows_with_tokens_not_a_maximum():
    cache = pagedkv.PagedKVCache(None, kv_format="int4", num_layers=2, num_kv_heads=2, head_dim=64, blocks_per_chunk=1)
    k = torch.randn(1, 2, 200, 64, dtype=torch.bfloat16)
    cache.update(k, k, 0)
    cache.update(k, k, 1)
    s1 = cache.memory_stats()
    k = torch.randn(1, 2, 1800, 64, dtype=torch.bfloat16)
    cache.update(k, k, 0)
    cache.update(k, k, 1)
    s2 = cache.memory_stats()
    assert s1["reserved_bytes"] < s2["reserved_bytes"]
    assert s2["paged_bytes"] == cache._groups[0].pool.reserved_bytes
    # int4 pages are 0.28x bf16; the bf16 residual window (128..191 tokens) adds the rest.
    assert 0.25 < s2["ratio_vs_bf16"] < 0.40
    assert s2["tokens"] == 2000


def test_formats_agreement_stories(stories):
    """Print the greedy agreement of every format against DynamicCache (stories260K, fp32)."""
    model, tok = stories
    ids = tok(["Once upon a time", "Tom had a red ball"], return_tensors="pt", padding=True).input_ids
    ref = _gen(model, ids, DynamicCache(), n=128)
    n0 = ids.shape[1]
    for fmt in ["fp32", "bf16", "fp16", "fp8_e4m3", "int8", "nf4", "int4", "int2"]:
        out = _gen(model, ids, pagedkv.PagedKVCache(model.config, kv_format=fmt), n=128)
        agree = (out[:, n0:] == ref[:, n0:]).float().mean().item()
        print(f"stories260K {fmt}: {agree * 100:.1f}% identical greedy tokens")
        if fmt == "fp32":
            assert agree == 1.0
        assert out.shape == ref.shape


def test_cache_kwargs_follow_the_installed_transformers():
    """pagedkv's own model calls pass the cache under the name this transformers release's forward
    takes (5.24: `cache`, the old name warning; 5.17: only `past_key_values`), without a warning."""
    import inspect
    import warnings

    from pagedkv.hf_compat import cache_kwargs

    model = tiny_model("llama", dtype=torch.float32)
    cache = pagedkv.PagedKVCache(model.config, "int4")
    kw = cache_kwargs(model, cache)
    params = inspect.signature(type(model).forward).parameters
    assert list(kw) == ["cache" if "cache" in params else "past_key_values"] and kw[next(iter(kw))] is cache
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(torch.randint(3, 256, (1, 9)), use_cache=True, **kw)
    assert cache.get_seq_length() == 9
