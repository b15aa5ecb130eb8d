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

Sliding-window layers (Gemma-3's ``layer_types``, or ``recent_window`` on full layers) read a fixed
number of block-table columns that follow the window on the device, so their attention costs what the
window holds, not the whole context; their blocks stay reserved until :meth:`GraphDecoder.close`, which
frees those that left the window (eager decode frees them at each flush).

Supported: one query token per step, the ``"pagedkv"`` attention implementation, any mix of full and
sliding-window layers; not ``sink_tokens`` (its keys are re-rotated every step). ``check_finite`` is not
applied inside graph steps (it would need a host synchronization per layer).
"""

from __future__ import annotations

from typing import Any

import torch

from pagedkv import ops
from pagedkv.cache import PagedKVCache
from pagedkv.config import FORMATS
from pagedkv.hf_compat import cache_kwargs


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class StaticDecodeState:
    """The fixed-shape device state of a cache during graph decoding (see the module docstring).

    Host mirrors ``num_tokens`` / ``num_paged`` advance only when a step has completed. Device buffers
    that depend on a layer's block group and exact lead are kept per ``(group, lead)`` key."""

    def __init__(self, cache: PagedKVCache, max_new_tokens: int, attention_mask: torch.Tensor | None):
        layers = cache.layers
        if cache.sink_tokens:
            raise ValueError("graph decoding does not cover sink_tokens (the sinks' keys are re-rotated every step); "
                             "decode this cache eagerly")
        if cache._batch_size is None:
            raise ValueError("graph decoding starts from a prefilled cache: run the prompt through the model first")
        counts = {(layer.num_tokens, layer.num_paged) for layer in layers}
        if len(counts) != 1:
            raise ValueError(f"every layer must hold the same positions to start graph decoding, got {sorted(counts)}")
        self.cache = cache
        self.groups = list(cache._groups)
        self.group_ids = list(cache.store.group_of)
        # Positions a query of each group sees (the store groups layers by window; 0: all of them).
        self.windows = [g.sliding_window or 0 for g in self.groups]
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
        p_max = max(max(p0, cache._target_paged(g, final)) for g in self.groups)
        advanced = []
        try:
            for g in self.groups:
                if g.storage.index is not None:
                    cache.store.now()
                g.advance(p_max, device)  # BudgetExhaustedError: the groups before are given back below
                advanced.append(g)
            self._build(layers, p0, n0, p_max, attention_mask)
        except BaseException:
            for g in advanced:  # out of memory for the blocks or the buffers, ...: give the reservation back
                g.truncate(p0)
            raise

    def _build(self, layers: list, p0: int, n0: int, p_max: int, attention_mask: torch.Tensor | None) -> None:
        cache = self.cache
        device, dtype = cache._device, cache._dtype
        b, h, d = cache._batch_size, cache.num_kv_heads, cache.head_dim
        bs = cache.block_size
        self.p_max = p_max
        self.device = device
        with torch.inference_mode():
            # Each group's kept blocks up to p_max; a sliding group's column 0 is its first kept block.
            self.first_col = [g.first_available // bs for g in self.groups]
            self.tables = [g.block_table(device)[:, :max(-(-p_max // bs) - f, 1)].contiguous()
                           for g, f in zip(self.groups, self.first_col)]
            self.tables_long = [t.long() for t in self.tables]
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
            m = p_max + self.capacity  # positions the run can reach
            pad = torch.ones((b, m), dtype=torch.bool, device=device)
            if attention_mask is not None:
                given = attention_mask.to(device=device, dtype=torch.bool)[:, :n0]
                pad[:, :given.shape[1]] = given
            self.padding = pad
            self.padded = not bool(pad.all())  # once, at the start: else the entry mask is only the count
            self.keys = sorted({(self.group_ids[i], lead) for i, lead in enumerate(self.leads)})
            # Per key: the op's block table (a sliding group's: `cols` columns from the window's first
            # block, refilled each step), paged length, skip and entry mask.
            self.op_table: dict[tuple[int, int], torch.Tensor] = {}
            self.cols: dict[tuple[int, int], torch.Tensor] = {}
            self.entries: dict[tuple[int, int], torch.Tensor] = {}
            for key in self.keys:
                gi, lead = key
                table, w = self.tables[gi], self.windows[gi]
                if w:
                    # Paged entries: at most w - 1 positions, from any offset in a block.
                    ncols = min((w + 2 * bs - 3) // bs, table.shape[1])
                    self.cols[key] = torch.arange(ncols, device=device)
                    self.op_table[key] = torch.zeros((b, ncols), dtype=torch.int32, device=device)
                    self.entries[key] = torch.arange(ncols * bs + lead + self.capacity, device=device)
                else:
                    self.op_table[key] = table
                    self.entries[key] = torch.arange(m, device=device)
            self.lens = {key: torch.zeros(b, dtype=torch.int32, device=device) for key in self.keys}
            self.skip = {key: torch.full((b,), key[1] % bs, dtype=torch.int32, device=device) for key in self.keys}
            self.mask = {key: torch.zeros((b, self.entries[key].numel()), dtype=torch.bool, device=device)
                         for key in self.keys}
            self.slot_idx = {lead: torch.zeros(1, dtype=torch.long, device=device) for lead in set(self.leads)}
            self.quantum_pos = torch.arange(self.quantum, device=device)
            self.flush_slots = [torch.zeros(b * self.quantum, dtype=torch.long, device=device) for _ in self.groups]
        self.flushing = False
        # (positions, paged positions) at the start of the last step that flushed: where eager decode
        # freed the sliding groups' blocks that had left the window (close() does the same).
        self.last_flush: tuple[int, int] | None = None
        # Eager steps only: each layer's window before a flush shifted it, for rollback().
        self._undo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- host side ----------------------------------------------------------------------------
    def flush_due(self) -> bool:
        """Whether the next step starts by paging ``flush_quantum`` positions (eager decode paged them
        right after the previous step's attention)."""
        return self.num_tokens - self.num_paged >= self.residual + self.quantum and self.num_paged + self.quantum <= self.p_max

    def completed(self, flushed: bool) -> None:
        if flushed:
            self.last_flush = (self.num_tokens, self.num_paged)
            self.num_paged += self.quantum
        self.num_tokens += 1
        for layer in self.cache.layers:
            layer.num_tokens = self.num_tokens  # get_seq_length stays right during the run

    # -- device side (captured) -----------------------------------------------------------------
    def prologue(self, flush: bool) -> None:
        """Once per step, before the layers: slots of a flush, the paged length, the window slot of the
        step's token, the sliding groups' table columns and the entry masks."""
        self.flushing = flush
        self._undo.clear()
        bs = self.cache.block_size
        if flush:
            pos = self.p_dev + self.quantum_pos
            for gi, table in enumerate(self.tables_long):
                blocks = table.index_select(1, pos // bs - self.first_col[gi])
                self.flush_slots[gi].copy_((blocks * bs + pos % bs).reshape(-1))
            self.p_dev += self.quantum
        n, p = self.n_dev, self.p_dev
        for lead in self.slot_idx:
            self.slot_idx[lead].copy_(n - p + lead)
        for key in self.keys:
            gi, lead = key
            e, w = self.entries[key], self.windows[gi]
            # Entry order: paged [start, p), the exact positions [0, lead), then the window from p.
            if w:
                # The step's token (position n) sees positions [n + 1 - w, n]: the table's columns
                # follow the window's first paged position.
                visible = (n + 1 - w).clamp(min=0)
                start = torch.minimum(visible.clamp(min=lead), p)
                col = (start // bs - self.first_col[gi] + self.cols[key]).clamp(max=self.tables[gi].shape[1] - 1)
                self.op_table[key].copy_(self.tables[gi].index_select(1, col))
                self.skip[key].copy_((start % bs).to(torch.int32).expand_as(self.skip[key]))
            else:
                start = lead  # skip stays lead % bs
            paged = p - start
            self.lens[key].copy_(paged.to(torch.int32).expand_as(self.lens[key]))
            if w or self.padded:
                pos = torch.where(e < paged, e + start, torch.where(e < paged + lead, e - paged, e - paged - lead + p))
                valid = (pos <= n) & (pos >= visible) if w else pos <= n  # the step's own token included
            else:
                valid = e <= n  # full layers: entry e holds a position <= n exactly when e <= n
            if self.padded:
                # Entries past the step's token (masked already) may point past the run's positions.
                src = pos.clamp(max=self.padding.shape[1] - 1).expand(self.padding.shape[0], -1)
                valid = self.padding.gather(1, src) & valid
            self.mask[key].copy_(valid.expand_as(self.mask[key]))
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
        """Page the window's oldest ``flush_quantum`` positions of one layer at its group's
        ``flush_slots`` and shift the rest to the window's front; ``undo`` keeps the window as it was,
        for rollback()."""
        tk, tv = self.tail_k[layer_idx], self.tail_v[layer_idx]
        lead, q = self.leads[layer_idx], self.quantum
        gi = self.group_ids[layer_idx]
        h, d = tk.shape[1], tk.shape[3]
        self.cache._pages[layer_idx].write(tk[:, :, lead:lead + q].transpose(1, 2).reshape(-1, h, d),
                                           tv[:, :, lead:lead + q].transpose(1, 2).reshape(-1, h, d),
                                           self.flush_slots[gi], self.groups[gi].blocks_per_chunk)
        keep = self.capacity - q
        if keep:
            if undo:
                self._undo[layer_idx] = (tk[:, :, lead:].clone(), tv[:, :, lead:].clone())
            tk[:, :, lead:lead + keep] = tk[:, :, lead + q:].clone()
            tv[:, :, lead:lead + keep] = tv[:, :, lead + q:].clone()

    def _attend(self, layer_idx: int, query: torch.Tensor, padding: torch.Tensor | None, scaling: float | None,
                softcap: float, max_query: int) -> torch.Tensor:
        """The "pagedkv" attention of a graph step (the padding and the sliding window come from the
        decoder's own entry mask)."""
        cache = self.cache
        layer = cache.layers[layer_idx]
        pages = cache._pages[layer_idx]
        gi = self.group_ids[layer_idx]
        key = (gi, self.leads[layer_idx])
        f = pages.fmt
        out = ops.paged_attention(
            query, pages.k_chunks, pages.v_chunks, self.op_table[key], self.lens[key], skip=self.skip[key],
            k_tail=self.tail_k[layer_idx], v_tail=self.tail_v[layer_idx], kv_mask=self.mask[key], mask_offset=0,
            k_format=FORMATS[f.key], v_format=FORMATS[f.value], k_group=pages.key_group, v_group=pages.value_group,
            block_size=cache.block_size, blocks_per_chunk=self.groups[gi].blocks_per_chunk,
            num_kv_heads=cache.num_kv_heads, scale=scaling if scaling is not None else cache.head_dim ** -0.5,
            softcap=softcap, window=0)
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
                self.last_flush = (self.num_tokens, self.num_paged)
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
        for g, w in zip(self.groups, self.windows):
            g.truncate(p)
            if w and self.last_flush is not None:
                # Eager decode frees the blocks before the window of the step that flushed (the step
                # before the one that flushed here: its token's window), so the states agree.
                n_f, p_f = self.last_flush
                g.drop_front(min(max(n_f - w, 0), p_f))
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
        out = self.model(input_ids=self.ids, position_ids=self.pos, use_cache=True, **cache_kwargs(self.model, self.cache))
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
