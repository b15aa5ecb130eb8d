"""Decode loops with the paged cache: chunked prefill, sampling, streaming, prefix reuse, CUDA graphs.

``prefill`` runs a long prompt through the model in chunks (bounded activation memory) with a progress
bar, a callback and cancellation. ``generate`` wraps prefill, decode, sampling and streaming.

Cancellation and failures (documented contract): a prefill cancelled through ``cancel`` or a callback
returning False stops *between* chunks and keeps every chunk prefilled so far (the cache holds a
consistent prefix; :class:`PrefillCancelled` says how many positions). An exception raised *inside* a
chunk (budget exhausted, KeyboardInterrupt, a model error) rolls that chunk back, so the cache again
holds exactly the chunks completed before it, and the exception propagates.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from typing import Any

import torch

from pagedkv.cache import PagedKVCache
from pagedkv.graph_decode import GraphDecoder
from pagedkv.hf_compat import cache_kwargs, generate_cache
from pagedkv.store import KVStore, tensor_parallel_size

DEFAULT_CHUNK = 2048


class PrefillCancelled(RuntimeError):
    """A prefill stopped between chunks; the cache holds the first ``positions`` positions."""

    def __init__(self, positions: int, total: int):
        super().__init__(f"prefill cancelled after {positions} of {total} positions (kept in the cache)")
        self.positions = positions
        self.total = total


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------
def check_sampling(do_sample: bool, temperature: float, top_k: int, top_p: float) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample_next(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[batch]`` from ``logits [batch, vocab]``: greedy, or sampled after temperature,
    top-k and top-p (nucleus) filtering, in that order."""
    check_sampling(do_sample, temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    logits = logits.float()
    if torch.isnan(logits).any():
        raise ValueError("logits contain NaN")
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------------
# chunked prefill
# ------------------------------------------------------------------------------------------------
def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def auto_chunk_size(model: Any, cache: PagedKVCache, context: int, device: torch.device,
                    dtype: torch.dtype, limit: int = 16384, fraction: float = 0.5) -> int:
    """A chunk size whose activations fit in ``fraction`` of the free memory of ``device`` now.

    Estimate per chunk token: the residual stream, attention and MLP activations of one layer at a time
    (``8 * hidden + 3 * intermediate + 3 * heads * head_dim`` elements), the last-position logits aside,
    plus a ``context``-long mask row; and once per chunk the dense K/V of one layer over the context
    (the non-fused attention path materializes it). Rounded down to a multiple of 128, at least 128."""
    cfg = getattr(model.config, "get_text_config", lambda **_: model.config)(decoder=True)
    hidden = getattr(cfg, "hidden_size", 1024)
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    heads = getattr(cfg, "num_attention_heads", 8)
    per_token = torch.finfo(dtype).bits // 8 * (8 * hidden + 3 * inter + 3 * heads * cache.head_dim) + context
    dense_kv = 2 * cache.num_kv_heads * cache.head_dim * context * torch.finfo(dtype).bits // 8
    budget = fraction * _free_bytes(device) - 2 * dense_kv
    n = int(budget // max(per_token, 1)) // 128 * 128
    return max(128, min(limit, n))


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch (as transformers' generate computes them)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _is_cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def prefill(model: Any, input_ids: torch.Tensor, cache: PagedKVCache, *, attention_mask: torch.Tensor | None = None,
            start: int | None = None, chunk_size: int | str = DEFAULT_CHUNK, progress: bool = False,
            callback: Callable[[int, int], Any] | None = None, cancel: Any = None) -> torch.Tensor:
    """Run ``input_ids[:, start:]`` through ``model`` in chunks with ``cache``; returns the fp32 logits of the
    last position ``[batch, vocab]``.

    ``input_ids`` holds the whole sequence; ``start`` (default ``cache.get_seq_length()``) positions are
    already cached. ``chunk_size``: tokens per forward, or ``"auto"`` to size each chunk to the free memory
    (:func:`auto_chunk_size`). ``progress``: a tqdm bar. ``callback(done, total)`` after each chunk; returning
    False cancels. ``cancel``: a ``threading.Event`` or a callable returning True to stop. See the module
    docstring for what a cancelled or failed prefill leaves in the cache."""
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a pagedkv.PagedKVCache, got {type(cache).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [batch, seq_len], got {getattr(input_ids, 'shape', input_ids)!r}")
    total = input_ids.shape[1]
    start = cache.get_seq_length() if start is None else start
    if not 0 <= start < total:
        raise ValueError(f"start={start} must be in [0, {total}): at least one prompt position must be computed")
    if cache.get_seq_length() != start:
        raise ValueError(f"start={start} but the cache holds {cache.get_seq_length()} positions")
    auto = chunk_size == "auto"
    if not auto and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or 'auto', got {chunk_size!r}")
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    positions = _position_ids(attention_mask)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, unit="tok", desc="prefill")
    logits = None
    done = start
    try:
        while done < total:
            if auto:
                dtype = next(model.parameters()).dtype
                step = auto_chunk_size(model, cache, done, device, dtype)
            else:
                step = chunk_size
            end = min(done + step, total)
            snap = cache.snapshot()
            try:
                with torch.inference_mode():
                    out = model(input_ids=input_ids[:, done:end], attention_mask=attention_mask[:, :end],
                                position_ids=positions[:, done:end], use_cache=True, **cache_kwargs(model, cache),
                                logits_to_keep=1)
            except BaseException:
                cache.restore(snap)
                raise
            logits = out.logits[:, -1].float()
            done = end
            if bar is not None:
                bar.update(end - (bar.n))
            stop = callback is not None and callback(done, total) is False
            if done < total and (stop or _is_cancelled(cancel)):
                raise PrefillCancelled(done, total)
    finally:
        if bar is not None:
            bar.close()
    return logits


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------
class DecodeSteps:
    """The decode steps of a generation loop: eager steps (with the growing padding mask) until the
    cache can start a :class:`GraphDecoder`, graph steps from then on when ``graphs``.

    ``mask``: the padding mask of the positions the cache holds; ``pos``: the last one's position ids
    ``[batch, 1]``. ``step(ids [batch], remaining)`` feeds one token per row and returns the fp32 logits
    ``[batch, vocab]``; ``remaining``: the most steps still to come, this one included."""

    def __init__(self, model: Any, cache: PagedKVCache, mask: torch.Tensor, pos: torch.Tensor, graphs: bool):
        self.model, self.cache, self.mask, self.pos, self.graphs = model, cache, mask, pos, graphs
        self.decoder: GraphDecoder | None = None

    def step(self, ids: torch.Tensor, remaining: int) -> torch.Tensor:
        cache = self.cache
        if self.graphs and self.decoder is None and cache.layers[0].num_paged >= max(l.exact for l in cache.layers):
            self.decoder = GraphDecoder(self.model, cache, max_new_tokens=max(remaining, 1), attention_mask=self.mask)
        if self.decoder is not None:
            return self.decoder.step(ids[:, None]).float()
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.pos = self.pos + 1
        with torch.inference_mode():
            out = self.model(input_ids=ids[:, None], attention_mask=self.mask, position_ids=self.pos,
                             use_cache=True, **cache_kwargs(self.model, cache))
        return out.logits[:, -1].float()

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None


def graph_generate(model: Any, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                   generation_config: Any, synced_gpus: bool = False, streamer: Any = None, **model_kwargs: Any
                   ) -> torch.Tensor:
    """A decoding loop for ``model.generate(..., custom_generate=pagedkv.graph_generate)``: greedy or
    sampled decoding as transformers' own, with the decode steps run by a :class:`GraphDecoder`.

    Needs ``past_key_values=PagedKVCache(...)`` and ``attn_implementation="pagedkv"``. transformers
    prepares the inputs, logits processors (temperature, top-k/p, ...) and stopping criteria (max
    length, EOS) as usual and hands them here. Beam search, assisted decoding and
    ``return_dict_in_generate`` are not covered (ValueError). Returns ``[batch, prompt + new]`` ids."""
    cache = generate_cache(model_kwargs)
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"graph_generate needs past_key_values=pagedkv.PagedKVCache(...) (cache= in later "
                        f"transformers 5.x releases), got {type(cache).__name__}")
    if getattr(generation_config, "num_beams", 1) > 1:
        raise ValueError(f"graph_generate decodes greedily or by sampling, not num_beams={generation_config.num_beams}")
    if getattr(generation_config, "return_dict_in_generate", False):
        raise ValueError("graph_generate returns token ids only: return_dict_in_generate=True is not supported")
    if synced_gpus:
        raise ValueError("graph_generate does not support synced_gpus")
    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    do_sample = bool(getattr(generation_config, "do_sample", False))
    pad = getattr(generation_config, "_pad_token_tensor", None)
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    max_length = generation_config.max_length
    batch = input_ids.shape[0]
    done = cache.get_seq_length()
    if not 0 <= done < input_ids.shape[1]:
        raise ValueError(f"the cache holds {done} positions; the prompt has {input_ids.shape[1]}")
    pos = _position_ids(mask)
    with torch.inference_mode():
        out = model(input_ids=input_ids[:, done:], attention_mask=mask, position_ids=pos[:, done:],
                    use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    logits = out.logits[:, -1].float()
    steps = DecodeSteps(model, cache, mask, pos[:, -1:], graphs=True)
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    try:
        while True:
            scores = logits_processor(input_ids, logits)
            if do_sample:
                nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                nxt = torch.argmax(scores, dim=-1)
            if has_eos and pad is not None:
                nxt = nxt * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, nxt[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(nxt.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, scores)
            if unfinished.max() == 0:
                break
            logits = steps.step(nxt, max_length - input_ids.shape[1])
    finally:
        steps.close()
    if streamer is not None:
        streamer.end()
    return input_ids


def generate(model: Any, input_ids: torch.Tensor, cache: PagedKVCache | KVStore | None = None, *,
             max_new_tokens: int = 128, attention_mask: torch.Tensor | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None, streamer: Any = None,
             chunk_size: int | str = DEFAULT_CHUNK, progress: bool = False,
             callback: Callable[[int, int], Any] | None = None, cancel: Any = None,
             stats: dict | None = None, cuda_graph: bool = False) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids [batch, seq_len]``; returns ``[batch, seq_len + new]``.

    ``cache``: a :class:`PagedKVCache` (reused across calls: the prefix it already holds, or with prefix
    caching the longest cached prefix, is not recomputed), a :class:`KVStore` (a cache is made on it for
    this call, its blocks registered in the prefix cache and released afterwards), or None (a bf16
    cache). Sampling: greedy unless ``do_sample``; then ``temperature``, ``top_k`` and ``top_p`` combine;
    ``seed`` makes it reproducible. ``streamer``: anything with ``put``/``end`` (e.g.
    :class:`pagedkv.CachedTextStreamer`); it first receives the prompt, as with transformers.
    ``stats``: a dict to receive ``reused_tokens``, ``prefill_tokens`` and ``new_tokens``.
    ``cuda_graph``: decode through a :class:`pagedkv.GraphDecoder` (each step replayed as a CUDA graph;
    the model must use ``attn_implementation="pagedkv"``, see ``graph_decode.py`` for what it covers). A
    prompt shorter than the cache's exact prefix starts with eager steps."""
    check_sampling(do_sample, temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [batch, seq_len], got {getattr(input_ids, 'shape', input_ids)!r}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: generate needs at least one prompt token")
    from_store = isinstance(cache, KVStore)
    if cache is None:
        cache = PagedKVCache(model.config, tp_size=tensor_parallel_size(model))
    elif from_store:
        cache = PagedKVCache(model.config, store=cache)
    elif not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, a KVStore or None, got {type(cache).__name__}")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(int(seed))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    reused = cache.prepare(input_ids)
    steps = None
    try:
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits = prefill(model, input_ids, cache, attention_mask=attention_mask, start=reused, chunk_size=chunk_size,
                         progress=progress, callback=callback, cancel=cancel)
        out = input_ids
        steps = DecodeSteps(model, cache, attention_mask, _position_ids(attention_mask)[:, -1:], graphs=cuda_graph)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        eos_ids = torch.tensor(sorted(eos), device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)
            nxt = nxt.masked_fill(finished, pad)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if streamer is not None:
                streamer.put(nxt.cpu())
            if eos:
                finished |= torch.isin(nxt, eos_ids)
                if bool(finished.all()):
                    break
            if step == max_new_tokens - 1:
                break
            logits = steps.step(nxt, max_new_tokens - 1 - step)
        steps.close()
        if streamer is not None:
            streamer.end()
        cache.token_ids = out
        if cache.prefix_caching:
            cache.cache_prefix()
    finally:
        if steps is not None:
            steps.close()
        if from_store:
            cache.release()
    if stats is not None:
        stats.update(reused_tokens=reused, prefill_tokens=input_ids.shape[1] - reused,
                     new_tokens=out.shape[1] - input_ids.shape[1])
    return out


def enable_prefix_reuse(model: Any) -> Any:
    """Make ``model.generate(input_ids, past_key_values=<PagedKVCache>, ...)`` (or ``cache=``, its name
    in later transformers 5.x releases) reuse what the cache holds:
    before generating, :meth:`PagedKVCache.prepare` keeps the longest reusable prefix (or attaches the
    longest cached one); afterwards the cache records the ids it holds and, with prefix caching,
    registers its blocks. Returns the model (patched in place, idempotent)."""
    if getattr(model.generate, "_pagedkv_reuse", False):
        return model
    original = model.generate

    @functools.wraps(original)
    def generate_with_reuse(*args: Any, **kwargs: Any) -> Any:
        cache = generate_cache(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(cache, PagedKVCache) or not isinstance(ids, torch.Tensor):
            return original(*args, **kwargs)
        cache.prepare(ids)
        result = original(*args, **kwargs)
        seqs = result.sequences if hasattr(result, "sequences") else result
        if cache.get_seq_length() and seqs.shape[0] == cache.batch_size:
            cache.token_ids = seqs
            if cache.prefix_caching:
                cache.cache_prefix()
        return result

    generate_with_reuse._pagedkv_reuse = True
    model.generate = generate_with_reuse
    return model
