"""``PagedKVCache``: a drop-in replacement for transformers' ``DynamicCache`` that stores K/V in
quantized pages.

``update`` returns dense K/V (dequantized pages plus the full-precision residual window), so it is
correct with every attention implementation. Beam search, ``crop``, batch repeat/select and
``reset`` work on block tables (shared blocks with reference counts, copy-on-write), not copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from pagedkv import _C, attention, ops
from pagedkv.config import FORMATS
from pagedkv.hf_compat import CROP_TAKES_REMOVAL
from pagedkv.storage import PagedGroup
from pagedkv.store import KVStore, as_token_rows, text_config

BudgetExhaustedError = _C.BudgetExhaustedError
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class PagedLayer(CacheLayerMixin):
    """Per-layer view of a :class:`PagedKVCache` (what ``cache.layers[i]`` holds).

    It keeps the layer's token count and its full-precision residual window; pages and block
    tables live in the cache's attention groups.
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, cache: "PagedKVCache", layer_idx: int, sliding_window: int | None, window: int | None,
                 sinks: int, exact: int, rotated: bool):
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window  # the model's sliding window (None: full attention)
        self.is_sliding = sliding_window is not None
        # Positions a query sees: the model's window, or the cache's recent_window on full layers.
        self.window = window
        self.sinks = sinks  # attention-sink positions kept beside the window (full layers, recent_window)
        self.exact = exact  # leading positions whose pages are overridden by exact copies (grouped keys)
        self.base_exact = exact  # exact_prefix; a left-padded batch moves the exact positions past its padding
        self.rotated = rotated  # values are stored rotated (KVStore.rotation)
        # The first max(sinks, exact) positions in full precision: [batch, num_kv_heads, n, head_dim], as stored.
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
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

    def visible_start(self) -> int:
        """First position the next step's queries see (0 without a window)."""
        return max(self.num_tokens - self.window + 1, 0) if self.window else 0

    def num_sinks_shown(self, visible: int) -> int:
        """Sink positions prepended to the keys: those that have left the window."""
        return min(self.sinks, visible)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older 5.x passed cache_position
            query_length = int(query_length.shape[0])
        visible = self.visible_start()
        # Sinks sit just before the window (they are re-rotated there), so the keys are the
        # contiguous positions [visible - sinks, num_tokens + query_length).
        sinks = self.num_sinks_shown(visible)
        return sinks + self.num_tokens - visible + query_length, visible - sinks

    def get_max_length(self) -> int:
        return self.window if self.window else -1

    def get_max_cache_shape(self) -> int:
        return self.get_max_length()

    def reset(self) -> None:
        self.num_tokens = 0
        self.num_paged = 0
        self.residual_keys = self.residual_values = None
        self.sink_keys = self.sink_values = None
        self._pending = None
        self.exact = self.base_exact
        self.is_initialized = False

    def _select_residual(self, index: torch.Tensor) -> None:
        for name in ("residual_keys", "residual_values", "sink_keys", "sink_values"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))


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
        Tokens per page (a multiple of 16). Defaults to 64 (``pagedkv.config.DEFAULT_BLOCK_SIZE``).
    residual_length:
        Newest tokens kept in full precision (only with grouped formats; default 128). Keys are quantized
        per channel over whole groups of ``key_group_size`` tokens once they leave this window.
    key_group_size, value_group_size:
        Quantization groups of grouped formats: tokens per key group (default ``min(64, block_size)``,
        int2 32), channels per value group (default 64, or the largest power of two dividing
        ``head_dim`` below that: 16 for head_dim 80).
    exact_prefix:
        Attention sinks: the first ``exact_prefix`` positions (default 1 with grouped key formats) are
        also kept in full precision and left out of their key group's range; the fused and the dense
        path read them exact. With left padding the first positions of a padded row are padding, so
        that row's first real token is quantized as usual.
    value_rotation:
        Store the values of layers with grouped value formats (int4/int2/nf4) under a fixed randomized
        Hadamard rotation along head_dim (default on); outputs are rotated back, so attention is
        unchanged up to rounding and the quantization error of the values drops.
    max_memory_bytes, max_blocks:
        Budget of the paged storage: total bytes over all layers, and blocks per attention group. An
        ``update`` that would exceed it raises :class:`pagedkv.BudgetExhaustedError` and changes nothing.
    blocks_per_chunk:
        Blocks added per growth step (default: about 32 MiB over the group's layers).
    check_finite:
        Reject NaN/Inf key or value states with ``ValueError`` (one reduction per update; on a GPU it
        also waits for the device once per layer; on the H100 its decode cost was within the run-to-run
        noise, see ``benchmarks/RESULTS.md``).
    attn_implementation:
        ``"pagedkv"`` makes ``update`` return only the new full-precision tail for the fused
        ``"pagedkv"`` attention (which reads the pages directly); anything else returns dense K/V.
        Default: follow ``config._attn_implementation`` at each update (the model's own choice).
    recent_window, sink_tokens, rotary:
        Streaming policy for inputs longer than the model's context or the budget (StreamingLLM):
        full-attention layers keep the newest ``recent_window`` positions (the current one included)
        plus the first ``sink_tokens`` positions. The sinks are stored in full precision and re-rotated
        (RoPE, with the model's ``rotary`` embedding module, e.g. ``model.model.rotary_emb``) so that
        they sit just before the window: every query-key distance stays below ``recent_window +
        sink_tokens``. ``recent_window`` alone is plain truncation.
    prefix_caching, eviction, ttl_seconds, salt, clock:
        Prefix caching and its eviction policy; see :class:`pagedkv.KVStore`.
    store:
        Share the paged storage (budget, pages, prefix index) of a :class:`pagedkv.KVStore` with other
        caches; storage options then come from the store and may not be given here.
    """

    def __init__(
        self,
        config: Any = None,
        kv_format: str | None = None,
        *,
        store: KVStore | None = None,
        check_finite: bool = True,
        attn_implementation: str | None = None,
        sink_tokens: int = 0,
        rotary: Any = None,
        **storage_options: Any,
    ):
        if store is None:
            store = KVStore(config, "bf16" if kv_format is None else kv_format, **storage_options)
            self._owns_store = True
        else:
            if not isinstance(store, KVStore):
                raise TypeError(f"store must be a pagedkv.KVStore, got {type(store).__name__}")
            if kv_format is not None or storage_options:
                given = (["kv_format"] if kv_format is not None else []) + sorted(storage_options)
                raise ValueError(f"storage options {given} must be given to the KVStore, not to a cache built on one")
            self._owns_store = False
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
        if sink_tokens and store.recent_window is None:
            raise ValueError("sink_tokens needs recent_window (the window the sinks stay beside)")
        if sink_tokens and rotary is None:
            raise ValueError("sink_tokens needs rotary=<the model's rotary embedding module> to re-rotate the sinks")
        self.store = store
        self.num_kv_heads = store.num_kv_heads
        self.head_dim = store.head_dim
        self.block_size = store.block_size
        self.residual_length = store.residual_length
        self.layer_formats = store.layer_formats
        self.flush_quantum = store.flush_quantum
        self.max_memory_bytes = store.max_memory_bytes
        self._pages = store.pages
        self.check_finite = check_finite
        self._cfg = text_config(config) if config is not None else store.config
        self._attn_implementation = attn_implementation
        self.sink_tokens = sink_tokens
        self.rotary = rotary
        self._token_ids: torch.Tensor | None = None
        self._exact_mask: tuple | None = None  # (padding, (begin, lead, end), reordered): see _exact_order_mask
        # Left padding of the prompt (note_padding): (first real position of each row [batch], the end
        # of the padded region, the width of the mask they come from), or None.
        self._lead_pad: tuple[torch.Tensor, int, int] | None = None
        self._static: Any = None  # a GraphDecoder's StaticDecodeState while one runs (graph_decode.py)
        layers = [PagedLayer(self, i, mw, w, sink_tokens if mw is None and w is not None else 0,
                             store.exact_layers[i], store.rotated_layers[i])
                  for i, (mw, w) in enumerate(zip(store.model_windows, store.windows))]
        super().__init__(layers=layers)
        self._build_groups()

    # ------------------------------------------------------------------------------------------
    # storage
    # ------------------------------------------------------------------------------------------
    def _build_groups(self) -> None:
        self._groups = [PagedGroup(g) for g in self.store.groups]
        self._group_of = [self._groups[self.store.group_of[i]] for i in range(len(self.layers))]
        self._budget = self.store.budget
        self._batch_size: int | None = None
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None

    def _acquire(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.store.bind(device, dtype)
        self._batch_size = batch_size
        self._device, self._dtype = device, dtype
        self.store.num_caches += 1

    @property
    def fused(self) -> bool:
        """Whether ``update`` hands K/V to the fused ``"pagedkv"`` attention instead of returning them dense."""
        impl = self._attn_implementation
        if impl is None:
            impl = getattr(self._cfg, "_attn_implementation", None)
        return impl == "pagedkv" and not self.sink_tokens

    def _target_paged(self, group: PagedGroup, num_tokens: int) -> int:
        """Positions that belong in pages once the sequence has ``num_tokens`` positions."""
        if self.residual_length == 0 and self.flush_quantum == 1:
            return num_tokens
        q = max(num_tokens - self.residual_length, 0) // self.flush_quantum * self.flush_quantum
        return max(q, group.num_paged)

    # ------------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------------
    def _check_not_static(self, what: str) -> None:
        if self._static is not None:
            raise RuntimeError(f"{what} is not available while a GraphDecoder runs on this cache: close() it first")

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
                tp = self.store.tp_size
                held = f"num_key_value_heads={self.store.total_kv_heads}" + (f" / tp_size={tp}" if tp > 1 else "")
                hint = ""
                if self.store.total_kv_heads % t.shape[1] == 0 and t.shape[1] < self.num_kv_heads:
                    hint = (f"; a tensor-parallel model gives each rank its share of the heads: build the cache "
                            f"with tp_size={self.store.total_kv_heads // t.shape[1]} (or tp_size='auto')")
                raise ValueError(f"{name} has {t.shape[1]} KV heads (shape {tuple(t.shape)}) but the cache holds "
                                 f"{self.num_kv_heads} ({held}){hint}")
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
            # One pass over both on CPU (the per-call overhead of isfinite().all() adds up per layer); on
            # a GPU one reduction and one synchronization for both (the host waits for the GPU here, once
            # per layer: check_finite=False lets decode run ahead of the device).
            if key_states.device.type == "cpu":
                if torch.ops.pagedkv.all_finite(key_states, value_states):
                    return
            elif bool(torch.isfinite(key_states).all() & torch.isfinite(value_states).all()):
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
        if self._static is not None:
            return self._static.update(key_states, value_states, layer_idx)
        self._check_states(key_states, value_states)
        layer = self.layers[layer_idx]
        group = self._group_of[layer_idx]
        if layer.rotated:
            value_states = self._rotate_values(value_states, False)
        if self._batch_size is None:
            self.store.bind(key_states.device, key_states.dtype)  # raises before anything changes
            for g in self._groups:
                g.set_batch(key_states.shape[0])
            self._acquire(key_states.shape[0], key_states.device, key_states.dtype)
        device = key_states.device
        old_tokens, old_paged = layer.num_tokens, layer.num_paged
        new_tokens = old_tokens + key_states.shape[2]
        target = self._target_paged(group, new_tokens)
        visible = layer.visible_start()
        if target > group.num_paged:
            if layer.window:
                group.drop_front(visible)
                # A prompt longer than the window: positions this update would page that no later
                # query sees are never stored (so a long prefill does not hold the whole prompt in
                # every sliding layer), when this step reads no page (they all go) and the blocks
                # from there on fit (else nothing is skipped, as if the call had not tried).
                bs = self.block_size
                skip = min(new_tokens - layer.window + 1, target) // bs * bs
                if (skip > group.num_paged and visible >= group.num_paged
                        and group.pool.can_allocate(len(group.seqs) * -(-(target - skip) // bs))):
                    group.skip_to(skip)
            if group.storage.index is not None:
                self.store.now()  # the time eviction (inside advance) compares against
            group.advance(target, device)  # BudgetExhaustedError: this layer is unchanged
        keep_first = max(layer.sinks, layer.exact)
        if old_tokens < keep_first:
            take = min(keep_first - old_tokens, key_states.shape[2])
            sk, sv = key_states[:, :, :take].clone(), value_states[:, :, :take].clone()
            if layer.sink_keys is not None:
                sk, sv = torch.cat([layer.sink_keys, sk], dim=2), torch.cat([layer.sink_values, sv], dim=2)
            layer.sink_keys, layer.sink_values = sk, sv
        if layer.residual_keys is not None:
            tail_k = torch.cat([layer.residual_keys, key_states], dim=2)
            tail_v = torch.cat([layer.residual_values, value_states], dim=2)
        else:
            tail_k, tail_v = key_states, value_states
        # New padded positions: fill the whole tail (a chunk that showed where a row's tokens start also
        # refills that row's earlier padding); decode steps, past the padding, skip it.
        lead_pad = self._lead_pad
        if lead_pad is not None and old_tokens < lead_pad[1] and lead_pad[0].shape[0] == tail_k.shape[0]:
            tail_k = self._fill_padding(tail_k, old_paged, layer.base_exact, lead_pad[0])
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
            shown = layer.num_sinks_shown(visible)
            if shown:
                out_k = torch.cat([self._rotate(layer.sink_keys[:, :, :shown], visible - shown), out_k], dim=2)
                out_v = torch.cat([layer.sink_values[:, :, :shown], out_v], dim=2)
            if layer.rotated:
                out_v = self._rotate_values(out_v, True)
        self._page_out(group, layer_idx, tail_k, tail_v, target, new_tokens)
        layer.is_initialized = True
        return out_k, out_v

    def _page_out(self, group: PagedGroup, layer_idx: int, tail_k: torch.Tensor, tail_v: torch.Tensor,
                  target: int, num_tokens: int) -> None:
        """Write the layer's full-precision positions ``[num_paged, target)`` (the first rows of
        ``tail_k/v``, which hold positions ``[num_paged, num_tokens)``) into pages; the rest of the tail
        becomes the residual window."""
        layer = self.layers[layer_idx]
        flush = target - layer.num_paged
        # A sliding group that skipped ahead (update) stores positions from its start only.
        first = max(group.start - layer.num_paged, 0) if layer.window else 0
        if flush > first:
            keys = tail_k[:, :, first:flush]
            lead = layer.exact - layer.num_paged
            if 0 < lead < tail_k.shape[2]:
                # The exact positions' codes are never read; give them the next position's keys so that
                # the sinks do not stretch their key group's range.
                keys = keys.clone()
                keys[:, :, :lead] = tail_k[:, :, lead:lead + 1]
            group.write(layer_idx, layer.num_paged + first, keys, tail_v[:, :, first:flush])
        if num_tokens > target:
            # Copy: a view would pin the whole (possibly prompt-sized) tail in memory.
            layer.residual_keys = tail_k[:, :, flush:].clone() if flush > 0 else tail_k
            layer.residual_values = tail_v[:, :, flush:].clone() if flush > 0 else tail_v
        else:
            layer.residual_keys = layer.residual_values = None
        layer.num_tokens, layer.num_paged = num_tokens, target

    def note_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Tell the cache which leading positions of the prompt are padding (``attention_mask [batch,
        positions]``, 0 / False = padding), before the prompt's ``update`` calls. The ``"pagedkv"`` mask
        function does this for transformers models; hand-written loops may call it themselves.

        With grouped key formats (int4 / int2 / nf4) a key group shares one range per channel over its
        tokens, so the keys of padded positions (whatever the model computed there; attention never
        reads them) would stretch the range of the real tokens beside them. The cache stores a padded
        position with the keys of its row's first real token after the exact ones instead, and moves
        the exact leading positions (``exact_prefix``) past the padding, so that each row's first real
        token stays exact as in an unpadded row (rows padded by up to a key group less
        ``exact_prefix``; not with prefix caching, whose exact rows are shared at a fixed count).
        Only an empty cache takes a new mask (and a chunked prefill, for a row that is still all
        padding); the decode steps' calls change nothing."""
        if self._static is not None:
            return
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
                raise ValueError("attention_mask must be a 2-D [batch, positions] tensor or None, got "
                                 f"{getattr(attention_mask, 'shape', attention_mask)!r}")
            if attention_mask.is_floating_point() or attention_mask.is_complex():
                raise TypeError(f"attention_mask must be bool or integer, got {attention_mask.dtype}")
            if self._batch_size is not None and attention_mask.shape[0] != self._batch_size:
                raise ValueError(f"attention_mask has {attention_mask.shape[0]} rows but the cache holds "
                                 f"{self._batch_size} sequences")
        lead = self._lead_pad
        if self.get_seq_length() > 0:
            # A chunked prefill whose first chunk was all padding in some row: a wider mask tells where
            # that row's tokens start (the exact positions stay as the first chunk set them).
            if (lead is not None and lead[1] == lead[2] and attention_mask is not None
                    and attention_mask.shape[1] > lead[2]):
                self._lead_pad = self._first_real(attention_mask)[:3]
            return
        self._lead_pad = None
        for layer in self.layers:
            layer.exact = layer.base_exact
        if attention_mask is None or attention_mask.shape[1] == 0:
            return
        first, end, width, rows = self._first_real(attention_mask)
        if end == 0:
            return
        self._lead_pad = (first, end, width)
        if self.store.prefix_caching:
            return
        for layer in self.layers:
            if layer.base_exact:
                layer.exact += max((f for f in rows if f + layer.base_exact <= self.flush_quantum), default=0)

    @staticmethod
    def _first_real(mask: torch.Tensor) -> tuple[torch.Tensor, int, int, list[int]]:
        """Each row's first unmasked position (the mask's width where it has none), their maximum, the
        width, and the positions as a list (one synchronization)."""
        real = mask != 0
        first = torch.where(real.any(1), real.to(torch.int8).argmax(1), real.shape[1])
        rows = first.tolist()
        return first, max(rows), real.shape[1], rows

    @staticmethod
    def _fill_padding(keys: torch.Tensor, begin: int, exact: int, first: torch.Tensor) -> torch.Tensor:
        """``keys`` (positions ``[begin, ...)`` of a layer's full-precision tail) with each padded position
        (before its row's ``first`` real one) holding the keys of the row's position ``first + exact``
        (or of the tail's last position, when that one has not arrived yet)."""
        n = keys.shape[2]
        first = first.to(keys.device)
        pos = torch.arange(begin, begin + n, device=keys.device)
        pad = pos[None, :] < first[:, None]
        src = (first + exact - begin).clamp(0, n - 1)
        src_k = keys[torch.arange(keys.shape[0], device=keys.device), :, src]  # [batch, heads, head_dim]
        return torch.where(pad[:, None, :, None], src_k[:, :, None, :], keys)

    def _rotate(self, keys: torch.Tensor, shift: int) -> torch.Tensor:
        """Keys rotated (RoPE, rotate-half convention) by ``shift`` more positions."""
        if shift == 0:
            return keys
        pos = torch.tensor([[shift]], device=keys.device)
        x = keys.float()
        cos, sin = self.rotary(x, pos)
        scale = float(getattr(self.rotary, "attention_scaling", 1.0) or 1.0)
        cos, sin = (cos[0, 0].float() / scale), (sin[0, 0].float() / scale)
        r = cos.shape[-1]
        rot, rest = x[..., :r], x[..., r:]
        half = rot.shape[-1] // 2
        rotated = rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sin
        return torch.cat([rotated, rest], dim=-1).to(keys.dtype)

    def _rotate_values(self, values: torch.Tensor, back: bool) -> torch.Tensor:
        """Values into (``back=False``) or out of the rotated basis they are stored in."""
        # One matmul in the model dtype (fp32 accumulation), so a decode step adds two small ops per layer.
        r = self.store.rotation(values.device, values.dtype)
        return values @ (r.T if back else r)

    def _read(self, layer_idx: int, begin: int, end: int, dtype: torch.dtype, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[begin, end)`` of a layer's pages dequantized, exact leading positions restored."""
        pk, pv = self._group_of[layer_idx].read(layer_idx, begin, end, dtype, device)
        layer = self.layers[layer_idx]
        lead = min(layer.exact, end) - begin
        if lead > 0:
            pk[:, :, :lead] = layer.sink_keys[:, :, begin:begin + lead]
            pv[:, :, :lead] = layer.sink_values[:, :, begin:begin + lead]
        return pk, pv

    def _dense(self, layer_idx: int, begin: int, end: int, tail_k: torch.Tensor, tail_v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages ``[begin, end)`` of a layer dequantized, then the full-precision tail."""
        if begin >= end:
            return tail_k, tail_v
        pk, pv = self._read(layer_idx, begin, end, tail_k.dtype, tail_k.device)
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
        k, v = self._dense(layer_idx, *pending)
        return k, self._rotate_values(v, True) if self.layers[layer_idx].rotated else v

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
        if padding is not None:
            padding = padding.to(query.device)
        lead = min(layer.exact, end) - begin
        if lead > 0:
            # Exact leading positions join the dense tail (the op's causal mask covers only the last
            # q_len entries, and full layers have no window); the mask follows the new entry order.
            if padding is not None:
                padding = self._exact_order_mask(padding, begin, lead, end)
            tk = torch.cat([layer.sink_keys[:, :, begin:begin + lead], tk], dim=2)
            tv = torch.cat([layer.sink_values[:, :, begin:begin + lead], tv], dim=2)
            begin += lead
            mask_offset = 0
        else:
            mask_offset = begin
        table, lens, skip = group.attention_index(begin, end, query.device)
        f = pages.fmt
        out = ops.paged_attention(
            query, pages.k_chunks, pages.v_chunks, table, lens, skip=skip, k_tail=tk, v_tail=tv, kv_mask=padding,
            mask_offset=mask_offset, k_format=FORMATS[f.key], v_format=FORMATS[f.value], k_group=pages.key_group,
            v_group=pages.value_group, block_size=self.block_size, blocks_per_chunk=group.blocks_per_chunk,
            num_kv_heads=self.num_kv_heads, scale=scaling if scaling is not None else self.head_dim ** -0.5,
            softcap=softcap, window=layer.window or 0)
        return self._rotate_values(out, True) if layer.rotated else out

    def _exact_order_mask(self, padding: torch.Tensor, begin: int, lead: int, end: int) -> torch.Tensor:
        """The padding mask in the fused op's entry order with exact leading positions moved to the tail;
        built once per step (the layers of a step share the mask object; an in-place edit of it bumps
        its version and rebuilds)."""
        # Inference tensors keep no version counter: the object identity alone keys them.
        key = (begin, lead, end, -1 if padding.is_inference() else padding._version)
        hit = self._exact_mask
        if hit is not None and hit[0] is padding and hit[1] == key:
            return hit[2]
        out = torch.cat([padding[:, begin + lead:end], padding[:, begin:begin + lead], padding[:, end:]], 1)
        self._exact_mask = (padding, key, out)
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if not isinstance(layer_idx, int) or layer_idx < 0:
            raise IndexError(f"layer_idx must be an int >= 0, got {layer_idx!r}")
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].num_tokens

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        # transformers builds the step's masks right after this: the "pagedkv" mask function hands this
        # cache the padding mask (note_padding).
        attention.expect_mask(self)
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
        self._check_not_static("reordering or selecting batch rows")
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
        if self._lead_pad is not None:
            first, end, width = self._lead_pad
            self._lead_pad = (first[index.to(first.device)], end, width)
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
        self._check_not_static("crop")
        if isinstance(max_length, torch.Tensor) and max_length.numel() == 1 and not max_length.is_floating_point():
            max_length = int(max_length)  # transformers 5.17's assisted decoding passes a 0-d tensor
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"crop takes an int, got {max_length!r}")
        current = self.get_seq_length()
        if max_length < 0:
            new_len = current + max_length
        elif CROP_TAKES_REMOVAL:
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
            if layer.window:
                needed = max(new_len - layer.window + 1, 0)
                if needed < self._group_of[layer.layer_idx].first_available:
                    raise ValueError(f"crop({max_length}) reaches tokens that sliding layer {layer.layer_idx} already "
                                     f"dropped (window {layer.window}); it can roll back only within its window")
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
                        layer.residual_keys, layer.residual_values = self._read(i, new_q, new_len, self._dtype,
                                                                                self._device)
                    else:
                        layer.residual_keys = layer.residual_values = None
                    layer.num_paged = new_q
                layer.num_tokens = new_len
                if layer.sink_keys is not None and layer.sink_keys.shape[2] > new_len:
                    layer.sink_keys = layer.sink_keys[:, :, :new_len]
                    layer.sink_values = layer.sink_values[:, :, :new_len]
            if new_q < q:
                g.truncate(new_q)
        if self._token_ids is not None:
            self._token_ids = self._token_ids[:, :new_len]

    def release(self) -> None:
        """Hand this cache's sequences back to the store: blocks registered in the prefix cache stay
        cached (evictable once nothing references them), the others are freed. The cache is empty and
        reusable afterwards."""
        self._check_not_static("release")
        for layer in self.layers:
            layer.reset()
        for g in self._groups:
            g.release()
        if self._batch_size is not None:
            self.store.num_caches -= 1
        self._token_ids = None
        self._lead_pad = None
        self._build_groups()

    def reset(self) -> None:
        """Forget every sequence; a cache that owns its storage without prefix caching also releases
        the page memory (a shared store keeps it for the other caches and the prefix cache)."""
        self.release()
        if self._owns_store and not self.store.prefix_caching:
            self.store.clear()
            self._build_groups()

    def __del__(self) -> None:
        try:
            if not self._owns_store and self._batch_size is not None:
                self.release()
        except Exception:  # interpreter shutdown: the store may already be gone
            pass

    # ------------------------------------------------------------------------------------------
    # prefix caching and reuse across requests
    # ------------------------------------------------------------------------------------------
    @property
    def prefix_caching(self) -> bool:
        return self.store.prefix_caching

    @property
    def token_ids(self) -> torch.Tensor | None:
        """Token ids of the positions this cache holds, when known (``[batch, seq_len]``, int64)."""
        return self._token_ids

    @token_ids.setter
    def token_ids(self, ids: Any) -> None:
        if ids is None:
            self._token_ids = None
            return
        rows = as_token_rows(ids)
        n = self.get_seq_length()
        if len(rows) != self.batch_size or len(rows[0]) < n:
            raise ValueError(f"token_ids must cover the {n} cached positions of each of the {self.batch_size} "
                             f"sequences, got {len(rows)} rows of {len(rows[0])}")
        self._token_ids = torch.as_tensor(np.stack(rows)[:, :n], dtype=torch.long)

    def _require_prefix_caching(self, what: str) -> None:
        if not self.store.prefix_caching:
            raise RuntimeError(f"{what} needs prefix caching: build the cache (or its KVStore) with prefix_caching=True")

    def attach_prefix(self, input_ids: Any) -> int:
        """Attach the longest cached prefix of ``input_ids`` (``[batch, seq_len]`` or ``[seq_len]``) to this
        empty cache: its blocks gain a reference, nothing is recomputed. Returns the number of positions
        attached (whole blocks, the same for every row, and at most ``seq_len - 1`` so the model still
        computes the last prompt token). The caller then runs the model on ``input_ids[:, attached:]``."""
        self._check_not_static("attach_prefix")
        self._require_prefix_caching("attach_prefix")
        if self._batch_size is not None:
            raise RuntimeError("attach_prefix needs an empty cache; call release() first")
        rows = as_token_rows(input_ids)
        n = len(rows[0])
        full = n // self.block_size
        if self.store.dtype is None:  # nothing stored yet
            for _ in rows:
                self.store._count(0, full)
            return 0
        t = self.store.now()
        self.store.expire()
        salt = self.store.hash_salt()
        cap = max((n - 1) // self.block_size, 0)
        groups = self.store.groups
        hit = min(len(g.index.match(r, salt, t, cap, False)) for g in groups for r in rows)
        matches = [[g.index.match(r, salt, t, hit, True) for r in rows] for g in groups]
        for _ in rows:
            self.store._count(hit, full - hit)
        if hit == 0:
            return 0
        tokens = hit * self.block_size
        for pg, rows_blocks in zip(self._groups, matches):
            pg.attach([list(m) for m in rows_blocks], tokens)
        for layer in self.layers:
            layer.num_tokens = layer.num_paged = tokens
            layer.residual_keys = layer.residual_values = None
            layer.is_initialized = True
            if layer.exact:
                gi = self.store.group_of[layer.layer_idx]
                rows_kv = [self.store.exact_rows[(gi, int(m[0]))][layer.layer_idx] for m in matches[gi]]
                layer.sink_keys = torch.stack([k for k, _ in rows_kv])
                layer.sink_values = torch.stack([v for _, v in rows_kv])
        self._acquire(len(rows), self.store.device, self.store.dtype)
        self._token_ids = torch.as_tensor(np.stack(rows)[:, :tokens], dtype=torch.long)
        return tokens

    def cache_prefix(self, token_ids: Any = None, *, priority: int = 0, pin: bool = False, flush: bool = True) -> int:
        """Register the full paged blocks this cache holds in the prefix cache, keyed by ``token_ids``
        (the ids of the cached positions ``[batch, n]``; a prefix of them registers only its whole
        blocks; default: :attr:`token_ids`). Returns the
        number of blocks newly cached. ``priority`` orders the ``"priority"`` eviction policy; ``pin=True``
        keeps the blocks until :meth:`KVStore.unpin`. ``flush=True`` first quantizes the whole blocks of the
        full-precision residual window into pages (grouped formats), so every full block can be shared."""
        self._check_not_static("cache_prefix")
        self._require_prefix_caching("cache_prefix")
        if self._batch_size is None:
            return 0
        if token_ids is None:
            if self._token_ids is None:
                raise ValueError("cache_prefix() needs token_ids: this cache does not know the ids it holds")
            token_ids = self._token_ids
        rows = as_token_rows(token_ids)
        if len(rows) != self._batch_size:
            raise ValueError(f"token_ids has {len(rows)} rows but the cache holds {self._batch_size} sequences")
        if len(rows[0]) >= self.get_seq_length():
            self.token_ids = token_ids  # the ids of every cached position: remember them
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {priority!r}")
        for layer in self.layers:
            if layer.num_paged != self._group_of[layer.layer_idx].num_paged:
                raise RuntimeError("cache_prefix called in the middle of a forward step (layers differ in length)")
        if flush:
            self._flush_residual()
        t = self.store.now()
        salt = self.store.hash_salt()
        added = 0
        for gi, g in enumerate(self._groups):
            paged = min(g.num_paged, len(rows[0]))  # a prefix of what the cache holds may be given
            exact = [i for i in g.layer_ids if self.layers[i].exact]
            for r, (row, seq) in enumerate(zip(rows, g.seqs)):
                blocks = list(g.tables.blocks(seq))
                added += g.storage.index.insert(row[:paged], blocks, salt, t, priority, bool(pin))
                if exact and paged >= self.block_size:
                    # The first block's exact leading positions travel with it (attach_prefix restores them).
                    self.store.exact_rows[(gi, blocks[0])] = {
                        i: (self.layers[i].sink_keys[r].clone(), self.layers[i].sink_values[r].clone()) for i in exact}
        return added

    def _flush_residual(self) -> None:
        """Move the residual window's whole blocks into pages (all-or-nothing per group)."""
        quantum = max(self.block_size, self.flush_quantum)
        for g in self._groups:
            target = self.get_seq_length() // quantum * quantum
            if target <= g.num_paged:
                continue
            g.advance(target, self._device)  # BudgetExhaustedError: nothing changed
            for i in g.layer_ids:
                layer = self.layers[i]
                self._page_out(g, i, layer.residual_keys, layer.residual_values, target, layer.num_tokens)

    def prepare(self, input_ids: Any) -> int:
        """Make this cache hold the longest reusable prefix of ``input_ids`` before running the model on the
        rest: what it already holds (when its :attr:`token_ids` agree), or with prefix caching the longest
        cached prefix (after registering what it held). Returns the number of positions reused; run the
        model on ``input_ids[:, reused:]``. :func:`pagedkv.generate` and ``model.generate`` after
        :func:`pagedkv.enable_prefix_reuse` call this for you."""
        self._check_not_static("prepare")
        rows = as_token_rows(input_ids)
        n = len(rows[0])
        if self._batch_size is not None:
            known = self._token_ids
            common = 0
            if known is not None and known.shape[0] == len(rows) and self._batch_size == len(rows):
                k = known.numpy()
                m = min(k.shape[1], n - 1)
                common = m
                for r_known, r in zip(k, rows):
                    diff = (r_known[:m] != r[:m]).nonzero()[0]
                    common = min(common, int(diff[0]) if diff.size else m)
            if self.store.prefix_caching:
                if known is not None:
                    self.cache_prefix(known)
                self.release()
            elif common > 0 and not self.sink_tokens and self._can_crop_to(common):
                self.crop(common - self.get_seq_length())
                return common
            else:
                self.release()
        if self.store.prefix_caching:
            return self.attach_prefix(rows)
        return 0

    def _can_crop_to(self, new_len: int) -> bool:
        return all(not layer.window or max(new_len - layer.window + 1, 0) >= self._group_of[i].first_available
                   for i, layer in enumerate(self.layers))

    # ------------------------------------------------------------------------------------------
    # step snapshots (chunked prefill rolls a failed chunk back)
    # ------------------------------------------------------------------------------------------
    def snapshot(self) -> Any:
        """An opaque record of the cache's state between forward steps, for :meth:`restore`. Valid until the
        cache is reordered, cropped, released or restored past it; a later step only appends."""
        self._check_not_static("snapshot")
        return (self._batch_size, [(l.num_tokens, l.num_paged, l.residual_keys, l.residual_values, l.sink_keys,
                                    l.sink_values) for l in self.layers],
                [g.num_paged for g in self._groups], self._token_ids)

    def restore(self, snap: Any) -> None:
        """Roll back to a :meth:`snapshot` taken earlier in the same run of forward steps: positions written
        since are forgotten (their blocks freed). Used when a step fails or is cancelled half-way."""
        self._check_not_static("restore")
        batch, layers, paged, token_ids = snap
        if batch is None:
            self.release()
            return
        if batch != self._batch_size:
            raise RuntimeError("restore: the cache was reordered since the snapshot")
        for g, q in zip(self._groups, paged):
            if g.num_paged > q:
                g.truncate(q)
        for layer, st in zip(self.layers, layers):
            (layer.num_tokens, layer.num_paged, layer.residual_keys, layer.residual_values, layer.sink_keys,
             layer.sink_values) = st
            layer._pending = None
        self._token_ids = token_ids

    # ------------------------------------------------------------------------------------------
    # memory statistics
    # ------------------------------------------------------------------------------------------
    def memory_stats(self) -> dict[str, float]:
        """Bytes used by pages and the residual window, per token, and the bf16 ``DynamicCache`` equivalent.

        ``paged_bytes`` counts allocated blocks (whole blocks, all layers); ``reserved_bytes`` counts the
        page tensors held (grown in chunks); ``dense_bf16_bytes`` is what a bf16 ``DynamicCache`` stores
        for the same tokens (sliding layers: their window).
        """
        # Blocks this cache's sequences hold (shared prefix blocks count once per cache).
        paged = sum(len({b for s in g.seqs for b in g.tables.blocks(s)}) * g.pool.bytes_per_block for g in self._groups)
        reserved = sum(g.pool.reserved_bytes for g in self._groups)
        residual = 0
        dense = 0
        for layer in self.layers:
            if layer.residual_keys is not None:
                residual += layer.residual_keys.nbytes + layer.residual_values.nbytes
            if layer.sink_keys is not None:  # exact leading positions, streaming sinks
                residual += layer.sink_keys.nbytes + layer.sink_values.nbytes
            kept = layer.num_tokens if not layer.window else min(layer.num_tokens, layer.window - 1) + layer.sinks
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
