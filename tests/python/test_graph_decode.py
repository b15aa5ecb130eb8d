"""GraphDecoder: fixed-shape decode steps (CUDA graphs on a GPU) compute what eager decode computes.

On the CPU the fixed-shape steps run eagerly (the same code a graph captures); the CUDA tests capture
and replay them."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

import pagedkv
from models import tiny_config, tiny_model

CUDA = torch.cuda.is_available()


def _model(arch="llama", dtype=torch.float32, device="cpu"):
    model = tiny_model(arch, dtype=dtype).to(device)
    model.set_attn_implementation("pagedkv")
    return model


def _ids(batch, n, seed=0, device="cpu"):
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed)).to(device)


def _decode(model, cache, ids, steps, *, graph, mask=None, cuda_graph=None, force=None):
    """Prefill, then ``steps`` greedy steps (GraphDecoder or eager); returns the stacked logits and the
    tokens fed ``[steps, batch, 1]``. ``force``: feed these tokens instead of the greedy ones (teacher
    forcing: both paths then see the same inputs even where a near-tie would flip a greedy choice)."""
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.inference_mode():  # position ids as generate gives them (a padded row counts from its first token)
        out = model(ids, attention_mask=mask, position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),
                    past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    fed = []
    pos = mask.long().sum(-1, keepdim=True) - 1
    logits = []
    dec = pagedkv.GraphDecoder(model, cache, max_new_tokens=steps, attention_mask=mask,
                               cuda_graph=cuda_graph) if graph else None
    for i in range(steps):
        if force is not None:
            tok = force[i]
        fed.append(tok)
        if dec is not None:
            lg = dec.step(tok).clone()
        else:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos + 1
            with torch.inference_mode():
                lg = model(tok, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
        logits.append(lg.float())
        tok = lg.argmax(-1, keepdim=True)
    if dec is not None:
        dec.close()
    return torch.stack(logits), torch.stack(fed)


def _continue(model, cache, tok, steps=20):
    """Eager greedy steps without a mask (the whole batch is real tokens)."""
    out = []
    for _ in range(steps):
        with torch.inference_mode():
            lg = model(tok, past_key_values=cache, use_cache=True).logits[:, -1]
        out.append(lg.float())
        tok = lg.argmax(-1, keepdim=True)
    return torch.stack(out)


def _state(cache):
    return [(l.num_tokens, l.num_paged, None if l.residual_keys is None else tuple(l.residual_keys.shape))
            for l in cache.layers]


@pytest.mark.parametrize("fmt", ["int4", "int2", "int8", "fp8_e4m3", "bf16", "nf4"])
def test_fixed_shape_steps_equal_eager_and_hand_back(fmt):
    # 150 steps from a 300-token prompt cross several flushes of the residual window (grouped formats)
    # or page every token (others); after close() the cache continues eagerly from the same state.
    model = _model()
    ids = _ids(2, 300)
    caches = [pagedkv.PagedKVCache(model.config, fmt) for _ in range(2)]
    eager, fed = _decode(model, caches[0], ids, 150, graph=False)
    static, _ = _decode(model, caches[1], ids, 150, graph=True, force=fed)
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
    assert _state(caches[1]) == _state(caches[0])
    last = eager[-1].argmax(-1, keepdim=True)
    torch.testing.assert_close(_continue(model, caches[1], last), _continue(model, caches[0], last), rtol=1e-5,
                               atol=1e-5)


def test_left_padding_mask_is_kept():
    model = _model()
    ids = _ids(3, 200, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    mask[2, :5] = 0
    caches = [pagedkv.PagedKVCache(model.config, "int4") for _ in range(2)]
    eager, fed = _decode(model, caches[0], ids, 80, graph=False, mask=mask)
    static, _ = _decode(model, caches[1], ids, 80, graph=True, mask=mask, force=fed)
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt", [3, 200])
def test_generate_cuda_graph_option_matches_eager(prompt):
    # A 3-token prompt starts with eager steps (the exact first position is not paged yet).
    model = _model()
    ids = _ids(2, prompt, seed=2)
    a = pagedkv.generate(model, ids, pagedkv.PagedKVCache(model.config, "int4"), max_new_tokens=230)
    cache = pagedkv.PagedKVCache(model.config, "int4")
    b = pagedkv.generate(model, ids, cache, max_new_tokens=230, cuda_graph=True)
    assert torch.equal(a, b)
    assert cache._static is None and cache.get_seq_length() == prompt + 229


def test_errors_name_the_problem():
    model = _model()
    ids = _ids(1, 200)
    cache = pagedkv.PagedKVCache(model.config, "int4")
    with pytest.raises(ValueError, match="prefilled"):
        pagedkv.GraphDecoder(model, cache, max_new_tokens=4)
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pagedkv.GraphDecoder(model, cache, max_new_tokens=0)
    with pytest.raises(TypeError, match="PagedKVCache"):
        pagedkv.GraphDecoder(model, object(), max_new_tokens=4)
    with pytest.raises(ValueError, match="cuda_graph=True"):  # the cache is on the CPU
        pagedkv.GraphDecoder(model, cache, max_new_tokens=4, cuda_graph=True)
    before = _state(cache)
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(ValueError, match="attn_implementation='pagedkv'"):
            pagedkv.GraphDecoder(model, cache, max_new_tokens=4)
    finally:
        model.set_attn_implementation("pagedkv")
    with pytest.raises(ValueError, match=r"attention_mask must be .* \[1, 200\], got \(1, 199\)"):
        pagedkv.GraphDecoder(model, cache, max_new_tokens=2, attention_mask=torch.ones(1, 199, dtype=torch.long))
    with pagedkv.GraphDecoder(model, cache, max_new_tokens=2) as dec:
        with pytest.raises(RuntimeError, match="already in a GraphDecoder"):
            pagedkv.GraphDecoder(model, cache, max_new_tokens=2)
        with pytest.raises(RuntimeError, match="crop is not available"):
            cache.crop(-1)
        with pytest.raises(ValueError, match=r"\[batch=1, 1\]"):
            dec.step(torch.zeros(2, 1, dtype=torch.long))
        with pytest.raises(ValueError, match="integer ids"):
            dec.step(torch.zeros(1, 1))
        dec.step(torch.zeros(1, 1, dtype=torch.long))
        dec.step(torch.zeros(1, 1, dtype=torch.long))
        with pytest.raises(RuntimeError, match="max_new_tokens=2"):
            dec.step(torch.zeros(1, 1, dtype=torch.long))
    assert cache._static is None and cache.get_seq_length() == before[0][0] + 2
    with pytest.raises(RuntimeError, match="closed"):
        dec.step(torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize("arch,new", [("llama", 10_000), ("gemma3", 260)])
def test_budget_exhausted_at_start_leaves_cache_unchanged(arch, new):
    # gemma3, two block groups of at most 4 blocks: 260 steps reserve up to position 320, which the
    # sliding group (holding from 64) fits and the full one (from 0) does not, so the sliding group's
    # reservation is given back.
    model = _model(arch)
    ids = _ids(1, 200)
    cache = pagedkv.PagedKVCache(model.config, "int4", max_blocks=4)
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True)
    before = _state(cache)
    used = cache.memory_stats()["bytes_used"]
    with pytest.raises(pagedkv.BudgetExhaustedError):
        pagedkv.GraphDecoder(model, cache, max_new_tokens=new)
    assert _state(cache) == before and cache.memory_stats()["bytes_used"] == used and cache._static is None
    assert torch.isfinite(_continue(model, cache, ids[:, -1:], 3)).all()  # still usable


@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16"])
@pytest.mark.parametrize("padded", [False, True])
def test_sliding_window_layers_equal_eager(fmt, padded):
    # Gemma-3 layer types, window 24 over 16-token blocks: int8 pages every token, int4 keeps 8 in its
    # residual window and pages 16 at a time, so the window spans pages and tail, crosses block edges,
    # and blocks leave it; the sliding layers' table columns follow it on the device.
    model = _model("gemma3")
    ids = _ids(2, 150, seed=7)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :19] = 0
    opts = dict(block_size=16, residual_length=8) if fmt == "int4" else dict(block_size=16)
    caches = [pagedkv.PagedKVCache(model.config, fmt, **opts) for _ in range(2)]
    eager, fed = _decode(model, caches[0], ids, 120, graph=False, mask=mask)
    static, _ = _decode(model, caches[1], ids, 120, graph=True, mask=mask, force=fed)
    # The op splits the window differently in the two paths (fp32 rounding, ~3e-7 here); where that
    # flips a quantized code of a flushed position, the logits move by up to ~4e-5 while the position
    # stays in the window of 24. A window off by one position moves them by ~1e-1.
    torch.testing.assert_close(static, eager, rtol=0, atol=5e-4)
    assert (static - eager).abs().mean() < 1e-5
    assert _state(caches[1]) == _state(caches[0])
    # close() frees the blocks that left the window, as the eager flushes did.
    used = [c.memory_stats()["bytes_used"] for c in caches]
    assert used[1] == used[0]
    last = eager[-1].argmax(-1, keepdim=True)
    torch.testing.assert_close(_continue(model, caches[1], last), _continue(model, caches[0], last), rtol=0,
                               atol=5e-4)


def test_sliding_layers_read_a_window_wide_table():
    # The op's block table of a sliding layer spans the window, not the run: its cost does not grow
    # with the context.
    model = _model("gemma3")
    cache = pagedkv.PagedKVCache(model.config, "int8", block_size=16)
    with torch.inference_mode():
        model(_ids(1, 400), past_key_values=cache, use_cache=True)
    with pagedkv.GraphDecoder(model, cache, max_new_tokens=200, cuda_graph=False) as dec:
        widths = {key: dec.state.op_table[key].shape[1] for key in dec.state.keys}
        windows = dec.state.windows
    assert sorted(windows) == [0, 24]
    assert {w: widths[(gi, 0)] for gi, w in enumerate(windows)} == {0: 38, 24: 3}  # 600 / 16 columns; 24 + 15


def test_recent_window_equals_eager_and_sinks_are_refused():
    model = _model()
    ids = _ids(2, 200, seed=8)
    caches = [pagedkv.PagedKVCache(model.config, "int4", recent_window=70) for _ in range(2)]
    eager, fed = _decode(model, caches[0], ids, 100, graph=False)
    static, _ = _decode(model, caches[1], ids, 100, graph=True, force=fed)
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
    assert _state(caches[1]) == _state(caches[0])
    cache = pagedkv.PagedKVCache(model.config, "int4", recent_window=70, sink_tokens=4, rotary=model.model.rotary_emb)
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="sink_tokens"):
        pagedkv.GraphDecoder(model, cache, max_new_tokens=4)
    assert cache._static is None


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16", "int2"])
def test_cuda_graph_replay_equals_eager(fmt):
    model = _model(dtype=torch.bfloat16, device="cuda")
    ids = _ids(4, 300, device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    caches = [pagedkv.PagedKVCache(model.config, fmt) for _ in range(2)]
    eager, fed = _decode(model, caches[0], ids, 150, graph=False, mask=mask)
    graph, _ = _decode(model, caches[1], ids, 150, graph=True, mask=mask, cuda_graph=True, force=fed)
    # Same kernels on the same values and tokens; the op's split of the context differs (the graph's
    # block table is as wide as the whole run), which changes fp32 rounding and the bf16 outputs only.
    torch.testing.assert_close(graph, eager, rtol=0, atol=3e-2)
    assert (graph - eager).abs().mean() < 2e-3
    assert _state(caches[1]) == _state(caches[0])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_cuda_graph_replay_equals_eager_sliding_window(fmt):
    # Gemma-3 layer types on the GPU: the captured steps refill the sliding layers' table columns.
    model = _model("gemma3", dtype=torch.bfloat16, device="cuda")
    ids = _ids(4, 300, device="cuda")
    mask = torch.ones_like(ids)
    mask[2, :33] = 0
    opts = dict(block_size=16, residual_length=8) if fmt == "int4" else dict(block_size=16)
    caches = [pagedkv.PagedKVCache(model.config, fmt, **opts) for _ in range(2)]
    eager, fed = _decode(model, caches[0], ids, 150, graph=False, mask=mask)
    graph, _ = _decode(model, caches[1], ids, 150, graph=True, mask=mask, cuda_graph=True, force=fed)
    torch.testing.assert_close(graph, eager, rtol=0, atol=3e-2)
    assert (graph - eager).abs().mean() < 2e-3
    assert _state(caches[1]) == _state(caches[0])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_generate_with_graphs_matches_eager_tokens():
    model = _model(dtype=torch.bfloat16, device="cuda")
    ids = _ids(2, 250, seed=3, device="cuda")
    # Free-running greedy decoding: a near-tie flipped by rounding changes the rest of a row, so only
    # the start is compared exactly.
    a = pagedkv.generate(model, ids, pagedkv.PagedKVCache(model.config, "int4"), max_new_tokens=100)
    b = pagedkv.generate(model, ids, pagedkv.PagedKVCache(model.config, "int4"), max_new_tokens=100, cuda_graph=True)
    assert torch.equal(a[:, :260], b[:, :260])


@pytest.mark.parametrize("arch,fmt,sample", [("llama", "int4", False), ("llama", "int4", True), ("gemma3", "int8", False),
                                             ("gemma3", "int4", False)])
def test_model_generate_custom_generate_matches_transformers_loop(arch, fmt, sample):
    # model.generate(custom_generate=pagedkv.graph_generate) against transformers' own loop on the same
    # cache format: left padding, EOS with padding of finished rows, sampling under one seed; Gemma-3
    # layer types (sliding windows) too. (Gemma-3's two prefills compute different values at the padded
    # positions; int4 matches because the cache stores padded positions with a real token's keys, so
    # they stay out of the key groups: PagedKVCache.note_padding.)
    model = _model(arch)
    ids = _ids(3, 230, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    kw = dict(attention_mask=mask, max_new_tokens=90, do_sample=sample, pad_token_id=0, eos_token_id=7)
    if sample:
        kw.update(top_k=20, temperature=0.8)
    outs = []
    for custom in (None, pagedkv.graph_generate):
        torch.manual_seed(5)
        cache = pagedkv.PagedKVCache(model.config, fmt)
        extra = {} if custom is None else dict(custom_generate=custom)
        outs.append(model.generate(ids, past_key_values=cache, **kw, **extra))
        assert cache._static is None
    assert torch.equal(outs[0], outs[1])


def test_graph_generate_refuses_what_it_does_not_cover():
    model = _model()
    ids = _ids(1, 50)
    with pytest.raises(ValueError, match="num_beams=2"):
        model.generate(ids, past_key_values=pagedkv.PagedKVCache(model.config, "int4"), num_beams=2,
                       max_new_tokens=3, custom_generate=pagedkv.graph_generate)
    with pytest.raises(TypeError, match="PagedKVCache"):
        model.generate(ids, max_new_tokens=3, custom_generate=pagedkv.graph_generate)
    # The cache under either name (later transformers 5.x releases hand it over as cache=): found, so
    # the refusal is about the beams.
    config = GenerationConfig(num_beams=2, max_length=53)
    for name in ("past_key_values", "cache"):
        with pytest.raises(ValueError, match="num_beams=2"):
            pagedkv.graph_generate(model, ids, [], [], config, **{name: pagedkv.PagedKVCache(model.config, "int4")})


@pytest.mark.parametrize("where", ["flush", "layer"])
def test_a_step_that_raises_is_rolled_back(where):
    # A step that fails part-way (here: the third layer's page write of a flush step, or the third
    # layer's MLP) leaves the decoder at the last completed step; decoding then goes on as if the
    # failed step had never run.
    model = _model()
    ids = _ids(2, 300, seed=6)
    ref_cache = pagedkv.PagedKVCache(model.config, "int4")
    eager, fed = _decode(model, ref_cache, ids, 120, graph=False)
    cache = pagedkv.PagedKVCache(model.config, "int4")
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True)
    dec = pagedkv.GraphDecoder(model, cache, max_new_tokens=120, cuda_graph=False)
    boom = {"armed": False}
    pages = cache._pages[2]
    write = pages.write

    def failing_write(*a, **k):
        if boom["armed"]:
            boom["armed"] = False
            raise RuntimeError("injected")
        return write(*a, **k)

    def failing_mlp(module, args):
        if boom["armed"]:
            boom["armed"] = False
            raise RuntimeError("injected")

    pages.write = failing_write
    hook = model.model.layers[2].mlp.register_forward_pre_hook(failing_mlp)
    got = []
    try:
        for i in range(120):
            if not boom.get("done") and (dec.state.flush_due() if where == "flush" else i == 5):
                boom["armed"] = boom["done"] = True
                with pytest.raises(RuntimeError, match="injected"):
                    dec.step(fed[i])
            got.append(dec.step(fed[i]).clone())
    finally:
        hook.remove()
        pages.write = write
        dec.close()
    assert boom["done"]
    torch.testing.assert_close(torch.stack(got), eager, rtol=1e-5, atol=1e-5)
    assert _state(cache) == _state(ref_cache)
