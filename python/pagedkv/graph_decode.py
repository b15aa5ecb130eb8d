"""Decode steps with fixed shapes, replayed as CUDA graphs.

An eager decode step of a transformers model launches a few hundred small kernels from Python; at
batch 16 on a 1B model the host needs about 20 ms for that while the GPU needs a few. A CUDA graph
replays the whole step at once, but only if every tensor shape, pointer and host-side number stays
the same from one step to the next. :class:`GraphDecoder` puts a prefilled :class:`PagedKVCache` into
such a state for a run of decode steps:

- the residual window of each layer becomes a fixed-capacity buffer ``[batch, num_kv_heads, exact +
  residual_length + flush_quantum, head_dim]``: the exact leading positions first, then the newest
  positions; a device counter says where the next token goes;
- the blocks the run will need are reserved up front, so the block table has a fixed width and the
  paged length lives on the device (``seq_lens``);
- a device mask marks the valid entries of the fixed buffers (and the prompt's padding);
- a step that moves ``flush_quantum`` positions from the window into pages (every ``flush_quantum``
  steps) is a second graph; the host knows which step is which.

The pages, the quantization and the fused attention are the cache's own, so a graph step computes
what an eager step computes (the attention op may split the context differently, which changes fp32
rounding only). :meth:`GraphDecoder.close` hands the state back to the cache, which then continues
eagerly (``generate``, ``crop``, prefix caching, ...). Without CUDA (or with ``cuda_graph=False``)
the same fixed-shape steps run eagerly, which is what the CPU tests check.

Supported: full-attention models (no sliding-window layers, no ``recent_window``/``sink_tokens``),
one query token per step, the ``"pagedkv"`` attention implementation. ``check_finite`` is not applied
inside graph steps (it would need a host synchronization per layer).
"""

from __future__ import annotations

from typing import Any

import torch

from pagedkv import ops
from pagedkv.cache import PagedKVCache
from pagedkv.config import FORMATS


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class StaticDecodeState:
    """The fixed-shape device state of a cache during graph decoding (see the module docstring).

    Host mirrors ``num_tokens`` / ``num_paged`` advance only when a step has completed."""

    def __init__(self, cache: PagedKVCache, max_new_tokens: int, attention_mask: torch.Tensor | None):
        layers = cache.layers
        if len(cache._groups) != 1 or any(layer.window for layer in layers) or cache.sink_tokens:
            raise ValueError("graph decoding supports full-attention models without recent_window/sink_tokens; this "
                             "cache has sliding-window or streaming layers")
        if cache._batch_size is None:
            raise ValueError("graph decoding starts from a prefilled cache: run the prompt through the model first")
        counts = {(layer.num_tokens, layer.num_paged) for layer in layers}
        if len(counts) != 1:
            raise ValueError(f"every layer must hold the same positions to start graph decoding, got {sorted(counts)}")
        self.cache = cache
        group = cache._groups[0]
        self.group = group
        n0, p0 = counts.pop()
        self.num_tokens, self.num_paged = n0, p0
        self.residual, self.quantum = cache.residual_length, cache.flush_quantum
        # Positions a step may hold in the window after its token: up to residual + quantum (the step
        # whose token completes a quantum flushes it at the start of the next step, as eager decode
        # pages it right after that step's attention).
        self.capacity = max(self.residual + self.quantum, 1)
        self.leads = [layer.exact for layer in layers]
        if p0 < max(self.leads):
            raise ValueError(f"graph decoding needs the first {max(self.leads)} positions paged; the cache holds "
                             f"{p0} (decode eagerly until then)")
        device = cache._device
        final = n0 + max_new_tokens
        p_max = max(p0, cache._target_paged(group, final))
        if group.storage.index is not None:
            cache.store.now()
        group.advance(p_max, device)  # BudgetExhaustedError: nothing changed
        try:
            self._build(layers, p0, n0, p_max, attention_mask)
        except BaseException:
            group.truncate(p0)  # out of memory for the buffers, ...: give the reservation back
            raise

    def _build(self, layers: list, p0: int, n0: int, p_max: int, attention_mask: torch.Tensor | None) -> None:
        cache, group = self.cache, self.group
        device, dtype = cache._device, cache._dtype
        b, h, d = cache._batch_size, cache.num_kv_heads, cache.head_dim
        bs = cache.block_size
        self.p_max = p_max
        self.device = device
        with torch.inference_mode():
            table = group.block_table(device)[:, :max(-(-p_max // bs), 1)]
            self.table = table.contiguous()
            self.table_long = self.table.long()
            self.tail_k: list[torch.Tensor] = []
            self.tail_v: list[torch.Tensor] = []
            for i, layer in enumerate(layers):
                lead = self.leads[i]
                tk = torch.zeros((b, h, lead + self.capacity, d), dtype=dtype, device=device)
                tv = torch.zeros_like(tk)
                if lead:
                    tk[:, :, :lead] = layer.sink_keys[:, :, :lead]
                    tv[:, :, :lead] = layer.sink_values[:, :, :lead]
                if layer.residual_keys is not None:
                    t0 = layer.residual_keys.shape[2]
                    tk[:, :, lead:lead + t0] = layer.residual_keys
                    tv[:, :, lead:lead + t0] = layer.residual_values
                self.tail_k.append(tk)
                self.tail_v.append(tv)
            self.n_dev = torch.tensor([n0], dtype=torch.long, device=device)  # positions before the step
            self.p_dev = torch.tensor([p0], dtype=torch.long, device=device)
            m = p_max + self.capacity  # entries of the op: (p - lead) paged + lead + capacity tail
            self.entries = torch.arange(m, device=device)
            pad = torch.ones((b, m), dtype=torch.bool, device=device)
            if attention_mask is not None:
                given = attention_mask.to(device=device, dtype=torch.bool)[:, :n0]
                pad[:, :given.shape[1]] = given
            self.padding = pad
            self.padded = not bool(pad.all())  # once, at the start: else the entry mask is only the count
            distinct = sorted(set(self.leads))
            self.lens = {lead: torch.zeros(b, dtype=torch.int32, device=device) for lead in distinct}
            self.skip = {lead: torch.full((b,), lead % bs, dtype=torch.int32, device=device) for lead in distinct}
            self.mask = {lead: torch.zeros((b, m), dtype=torch.bool, device=device) for lead in distinct}
            self.slot_idx = {lead: torch.zeros(1, dtype=torch.long, device=device) for lead in distinct}
            self.quantum_pos = torch.arange(self.quantum, device=device)
            self.flush_slots = torch.zeros(b * self.quantum, dtype=torch.long, device=device)
        self.flushing = False
        # Eager steps only: each layer's window before a flush shifted it, for rollback().
        self._undo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- host side ----------------------------------------------------------------------------
    def flush_due(self) -> bool:
        """Whether the next step starts by paging ``flush_quantum`` positions (eager decode paged them
        right after the previous step's attention)."""
        return self.num_tokens - self.num_paged >= self.residual + self.quantum and self.num_paged + self.quantum <= self.p_max

    def completed(self, flushed: bool) -> None:
        self.num_tokens += 1
        if flushed:
            self.num_paged += self.quantum
        for layer in self.cache.layers:
            layer.num_tokens = self.num_tokens  # get_seq_length stays right during the run

    # -- device side (captured) -----------------------------------------------------------------
    def prologue(self, flush: bool) -> None:
        """Once per step, before the layers: slots of a flush, the paged length, the window slot of the
        step's token and the entry masks."""
        self.flushing = flush
        self._undo.clear()
        bs = self.cache.block_size
        if flush:
            pos = self.p_dev + self.quantum_pos
            blocks = self.table_long.index_select(1, pos // bs)
            self.flush_slots.copy_((blocks * bs + pos % bs).reshape(-1))
            self.p_dev += self.quantum
        e = self.entries
        for lead in self.lens:
            self.lens[lead].copy_((self.p_dev - lead).to(torch.int32).expand_as(self.lens[lead]))
            self.slot_idx[lead].copy_(self.n_dev - self.p_dev + lead)
            # Entry order: paged [lead, p), the exact positions [0, lead), then the window from p.
            valid = e <= self.n_dev  # the step's own token included
            if self.padded:
                paged = self.p_dev - lead
                src = torch.where(e < paged, e + lead, torch.where(e < self.p_dev, e - paged, e))
                valid = self.padding.gather(1, src.expand_as(self.padding)) & valid
            self.mask[lead].copy_(valid.expand_as(self.mask[lead]))
        self.n_dev += 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        cache = self.cache
        if key_states.dim() != 4 or key_states.shape[2] != 1 or key_states.shape != value_states.shape:
            raise ValueError(f"graph decoding takes one token per step: key/value_states must be [batch, num_kv_heads, "
                             f"1, head_dim], got {tuple(key_states.shape)} / {tuple(value_states.shape)}")
        layer = cache.layers[layer_idx]
        if layer.rotated:
            value_states = cache._rotate_values(value_states, False)
        tk, tv = self.tail_k[layer_idx], self.tail_v[layer_idx]
        lead = self.leads[layer_idx]
        if self.flushing:
            self._flush_layer(layer_idx, undo=not _capturing(tk))
        tk.index_copy_(2, self.slot_idx[lead], key_states)
        tv.index_copy_(2, self.slot_idx[lead], value_states)
        out_k, out_v = tk.view(tk.shape), tv.view(tv.shape)
        out_k._pagedkv_ctx = out_v._pagedkv_ctx = (self, layer_idx)
        return out_k, out_v

    def _flush_layer(self, layer_idx: int, undo: bool) -> None:
        """Page the window's oldest ``flush_quantum`` positions of one layer at ``flush_slots`` and shift
        the rest to the window's front; ``undo`` keeps the window as it was, for rollback()."""
        tk, tv = self.tail_k[layer_idx], self.tail_v[layer_idx]
        lead, q = self.leads[layer_idx], self.quantum
        h, d = tk.shape[1], tk.shape[3]
        self.cache._pages[layer_idx].write(tk[:, :, lead:lead + q].transpose(1, 2).reshape(-1, h, d),
                                           tv[:, :, lead:lead + q].transpose(1, 2).reshape(-1, h, d),
                                           self.flush_slots, self.group.blocks_per_chunk)
        keep = self.capacity - q
        if keep:
            if undo:
                self._undo[layer_idx] = (tk[:, :, lead:].clone(), tv[:, :, lead:].clone())
            tk[:, :, lead:lead + keep] = tk[:, :, lead + q:].clone()
            tv[:, :, lead:lead + keep] = tv[:, :, lead + q:].clone()

    def _attend(self, layer_idx: int, query: torch.Tensor, padding: torch.Tensor | None, scaling: float | None,
                softcap: float, max_query: int) -> torch.Tensor:
        """The "pagedkv" attention of a graph step (the padding comes from the decoder's own mask)."""
        cache = self.cache
        layer = cache.layers[layer_idx]
        pages = cache._pages[layer_idx]
        lead = self.leads[layer_idx]
        f = pages.fmt
        out = ops.paged_attention(
            query, pages.k_chunks, pages.v_chunks, self.table, self.lens[lead], skip=self.skip[lead],
            k_tail=self.tail_k[layer_idx], v_tail=self.tail_v[layer_idx], kv_mask=self.mask[lead], mask_offset=0,
            k_format=FORMATS[f.key], v_format=FORMATS[f.value], k_group=pages.key_group, v_group=pages.value_group,
            block_size=cache.block_size, blocks_per_chunk=self.group.blocks_per_chunk, num_kv_heads=cache.num_kv_heads,
            scale=scaling if scaling is not None else cache.head_dim ** -0.5, softcap=softcap, window=0)
        return cache._rotate_values(out, True) if layer.rotated else out

    def _dense_kv(self, layer_idx: int):
        raise RuntimeError("graph decoding needs the fused 'pagedkv' attention (no dropout, not training)")

    def rollback(self) -> None:
        """Undo a step that raised part-way (an eager step; a capture runs nothing): the shifted windows
        and the device counters go back to the last completed step. Pages written at positions past
        ``num_paged`` are ignored and rewritten later; a token written past the window's end is masked."""
        for i, (k, v) in self._undo.items():
            lead = self.leads[i]
            self.tail_k[i][:, :, lead:] = k
            self.tail_v[i][:, :, lead:] = v
        self._undo.clear()
        self.n_dev.fill_(self.num_tokens)
        self.p_dev.fill_(self.num_paged)
        self.flushing = False

    # -- hand back ------------------------------------------------------------------------------
    def close(self) -> None:
        """Write the state back into the cache's eager form and free the unused reserved blocks."""
        cache = self.cache
        with torch.inference_mode():
            if self.flush_due():  # eager decode would have paged it already
                self.prologue(True)
                self.n_dev -= 1
                for i in range(len(cache.layers)):
                    self._flush_layer(i, undo=False)
                self.num_paged += self.quantum
            n, p = self.num_tokens, self.num_paged
            for i, layer in enumerate(cache.layers):
                lead = self.leads[i]
                layer.num_tokens, layer.num_paged = n, p
                if n > p:
                    layer.residual_keys = self.tail_k[i][:, :, lead:lead + n - p].clone()
                    layer.residual_values = self.tail_v[i][:, :, lead:lead + n - p].clone()
                else:
                    layer.residual_keys = layer.residual_values = None
                layer._pending = None
        self.group.truncate(p)
        cache._static = None


class GraphDecoder:
    """Decode steps of ``model`` over a prefilled ``cache``, as CUDA graphs on a GPU.

    ``step(input_ids [batch, 1])`` returns the last position's logits ``[batch, vocab]`` (a buffer the
    next step overwrites). At most ``max_new_tokens`` steps; the blocks they need are reserved up front
    (:class:`pagedkv.BudgetExhaustedError` if they do not fit, with the cache unchanged).
    ``attention_mask``: the prompt's ``[batch, prompt_len]`` padding mask (left padding), if any.
    ``close()`` (or leaving the ``with`` block) hands the cache back for eager use. The first step of
    each kind (with and without a flush) runs eagerly, the second is captured; later ones replay.
    """

    def __init__(self, model: Any, cache: PagedKVCache, *, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 cuda_graph: bool | None = None):
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache must be a pagedkv.PagedKVCache, got {type(cache).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        impl = getattr(model.config, "_attn_implementation", None)
        if impl != "pagedkv":
            raise ValueError(f"graph decoding needs attn_implementation='pagedkv', the model uses {impl!r}")
        if cache._static is not None:
            raise RuntimeError("this cache is already in a GraphDecoder")
        held = (cache._batch_size, cache.get_seq_length())
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or
                                           tuple(attention_mask.shape) != held):
            raise ValueError(f"attention_mask must be the padding mask of the positions the cache holds, "
                             f"[batch, positions] = {list(held)}, got {tuple(getattr(attention_mask, 'shape', ()))}")
        self.model = model
        self.cache = cache
        self.max_new_tokens = max_new_tokens
        state = StaticDecodeState(cache, max_new_tokens, attention_mask)
        device = state.device
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and device.type != "cuda":
            state.close()
            raise ValueError(f"cuda_graph=True needs a CUDA cache, this one is on {device}")
        self.state = state
        b = cache._batch_size
        with torch.inference_mode():
            self.ids = torch.zeros((b, 1), dtype=torch.long, device=device)
            if attention_mask is not None:
                pos = attention_mask.to(device).long().sum(-1, keepdim=True) - 1
            else:
                pos = torch.full((b, 1), state.num_tokens - 1, dtype=torch.long, device=device)
            self.pos = pos
        self.steps = 0
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._outs: dict[bool, torch.Tensor] = {}
        self._ran: set[bool] = set()
        self._pool = None
        cache._static = state

    def _forward(self, flush: bool) -> torch.Tensor:
        self.state.prologue(flush)
        self.pos += 1
        out = self.model(input_ids=self.ids, position_ids=self.pos, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1]

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            raise RuntimeError("this GraphDecoder is closed")
        if self.steps >= self.max_new_tokens:
            raise RuntimeError(f"max_new_tokens={self.max_new_tokens} steps are done; close() and start a new decoder")
        if tuple(input_ids.shape) != tuple(self.ids.shape) or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be integer ids [batch={self.ids.shape[0]}, 1], got "
                             f"{input_ids.dtype} {tuple(input_ids.shape)}")
        flush = self.state.flush_due()
        with torch.inference_mode():
            self.ids.copy_(input_ids)
            if not self.cuda_graph or flush not in self._ran:
                pos = self.pos.clone()
                try:
                    logits = self._forward(flush)
                except BaseException:
                    self.state.rollback()
                    self.pos.copy_(pos)
                    raise
                self._ran.add(flush)
            else:
                graph = self._graphs.get(flush)
                if graph is None:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._pool):
                        self._outs[flush] = self._forward(flush)
                    self._pool = graph.pool()
                    self._graphs[flush] = graph
                graph.replay()
                logits = self._outs[flush]
        self.state.completed(flush)
        self.steps += 1
        return logits

    def close(self) -> None:
        """Hand the cache back (idempotent)."""
        if self.state is not None:
            self.state.close()
            self.state = None
            self._graphs.clear()
            self._outs.clear()

    def __enter__(self) -> "GraphDecoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
