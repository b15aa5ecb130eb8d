"""Paged storage: the page tensors of each layer and the block tables of each attention group.

One attention group (all full-attention layers, or all sliding layers of one window) shares one
:class:`pagedkv._C.BlockPool` and one :class:`pagedkv._C.BlockTables`: a block id names the same
token positions in every layer of the group, so blocks are allocated once per token block, not per
layer. Each layer owns its page tensors, one uint8 tensor per pool chunk, so growth never copies.
"""

from __future__ import annotations

import torch

from pagedkv import _C, ops
from pagedkv.config import FORMATS, KEY, VALUE, LayerFormat, layout

#: Target bytes of one pool growth step, summed over the group's layers.
CHUNK_TARGET_BYTES = 32 << 20
MAX_BLOCKS_PER_CHUNK = 1024


class LayerPages:
    """Key and value pages of one layer.

    Parameters
    ----------
    fmt:
        The layer's key and value formats.
    key_group, value_group:
        Quantization groups (tokens for grouped keys, channels for grouped values; 1 otherwise).
    """

    def __init__(self, fmt: LayerFormat, num_kv_heads: int, head_dim: int, block_size: int,
                 key_group: int, value_group: int):
        self.fmt = fmt
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.key_group = key_group
        self.value_group = value_group
        self.key_layout = layout(fmt.key, KEY, num_kv_heads, head_dim, block_size, key_group)
        self.value_layout = layout(fmt.value, VALUE, num_kv_heads, head_dim, block_size, value_group)
        self.k_chunks: list[torch.Tensor] = []
        self.v_chunks: list[torch.Tensor] = []

    @property
    def bytes_per_block(self) -> int:
        return self.key_layout["block_bytes"] + self.value_layout["block_bytes"]

    def ensure_chunks(self, pool: _C.BlockPool, device: torch.device) -> None:
        """Allocate the page tensors of pool chunks this layer does not hold yet."""
        while len(self.k_chunks) < pool.num_chunks:
            n = pool.chunk_blocks(len(self.k_chunks))
            self.k_chunks.append(torch.empty((n, self.key_layout["block_bytes"]), dtype=torch.uint8, device=device))
            self.v_chunks.append(torch.empty((n, self.value_layout["block_bytes"]), dtype=torch.uint8, device=device))

    def release(self) -> None:
        self.k_chunks.clear()
        self.v_chunks.clear()

    def write(self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, blocks_per_chunk: int) -> None:
        """Quantize ``key/value [num_tokens, num_kv_heads, head_dim]`` into ``slots [num_tokens]``."""
        ops.append(key, self.k_chunks, slots, format=FORMATS[self.fmt.key], role=KEY, group=self.key_group,
                   block_size=self.block_size, blocks_per_chunk=blocks_per_chunk)
        ops.append(value, self.v_chunks, slots, format=FORMATS[self.fmt.value], role=VALUE, group=self.value_group,
                   block_size=self.block_size, blocks_per_chunk=blocks_per_chunk)

    def read(self, block_table: torch.Tensor, seq_lens: torch.Tensor, skip: torch.Tensor | None, out_len: int,
             dtype: torch.dtype, blocks_per_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize to ``[num_seqs, num_kv_heads, out_len, head_dim]`` keys and values."""
        common = dict(block_size=self.block_size, blocks_per_chunk=blocks_per_chunk, num_kv_heads=self.num_kv_heads,
                      head_dim=self.head_dim, out_len=out_len, dtype=dtype)
        k = ops.gather(self.k_chunks, block_table, seq_lens, skip, format=FORMATS[self.fmt.key], role=KEY,
                       group=self.key_group, **common)
        v = ops.gather(self.v_chunks, block_table, seq_lens, skip, format=FORMATS[self.fmt.value], role=VALUE,
                       group=self.value_group, **common)
        return k, v

    def copy_blocks(self, pairs: torch.Tensor, blocks_per_chunk: int) -> None:
        ops.copy_blocks(self.k_chunks, pairs, block_bytes=self.key_layout["block_bytes"], blocks_per_chunk=blocks_per_chunk)
        ops.copy_blocks(self.v_chunks, pairs, block_bytes=self.value_layout["block_bytes"], blocks_per_chunk=blocks_per_chunk)


class GroupStorage:
    """What the layers of one attention group share across every cache of a store: the block pool, the
    block tables (each cache holds its own sequences in them) and, with prefix caching, the prefix index."""

    def __init__(self, layer_ids: list[int], pages: dict[int, LayerPages], block_size: int,
                 sliding_window: int | None, budget: _C.MemoryBudget, max_blocks: int,
                 blocks_per_chunk: int | None):
        self.layer_ids = layer_ids
        self.pages = pages
        self.block_size = block_size
        self.sliding_window = sliding_window
        bytes_per_block = sum(pages[i].bytes_per_block for i in layer_ids)
        if blocks_per_chunk is None:
            blocks_per_chunk = max(1, min(MAX_BLOCKS_PER_CHUNK, CHUNK_TARGET_BYTES // bytes_per_block))
        self.pool = _C.BlockPool(bytes_per_block, blocks_per_chunk, max_blocks, budget)
        self.tables = _C.BlockTables(self.pool, block_size)
        self.index: _C.PrefixIndex | None = None


class PagedGroup:
    """One cache's batch of sequences in a :class:`GroupStorage`.

    All sequences of the batch hold the same positions ``[start, num_paged)`` in pages, as in a
    transformers batch (left padding is stored like any token).
    """

    def __init__(self, storage: GroupStorage):
        self.storage = storage
        self.layer_ids = storage.layer_ids
        self.pages = storage.pages
        self.block_size = storage.block_size
        self.sliding_window = storage.sliding_window
        self.pool = storage.pool
        self.tables = storage.tables
        self.seqs: list[int] = []
        self._table_cache: tuple[torch.device, torch.Tensor] | None = None
        self._index_cache: dict[tuple[int, int, torch.device], tuple[torch.Tensor, ...]] = {}
        self._slot_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    @property
    def blocks_per_chunk(self) -> int:
        return self.pool.blocks_per_chunk

    @property
    def num_paged(self) -> int:
        return self.tables.num_tokens(self.seqs[0]) if self.seqs else 0

    @property
    def first_available(self) -> int:
        """First position whose block is still held (sliding groups drop whole blocks)."""
        return self.tables.dropped_blocks(self.seqs[0]) * self.block_size if self.seqs else 0

    @property
    def start(self) -> int:
        return self.tables.start(self.seqs[0]) if self.seqs else 0

    def _changed(self) -> None:
        self._table_cache = None
        self._index_cache.clear()
        self._slot_cache.clear()

    def set_batch(self, batch_size: int) -> None:
        self.tables.free_sequences(self.seqs)
        self.seqs = self.tables.add_sequences(batch_size)
        self._changed()

    def attach(self, rows: list[list[int]], num_tokens: int) -> None:
        """Sequences holding positions ``[0, num_tokens)`` in the given (cached) blocks, one per row."""
        self.tables.free_sequences(self.seqs)
        self.seqs = []
        for blocks in rows:
            self.seqs.append(self.tables.add_sequence_with_blocks(blocks, num_tokens))
        self._changed()

    def block_table(self, device: torch.device) -> torch.Tensor:
        """int32 ``[num_seqs, max_blocks_per_seq]`` of the kept blocks, cached until the tables change."""
        if self._table_cache is None or self._table_cache[0] != device:
            t = torch.from_numpy(self.tables.block_table(self.seqs, 1)).to(device)
            self._table_cache = (device, t)
        return self._table_cache[1]

    def attention_index(self, begin: int, end: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(block_table, seq_lens, skip) of positions ``[begin, end)`` for ``paged_attention``; shared by
        the group's layers within a step and cached until the tables change."""
        key = (begin, end, device)
        hit = self._index_cache.get(key)
        if hit is None:
            n = len(self.seqs)
            table = self.block_table(device)
            if end > begin and n:
                first = begin // self.block_size - self.tables.dropped_blocks(self.seqs[0])
                last = -(-end // self.block_size) - self.tables.dropped_blocks(self.seqs[0])
                table = table[:, first:last].contiguous()
            else:
                table = table[:, :0].contiguous()
            lens = torch.full((n,), max(end - begin, 0), dtype=torch.int32, device=device)
            skip = torch.full((n,), begin % self.block_size, dtype=torch.int32, device=device)
            hit = self._index_cache[key] = (table, lens, skip)
        return hit

    def slots(self, begin: int, end: int, device: torch.device) -> torch.Tensor:
        """Slot ids of positions ``[begin, end)`` of every sequence, int64 ``[num_seqs * (end - begin)]``;
        shared by the group's layers within a step and cached until the tables change."""
        key = (begin, end, device)
        hit = self._slot_cache.get(key)
        if hit is None:
            table = self.block_table(device).to(torch.int64)
            pos = torch.arange(begin, end, device=device)
            dropped = self.tables.dropped_blocks(self.seqs[0])
            hit = (table[:, pos // self.block_size - dropped] * self.block_size + pos % self.block_size).reshape(-1)
            self._slot_cache[key] = hit
        return hit

    def advance(self, new_paged: int, device: torch.device) -> None:
        """Reserve positions up to ``new_paged`` for every sequence (all-or-nothing)."""
        n = new_paged - self.num_paged
        if n <= 0:
            return
        _, copies = self.tables.append(self.seqs, n)  # raises BudgetExhaustedError, nothing changed
        self._changed()
        for i in self.layer_ids:
            self.pages[i].ensure_chunks(self.pool, device)
        if len(copies):
            pairs = torch.from_numpy(copies).to(device)
            for i in self.layer_ids:
                self.pages[i].copy_blocks(pairs, self.blocks_per_chunk)

    def can_advance(self, new_paged: int) -> bool:
        n = new_paged - self.num_paged
        return n <= 0 or self.pool.can_allocate(self.tables.blocks_needed(self.seqs, n))

    def drop_front(self, new_start: int) -> None:
        """Forget positions before ``new_start`` (sliding window); frees whole blocks."""
        new_start = min(new_start, self.num_paged)
        if new_start > self.start:
            for s in self.seqs:
                self.tables.drop_front(s, new_start)
            self._changed()

    def skip_to(self, new_start: int) -> None:
        """Forget every position before ``new_start``, a block boundary at or past ``num_paged``: the
        positions in between are never stored (a sliding window that a long append overtakes); frees
        every block."""
        for s in self.seqs:
            self.tables.skip_to(s, new_start)
        self._changed()

    def truncate(self, new_paged: int) -> None:
        for s in self.seqs:
            self.tables.truncate(s, new_paged)
        self._changed()

    def reorder(self, order: list[int]) -> None:
        """New batch row ``i`` becomes old row ``order[i]``, sharing its blocks (no copies)."""
        old = self.seqs
        self.seqs = self.tables.fork_many([old[j] for j in order])
        self.tables.free_sequences(old)
        self._changed()

    def release(self) -> None:
        self.tables.free_sequences(self.seqs)
        self.seqs = []
        self._changed()

    def read(self, layer: int, begin: int, end: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize positions ``[begin, end)`` of every sequence for one layer."""
        n = len(self.seqs)
        first_block = begin // self.block_size - self.tables.dropped_blocks(self.seqs[0]) if n else 0
        table = self.block_table(device)[:, first_block:]
        if end <= begin or n == 0:
            table = table[:, :0]
        lens = torch.full((n,), max(end - begin, 0), dtype=torch.int32, device=device)
        skip = torch.full((n,), begin % self.block_size, dtype=torch.int32, device=device)
        return self.pages[layer].read(table, lens, skip, max(end - begin, 0), dtype, self.blocks_per_chunk)

    def write(self, layer: int, begin: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``key/value [num_seqs, num_kv_heads, n, head_dim]`` at positions ``[begin, begin + n)``."""
        n = key.shape[2]
        if n == 0:
            return
        slots = self.slots(begin, begin + n, key.device)
        h, d = key.shape[1], key.shape[3]
        self.pages[layer].write(key.transpose(1, 2).reshape(-1, h, d), value.transpose(1, 2).reshape(-1, h, d), slots,
                                self.blocks_per_chunk)
