"""``PagedKVCache``: a drop-in replacement for transformers' ``DynamicCache`` that stores K/V in
quantized pages.

``update`` returns dense K/V (dequantized pages plus the full-precision residual window), so it is
correct with every attention implementation. Beam search, ``crop``, batch repeat/select and
``reset`` work on block tables (shared blocks with reference counts, copy-on-write), not copies.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from pagedkv import _C, ops
from pagedkv.config import (
    DEFAULT_RESIDUAL_LENGTH,
    FORMATS,
    GROUPED,
    KEY,
    VALUE,
    LayerFormat,
    group_for,
    resolve_layer_formats,
)
from pagedkv.storage import LayerPages, PagedGroup

BudgetExhaustedError = _C.BudgetExhaustedError
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# transformers >= 5.2x: crop(tokens_to_remove <= 0); earlier 5.x: crop(max_length), negative = remove.
_CROP_TAKES_REMOVAL = "tokens_to_remove" in inspect.signature(Cache.crop).parameters


class PagedLayer(CacheLayerMixin):
    """Per-layer view of a :class:`PagedKVCache` (what ``cache.layers[i]`` holds).

    It keeps the layer's token count and its full-precision residual window; pages and block
    tables live in the cache's attention groups.
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, cache: "PagedKVCache", layer_idx: int, sliding_window: int | None):
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.num_tokens = 0  # positions seen (the sequence length)
        self.num_paged = 0   # positions [0, num_paged) are in pages; the rest in the residual
        self.residual_keys: torch.Tensor | None = None    # [batch, num_kv_heads, num_tokens - num_paged, head_dim]
        self.residual_values: torch.Tensor | None = None
        # Fused attention: (first paged position, end of paged positions, tail keys, tail values) the
        # "pagedkv" attention of the current forward step reads, set by update and consumed by it.
        self._pending: tuple[int, int, torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Storage is created by the cache on the first ``update``; nothing to do here."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._cache.update(key_states, value_states, self.layer_idx)

    def get_seq_length(self) -> int:
        return self.num_tokens

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older 5.x passed cache_position
            query_length = int(query_length.shape[0])
        if not self.is_sliding:
            return self.num_tokens + query_length, 0
        w = self.sliding_window
        kv_offset = max(self.num_tokens - w + 1, 0)
        kv_length = (w - 1 + query_length) if self.num_tokens >= w else self.num_tokens + query_length
        return kv_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def get_max_cache_shape(self) -> int:
        return self.get_max_length()

    def reset(self) -> None:
        self.num_tokens = 0
        self.num_paged = 0
        self.residual_keys = self.residual_values = None
        self._pending = None
        self.is_initialized = False

    def _select_residual(self, index: torch.Tensor) -> None:
        if self.residual_keys is not None:
            self.residual_keys = self.residual_keys.index_select(0, index.to(self.residual_keys.device))
            self.residual_values = self.residual_values.index_select(0, index.to(self.residual_values.device))


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _layer_windows(cfg: Any, num_layers: int) -> list[int | None]:
    """Sliding window per layer (None for full attention), following the config's layer types."""
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if layer_types is None:
        layer_types = ["sliding_attention" if window is not None else "full_attention"] * num_layers
    out: list[int | None] = []
    for i, t in enumerate(layer_types[:num_layers]):
        if t == "full_attention":
            out.append(None)
        elif t == "sliding_attention":
            if not window:
                raise ValueError(f"layer {i} is 'sliding_attention' but config.sliding_window={window!r}")
            out.append(int(window))
        else:
            raise NotImplementedError(f"PagedKVCache does not support layer type {t!r} (layer {i})")
    return out


class PagedKVCache(Cache):
    """Quantized, paged KV cache; a drop-in replacement for ``DynamicCache``.

    Parameters
    ----------
    config:
        The model config (``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``, ``layer_types``,
        ``sliding_window`` are read). Alternatively give ``num_layers``, ``num_kv_heads`` and ``head_dim``.
    kv_format:
        Format of keys and values: ``fp32 bf16 fp16 fp8_e4m3 int8 int4 int2 nf4``.
    key_format, value_format:
        Override the key or value format.
    layer_formats:
        Per-layer formats: a list (one entry per layer) or a mapping ``{layer: fmt}``; each entry is a
        format name or a ``(key_format, value_format)`` pair.
    block_size:
        Tokens per page (a multiple of 16). Defaults to 64 when a grouped format is used, else 16.
    residual_length:
        Newest tokens kept in full precision (only with grouped formats; default 128). Keys are quantized
        per channel over whole groups of ``key_group_size`` tokens once they leave this window.
    key_group_size, value_group_size:
        Quantization groups of grouped formats: tokens per key group (default ``min(64, block_size)``),
        channels per value group (default 64 for int4/nf4, 32 for int2, capped at ``head_dim``).
    max_memory_bytes, max_blocks:
        Budget of the paged storage: total bytes over all layers, and blocks per attention group. An
        ``update`` that would exceed it raises :class:`pagedkv.BudgetExhaustedError` and changes nothing.
    blocks_per_chunk:
        Blocks added per growth step (default: about 32 MiB over the group's layers).
    check_finite:
        Reject NaN/Inf key or value states with ``ValueError`` (one reduction per update).
    attn_implementation:
        ``"pagedkv"`` makes ``update`` return only the new full-precision tail for the fused
        ``"pagedkv"`` attention (which reads the pages directly); anything else returns dense K/V.
        Default: follow ``config._attn_implementation`` at each update (the model's own choice).
    """

    def __init__(
        self,
        config: Any = None,
        kv_format: str = "bf16",
        *,
        key_format: str | None = None,
        value_format: str | None = None,
        layer_formats: Sequence[Any] | Mapping[int, Any] | None = None,
        block_size: int | None = None,
        residual_length: int | None = None,
        key_group_size: int | None = None,
        value_group_size: int | None = None,
        max_memory_bytes: int | None = None,
        max_blocks: int | None = None,
        blocks_per_chunk: int | None = None,
        check_finite: bool = True,
        attn_implementation: str | None = None,
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
    ):
        cfg = _text_config(config) if config is not None else None
        if cfg is not None:
            num_layers = num_layers if num_layers is not None else cfg.num_hidden_layers
            heads = getattr(cfg, "num_attention_heads", None)
            num_kv_heads = num_kv_heads if num_kv_heads is not None else (getattr(cfg, "num_key_value_heads", None) or heads)
            if head_dim is None:
                head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        if num_layers is None or num_kv_heads is None or head_dim is None:
            raise ValueError("PagedKVCache needs a model config, or num_layers, num_kv_heads and head_dim")
        for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        windows = _layer_windows(cfg, num_layers) if cfg is not None else [None] * num_layers
        formats = resolve_layer_formats(num_layers, kv_format, key_format, value_format, layer_formats)
        grouped = any(f.grouped for f in formats)
        grouped_keys = any(f.key in GROUPED for f in formats)
        if block_size is None:
            block_size = 64 if grouped else 16
        if not isinstance(block_size, int) or block_size <= 0 or block_size % 16:
            raise ValueError(f"block_size must be a positive multiple of 16, got {block_size!r}")
        if residual_length is None:
            residual_length = DEFAULT_RESIDUAL_LENGTH if grouped else 0
        if not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length must be an int >= 0, got {residual_length!r}")
        if max_memory_bytes is not None and (not isinstance(max_memory_bytes, int) or max_memory_bytes < 0):
            raise ValueError(f"max_memory_bytes must be an int >= 0 or None, got {max_memory_bytes!r}")
        if max_blocks is not None and (not isinstance(max_blocks, int) or max_blocks < 0):
            raise ValueError(f"max_blocks must be an int >= 0 or None, got {max_blocks!r}")

        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.residual_length = residual_length if grouped else 0
        self.layer_formats = formats
        self.check_finite = check_finite
        self._cfg = cfg
        self._attn_implementation = attn_implementation
        self.max_memory_bytes = max_memory_bytes
        self._max_blocks = max_blocks
        self._blocks_per_chunk = blocks_per_chunk
        key_group = group_for("int4", KEY, head_dim, key_group_size, None, block_size) if grouped_keys else 1
        # Positions leave the residual window in whole key groups.
        self.flush_quantum = key_group
        self._pages = {
            i: LayerPages(
                f, num_kv_heads, head_dim, block_size,
                group_for(f.key, KEY, head_dim, key_group_size, value_group_size, block_size),
                group_for(f.value, VALUE, head_dim, key_group_size, value_group_size, block_size),
            )
            for i, f in enumerate(formats)
        }
        self._windows = windows
        super().__init__(layers=[PagedLayer(self, i, w) for i, w in enumerate(windows)])
        self._build_groups()

    # ------------------------------------------------------------------------------------------
    # storage
    # ------------------------------------------------------------------------------------------
    def _build_groups(self) -> None:
        self._budget = _C.MemoryBudget(-1 if self.max_memory_bytes is None else self.max_memory_bytes)
        by_window: dict[int | None, list[int]] = {}
        for i, w in enumerate(self._windows):
            by_window.setdefault(w, []).append(i)
        self._groups: list[PagedGroup] = []
        self._group_of: list[PagedGroup] = [None] * len(self._windows)  # type: ignore[list-item]
        for w, ids in by_window.items():
            g = PagedGroup(ids, self._pages, self.block_size, w, self._budget,
                           -1 if self._max_blocks is None else self._max_blocks, self._blocks_per_chunk)
            self._groups.append(g)
            for i in ids:
                self._group_of[i] = g
        self._batch_size: int | None = None
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None

    @property
    def fused(self) -> bool:
        """Whether ``update`` hands K/V to the fused ``"pagedkv"`` attention instead of returning them dense."""
        impl = self._attn_implementation
        if impl is None:
            impl = getattr(self._cfg, "_attn_implementation", None)
        return impl == "pagedkv"

    def _target_paged(self, group: PagedGroup, num_tokens: int) -> int:
        """Positions that belong in pages once the sequence has ``num_tokens`` positions."""
        if self.residual_length == 0 and self.flush_quantum == 1:
            return num_tokens
        q = max(num_tokens - self.residual_length, 0) // self.flush_quantum * self.flush_quantum
        return max(q, group.num_paged)

    # ------------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------------
    def _check_layer_idx(self, layer_idx: Any) -> int:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx must be an int, got {type(layer_idx).__name__} {layer_idx!r}")
        if not 0 <= layer_idx < len(self.layers):
            raise IndexError(f"layer_idx={layer_idx} is out of range for a cache of {len(self.layers)} layers")
        return layer_idx

    def _check_states(self, key_states: Any, value_states: Any) -> None:
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be [batch, num_kv_heads, seq_len, head_dim], got shape {tuple(t.shape)}")
            if t.shape[1] != self.num_kv_heads:
                raise ValueError(f"{name} has {t.shape[1]} KV heads (shape {tuple(t.shape)}) but the config has "
                                 f"num_key_value_heads={self.num_kv_heads}")
            if t.shape[3] != self.head_dim:
                raise ValueError(f"{name} has head_dim {t.shape[3]} (shape {tuple(t.shape)}) but the config has "
                                 f"head_dim={self.head_dim}")
        if value_states.shape != key_states.shape:
            raise ValueError(f"value_states shape {tuple(value_states.shape)} != key_states shape {tuple(key_states.shape)}")
        if value_states.device != key_states.device or value_states.dtype != key_states.dtype:
            raise ValueError(f"value_states ({value_states.dtype}, {value_states.device}) must match key_states "
                             f"({key_states.dtype}, {key_states.device})")
        if self._device is not None:
            if key_states.device != self._device:
                raise ValueError(f"key_states is on {key_states.device} but the cache lives on {self._device}")
            if key_states.dtype != self._dtype:
                raise TypeError(f"key_states is {key_states.dtype} but the cache was filled with {self._dtype}")
            if key_states.shape[0] != self._batch_size:
                raise ValueError(f"key_states has batch size {key_states.shape[0]} but the cache holds "
                                 f"{self._batch_size} sequences")
        if self.check_finite:
            # One pass over both on CPU (the per-call overhead of isfinite().all() adds up per layer).
            if key_states.device.type == "cpu" and torch.ops.pagedkv.all_finite(key_states, value_states):
                return
            for name, t in (("key_states", key_states), ("value_states", value_states)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name} contains NaN or Inf (check_finite=True); nothing was stored")

    # ------------------------------------------------------------------------------------------
    # the Cache API
    # ------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key/value_states [batch, num_kv_heads, seq_len, head_dim]`` of one layer and return
        the layer's dense K/V (what ``DynamicCache`` would return)."""
        layer_idx = self._check_layer_idx(layer_idx)
        self._check_states(key_states, value_states)
        layer = self.layers[layer_idx]
        group = self._group_of[layer_idx]
        if self._batch_size is None:
            for g in self._groups:
                g.set_batch(key_states.shape[0])
            self._batch_size = key_states.shape[0]
            self._device, self._dtype = key_states.device, key_states.dtype
        device = key_states.device
        old_tokens, old_paged = layer.num_tokens, layer.num_paged
        new_tokens = old_tokens + key_states.shape[2]
        target = self._target_paged(group, new_tokens)
        visible = max(old_tokens - layer.sliding_window + 1, 0) if layer.is_sliding else 0
        if target > group.num_paged:
            if layer.is_sliding:
                group.drop_front(visible)
            group.advance(target, device)  # BudgetExhaustedError: this layer is unchanged
        if layer.residual_keys is not None:
            tail_k = torch.cat([layer.residual_keys, key_states], dim=2)
            tail_v = torch.cat([layer.residual_values, value_states], dim=2)
        else:
            tail_k, tail_v = key_states, value_states
        # Dense result: visible paged positions, then the full-precision tail.
        first_tail = max(visible - old_paged, 0)
        fused = self.fused
        if fused:
            # The fused attention reads pages [visible, old_paged) in place; flushing below writes
            # only positions >= old_paged, so they stay valid until it runs.
            tk, tv = tail_k[:, :, first_tail:], tail_v[:, :, first_tail:]
            layer._pending = (visible, old_paged, tk, tv)
            out_k, out_v = tk.view(tk.shape), tv.view(tv.shape)
            out_k._pagedkv_ctx = out_v._pagedkv_ctx = (self, layer_idx)
        else:
            out_k, out_v = self._dense(layer_idx, visible, old_paged, tail_k[:, :, first_tail:],
                                       tail_v[:, :, first_tail:])
        flush = target - old_paged
        if flush > 0:
            group.write(layer_idx, old_paged, tail_k[:, :, :flush], tail_v[:, :, :flush])
        rest = new_tokens - target
        if rest > 0:
            # Copy: a view would pin the whole (possibly prompt-sized) tail in memory.
            layer.residual_keys = tail_k[:, :, flush:].clone() if flush > 0 else tail_k
            layer.residual_values = tail_v[:, :, flush:].clone() if flush > 0 else tail_v
        else:
            layer.residual_keys = layer.residual_values = None
        layer.num_tokens, layer.num_paged = new_tokens, target
        layer.is_initialized = True
        return out_k, out_v

    def _dense(self, layer_idx: int, begin: int, end: int, tail_k: torch.Tensor, tail_v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages ``[begin, end)`` of a layer dequantized, then the full-precision tail."""
        if begin >= end:
            return tail_k, tail_v
        pk, pv = self._group_of[layer_idx].read(layer_idx, begin, end, tail_k.dtype, tail_k.device)
        return torch.cat([pk, tail_k], dim=2), torch.cat([pv, tail_v], dim=2)

    def _pending_step(self, layer_idx: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        pending = self.layers[layer_idx]._pending
        if pending is None:
            raise RuntimeError(f"layer {layer_idx} has no pending attention step: call update first")
        return pending

    def _dense_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense K/V of the pending fused step of a layer (the dense path of the "pagedkv" attention)."""
        pending = self._pending_step(layer_idx)
        self.layers[layer_idx]._pending = None
        return self._dense(layer_idx, *pending)

    def _attend(self, layer_idx: int, query: torch.Tensor, padding: torch.Tensor | None, scaling: float | None,
                softcap: float, max_query: int) -> torch.Tensor | None:
        """Fused attention of ``query [B, Hq, Lq, D]`` for the pending step of a layer; returns
        ``[B, Lq, Hq, D]``, or None (pending kept) when the dense path suits the query better."""
        layer = self.layers[layer_idx]
        begin, end, tk, tv = self._pending_step(layer_idx)
        q_len = query.shape[2]
        if q_len > max_query or (end <= begin and q_len > 1):
            return None
        layer._pending = None
        group = self._group_of[layer_idx]
        pages = self._pages[layer_idx]
        table, lens, skip = group.attention_index(begin, end, query.device)
        if padding is not None:
            padding = padding.to(query.device)
        f = pages.fmt
        return ops.paged_attention(
            query, pages.k_chunks, pages.v_chunks, table, lens, skip=skip, k_tail=tk, v_tail=tv, kv_mask=padding,
            mask_offset=begin, k_format=FORMATS[f.key], v_format=FORMATS[f.value], k_group=pages.key_group,
            v_group=pages.value_group, block_size=self.block_size, blocks_per_chunk=group.blocks_per_chunk,
            num_kv_heads=self.num_kv_heads, scale=scaling if scaling is not None else self.head_dim ** -0.5,
            softcap=softcap, window=layer.sliding_window or 0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if not isinstance(layer_idx, int) or layer_idx < 0:
            raise IndexError(f"layer_idx must be an int >= 0, got {layer_idx!r}")
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].num_tokens

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        if layer_idx >= len(self.layers):
            q = int(query_length.shape[0]) if isinstance(query_length, torch.Tensor) else query_length
            return q, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_max_length()

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self._batch_size is not None

    @property
    def batch_size(self) -> int:
        return -1 if self._batch_size is None else self._batch_size

    @property
    def max_batch_size(self) -> int:
        return self.batch_size

    @property
    def max_cache_len(self) -> int:
        return -1

    def _reorder_rows(self, order: list[int]) -> None:
        """Batch row ``i`` becomes old row ``order[i]``: block tables are forked, never copied."""
        if self._batch_size is None:
            return
        for j in order:
            if not 0 <= j < self._batch_size:
                raise IndexError(f"batch index {j} is out of range for a batch of {self._batch_size}")
        for g in self._groups:
            g.reorder(order)
        index = torch.tensor(order, dtype=torch.long)
        for layer in self.layers:
            layer._select_residual(index)
        self._batch_size = len(order)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` continues beam ``beam_idx[i]`` (shared blocks, copy-on-write)."""
        if not isinstance(beam_idx, torch.Tensor) or beam_idx.dim() != 1:
            raise ValueError(f"beam_idx must be a 1-D tensor of batch indices, got {beam_idx!r}")
        if self._batch_size is not None and beam_idx.numel() != self._batch_size:
            raise ValueError(f"beam_idx has {beam_idx.numel()} entries but the cache holds {self._batch_size} sequences")
        self._reorder_rows([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        if self._batch_size is not None:
            self._reorder_rows([i for i in range(self._batch_size) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._batch_size is None:
            return
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if idx.numel() != self._batch_size:
                raise ValueError(f"boolean indices have {idx.numel()} entries, batch is {self._batch_size}")
            idx = idx.nonzero().flatten()
        self._reorder_rows([int(i) for i in idx.reshape(-1).tolist()])

    def crop(self, max_length: int) -> None:
        """Drop the newest tokens (assisted decoding). ``crop(-n)`` removes ``n`` tokens; on transformers
        versions whose ``crop`` takes a length, ``crop(n >= 0)`` keeps the first ``n``."""
        if isinstance(max_length, torch.Tensor) and max_length.numel() == 1 and not max_length.is_floating_point():
            max_length = int(max_length)  # transformers 5.17's assisted decoding passes a 0-d tensor
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"crop takes an int, got {max_length!r}")
        current = self.get_seq_length()
        if max_length < 0:
            new_len = current + max_length
        elif _CROP_TAKES_REMOVAL:
            if max_length > 0:
                raise ValueError(f"crop({max_length}): pass a negative number of tokens to remove")
            new_len = current
        else:
            new_len = max_length
        if new_len < 0:
            raise ValueError(f"crop({max_length}) goes past the start: the cache holds {current} tokens")
        if new_len >= current or self._batch_size is None:
            return
        # Check every layer first, so a refused crop changes nothing.
        for layer in self.layers:
            if layer.is_sliding:
                needed = max(new_len - layer.sliding_window + 1, 0)
                if needed < self._group_of[layer.layer_idx].first_available:
                    raise ValueError(f"crop({max_length}) reaches tokens that sliding layer {layer.layer_idx} already "
                                     f"dropped (window {layer.sliding_window}); it can roll back only within its window")
        for g in self._groups:
            q = g.num_paged
            new_q = max(min(q, new_len // self.flush_quantum * self.flush_quantum), g.first_available)
            for i in g.layer_ids:
                layer = self.layers[i]
                if new_len >= q:
                    keep = new_len - q
                    if layer.residual_keys is not None:
                        layer.residual_keys = layer.residual_keys[:, :, :keep]
                        layer.residual_values = layer.residual_values[:, :, :keep]
                else:
                    # Tokens [new_q, new_len) move back from pages to the residual window (dequantized).
                    if new_len > new_q:
                        layer.residual_keys, layer.residual_values = g.read(i, new_q, new_len, self._dtype, self._device)
                    else:
                        layer.residual_keys = layer.residual_values = None
                    layer.num_paged = new_q
                layer.num_tokens = new_len
            if new_q < q:
                g.truncate(new_q)

    def reset(self) -> None:
        """Forget every sequence and release the page memory."""
        for layer in self.layers:
            layer.reset()
        for p in self._pages.values():
            p.release()
        for g in self._groups:
            g.release()
        self._build_groups()

    # ------------------------------------------------------------------------------------------
    # memory statistics
    # ------------------------------------------------------------------------------------------
    def memory_stats(self) -> dict[str, float]:
        """Bytes used by pages and the residual window, per token, and the bf16 ``DynamicCache`` equivalent.

        ``paged_bytes`` counts allocated blocks (whole blocks, all layers); ``reserved_bytes`` counts the
        page tensors held (grown in chunks); ``dense_bf16_bytes`` is what a bf16 ``DynamicCache`` stores
        for the same tokens (sliding layers: their window).
        """
        paged = sum(g.pool.num_used * g.pool.bytes_per_block for g in self._groups)
        reserved = sum(g.pool.reserved_bytes for g in self._groups)
        residual = 0
        dense = 0
        for layer in self.layers:
            if layer.residual_keys is not None:
                residual += layer.residual_keys.nbytes + layer.residual_values.nbytes
            kept = layer.num_tokens if not layer.is_sliding else min(layer.num_tokens, layer.sliding_window - 1)
            dense += 2 * 2 * (self._batch_size or 0) * self.num_kv_heads * self.head_dim * kept
        tokens = (self._batch_size or 0) * self.get_seq_length()
        used = paged + residual
        return {
            "paged_bytes": paged,
            "residual_bytes": residual,
            "bytes_used": used,
            "reserved_bytes": reserved + residual,
            "tokens": tokens,
            "bytes_per_token": used / tokens if tokens else 0.0,
            "dense_bf16_bytes": dense,
            "ratio_vs_bf16": used / dense if dense else 0.0,
        }

    def __repr__(self) -> str:
        fmts = {(f.key, f.value) for f in self.layer_formats}
        return (f"PagedKVCache(layers={len(self.layers)}, formats={sorted(fmts)}, block_size={self.block_size}, "
                f"residual_length={self.residual_length}, seq_len={self.get_seq_length()}, batch={self.batch_size})")
