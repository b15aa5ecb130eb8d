"""``KVStore``: the paged storage one or more :class:`~pagedkv.PagedKVCache` objects share.

A store owns the page tensors, one block pool and block-table set per attention group, the byte
budget, and (with ``prefix_caching=True``) one prefix index per group. Every cache built on a store
holds its own sequences in the store's tables, so requests served one after another, or at the same
time, share cached prompt blocks and one budget.

Prefix caching: a full block is identified by a hash chained from its parent block's hash, its token
ids and a salt (the store's ``salt`` plus the model's dtype). ``PagedKVCache.attach_prefix`` attaches
the longest cached prefix to an empty cache; ``cache_prefix`` registers what a cache holds; ``release``
hands a cache's sequences back (their blocks stay cached until space is needed, then the eviction
policy picks unreferenced ones: ``lru`` (default), ``lfu``, ``priority``; ``ttl_seconds`` expires idle
ones). Blocks that any sequence references are never evicted.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from pagedkv import _C
from pagedkv.config import (DEFAULT_BLOCK_SIZE, DEFAULT_RESIDUAL_LENGTH, GROUPED, KEY, VALUE, group_for,
                            resolve_layer_formats)
from pagedkv.storage import GroupStorage, LayerPages

EVICTION_POLICIES = ("lru", "lfu", "priority")


def text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layer_windows(cfg: Any, num_layers: int) -> list[int | None]:
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


def tensor_parallel_size(model: Any = None) -> int:
    """Tensor-parallel degree: the model's (transformers ``tp_plan``) when it has one, else the world size
    of the default torch.distributed process group, else 1."""
    for attr in ("tp_size", "_tp_size"):
        size = getattr(model, attr, None) if model is not None else None
        if isinstance(size, int) and size >= 1:
            return size
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def resolve_tp_size(tp_size: int | str | None) -> int:
    if tp_size is None:
        return 1
    if tp_size == "auto":
        return tensor_parallel_size()
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be an int >= 1, 'auto' or None, got {tp_size!r}")
    return tp_size


def hadamard_rotation(dim: int, seed: int = 0x9E3779B9) -> torch.Tensor:
    """fp32 ``[dim, dim]`` orthogonal matrix: Sylvester-Hadamard blocks of the largest power of two
    dividing ``dim``, scaled to unit rows, times random signs per row (fixed ``seed``)."""
    n = dim & -dim
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (dim,), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    return torch.block_diag(*([h / n ** 0.5] * (dim // n))) * signs[:, None]


def _positive_int_or_none(name: str, value: Any, minimum: int = 0) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be an int >= {minimum} or None, got {value!r}")


class KVStore:
    """Paged KV storage shared by caches; see the module docstring.

    Parameters are those of :class:`~pagedkv.PagedKVCache` that describe storage (formats, block size,
    residual window, groups, budgets), plus:

    prefix_caching:
        Keep full blocks in a prefix index so later requests with the same token prefix reuse them.
    eviction:
        ``"lru"`` (default), ``"lfu"`` or ``"priority"`` (pinned > higher priority > recent > old).
    ttl_seconds:
        Cached blocks unused for longer than this are dropped (checked on each prefix operation and
        before any other eviction). None: never.
    salt:
        Mixed into every block hash, e.g. the model id; the dtype of the stored states is always mixed in.
    clock:
        Time source in seconds for TTL (default ``time.monotonic``); tests inject one.
    exact_prefix:
        Attention sinks: the first ``exact_prefix`` positions of each sequence are also kept in full
        precision on layers with grouped keys (int4/int2/nf4) and no window, and left out of their key
        group's range (a sink's keys are outliers that would stretch its group's grid). Default 1 when
        any layer has grouped keys. Must be smaller than the key group.
    value_rotation:
        Rotate the values of layers with grouped value formats by a fixed randomized Hadamard matrix
        along head_dim before storing them (spreads channel outliers over the group; no calibration),
        and rotate attention outputs back. Exact up to rounding: attention is linear in the values.
        Default: on for grouped value formats.
    tp_size:
        Tensor parallelism: the model's KV heads (``num_kv_heads`` or the config's) are split evenly over
        this many ranks and this store holds one rank's share, ``num_kv_heads // tp_size`` heads.
        ``"auto"``: the world size of the default torch.distributed process group (1 without one).
        Everything else (block tables, prefix hashes, eviction) depends only on token ids, so the ranks
        stay in step with no communication; byte budgets count this rank's pages only.
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
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        recent_window: int | None = None,
        prefix_caching: bool = False,
        eviction: str = "lru",
        ttl_seconds: float | None = None,
        salt: str = "",
        clock: Callable[[], float] = time.monotonic,
        tp_size: int | str | None = None,
        exact_prefix: int | None = None,
        value_rotation: bool | None = None,
    ):
        cfg = text_config(config) if config is not None else None
        if cfg is not None:
            num_layers = num_layers if num_layers is not None else cfg.num_hidden_layers
            heads = getattr(cfg, "num_attention_heads", None)
            num_kv_heads = num_kv_heads if num_kv_heads is not None else (getattr(cfg, "num_key_value_heads", None) or heads)
            if head_dim is None:
                head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        if num_layers is None or num_kv_heads is None or head_dim is None:
            raise ValueError("PagedKVCache needs a model config, or num_layers, num_kv_heads and head_dim")
        for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.tp_size = resolve_tp_size(tp_size)
        if num_kv_heads % self.tp_size:
            raise ValueError(f"tp_size={self.tp_size} does not divide the model's num_kv_heads={num_kv_heads}: "
                             "each rank must hold whole KV heads")
        #: The model's KV heads; ``num_kv_heads`` is this rank's share.
        self.total_kv_heads = num_kv_heads
        num_kv_heads //= self.tp_size
        model_windows = layer_windows(cfg, num_layers) if cfg is not None else [None] * num_layers
        windows = list(model_windows)
        _positive_int_or_none("recent_window", recent_window, 1)
        if recent_window is not None:
            # Full-attention layers keep only their newest recent_window positions (sinks aside).
            windows = [recent_window if w is None else w for w in windows]
        formats = resolve_layer_formats(num_layers, kv_format, key_format, value_format, layer_formats)
        grouped = any(f.grouped for f in formats)
        grouped_keys = any(f.key in GROUPED for f in formats)
        if block_size is None:
            block_size = DEFAULT_BLOCK_SIZE
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % 16:
            raise ValueError(f"block_size must be a positive multiple of 16, got {block_size!r}")
        if residual_length is None:
            residual_length = DEFAULT_RESIDUAL_LENGTH if grouped else 0
        if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length must be an int >= 0, got {residual_length!r}")
        _positive_int_or_none("max_memory_bytes", max_memory_bytes)
        _positive_int_or_none("max_blocks", max_blocks)
        _positive_int_or_none("blocks_per_chunk", blocks_per_chunk, 1)
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction={eviction!r} is not a policy; expected one of {EVICTION_POLICIES}")
        if ttl_seconds is not None and (not isinstance(ttl_seconds, (int, float)) or not ttl_seconds >= 0):
            raise ValueError(f"ttl_seconds must be a number >= 0 or None, got {ttl_seconds!r}")
        if not isinstance(salt, str):
            raise TypeError(f"salt must be a str, got {type(salt).__name__}")
        if prefix_caching and any(w is not None for w in windows):
            raise NotImplementedError(
                "prefix_caching=True is not supported with sliding-window layers or recent_window: those layers "
                "drop blocks before a prefix can be registered")

        self.config = cfg
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.residual_length = residual_length if grouped else 0
        self.layer_formats = formats
        self.model_windows = model_windows  # the model's sliding windows (None: full attention)
        self.windows = windows              # what each layer keeps (recent_window on full layers)
        self.recent_window = recent_window
        self.max_memory_bytes = max_memory_bytes
        self.max_blocks = max_blocks
        self.blocks_per_chunk = blocks_per_chunk
        key_group = group_for("int4", KEY, head_dim, key_group_size, None, block_size) if grouped_keys else 1
        #: Positions leave the residual window in whole key groups.
        self.flush_quantum = key_group
        if exact_prefix is None:
            exact_prefix = 1 if grouped_keys else 0
        if isinstance(exact_prefix, bool) or not isinstance(exact_prefix, int) or not 0 <= exact_prefix < key_group:
            raise ValueError(f"exact_prefix must be an int in [0, {key_group}) (below the key group), got {exact_prefix!r}")
        if value_rotation is not None and not isinstance(value_rotation, bool):
            raise TypeError(f"value_rotation must be a bool or None, got {value_rotation!r}")
        self.exact_prefix = exact_prefix
        #: Per layer: leading positions kept exact (grouped keys, full attention), and whether values rotate.
        self.exact_layers = [exact_prefix if f.key in GROUPED and w is None else 0 for f, w in zip(formats, windows)]
        self.rotated_layers = [value_rotation is not False and f.value in GROUPED for f in formats]
        self._rotation: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.pages = {
            i: LayerPages(
                f, num_kv_heads, head_dim, block_size,
                group_for(f.key, KEY, head_dim, key_group_size, value_group_size, block_size),
                group_for(f.value, VALUE, head_dim, key_group_size, value_group_size, block_size),
            )
            for i, f in enumerate(formats)
        }
        self.prefix_caching = bool(prefix_caching)
        self.eviction = eviction
        self.ttl_seconds = ttl_seconds
        self.salt = salt
        self.clock = clock
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.num_caches = 0  # caches holding sequences in this store
        self._build()

    def _build(self) -> None:
        self.budget = _C.MemoryBudget(-1 if self.max_memory_bytes is None else self.max_memory_bytes)
        by_window: dict[int | None, list[int]] = {}
        for i, w in enumerate(self.windows):
            by_window.setdefault(w, []).append(i)
        self.groups: list[GroupStorage] = []
        self.group_of: list[int] = [0] * self.num_layers
        for w, ids in by_window.items():
            g = GroupStorage(ids, self.pages, self.block_size, w, self.budget,
                             -1 if self.max_blocks is None else self.max_blocks, self.blocks_per_chunk)
            if self.prefix_caching:
                g.index = _C.PrefixIndex(g.pool, self.block_size, self.eviction,
                                         -1.0 if self.ttl_seconds is None else float(self.ttl_seconds))
            for i in ids:
                self.group_of[i] = len(self.groups)
            self.groups.append(g)
        self.device = self.dtype = None
        #: Exact leading rows of cached prefixes: (group, first block id) -> per layer (keys, values)
        #: [num_kv_heads, exact_prefix, head_dim] (prefix caching with exact_prefix).
        self.exact_rows: dict[tuple[int, int], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._counters = dict(requests=0, hit_blocks=0, miss_blocks=0, hit_tokens=0, bytes_saved=0)

    def bind(self, device: torch.device, dtype: torch.dtype) -> None:
        """Fix the device and dtype of the stored states (the first cache's first update)."""
        if self.device is None:
            self.device, self.dtype = device, dtype
        elif device != self.device or dtype != self.dtype:
            raise ValueError(f"this KVStore holds {self.dtype} states on {self.device}; got {dtype} on {device}")

    def clear(self) -> None:
        """Release all page memory. Only allowed when no cache holds sequences."""
        if self.num_caches:
            raise RuntimeError(f"cannot clear a KVStore while {self.num_caches} caches hold sequences; release them")
        for g in self.groups:
            g.index = None
        for p in self.pages.values():
            p.release()
        self._build()

    def rotation(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[head_dim, head_dim]`` orthogonal matrix values are stored under (``v @ R``): randomized
        Hadamard blocks along head_dim (the largest power of two dividing it), fixed seed; in ``dtype``
        (its entries are +-2^-k/2: exact for 16, 64, 256-wide blocks, within 2^-9 otherwise)."""
        r = self._rotation.get((device, dtype))
        if r is None:
            r = self._rotation[(device, dtype)] = hadamard_rotation(self.head_dim).to(device, dtype)
        return r

    # ------------------------------------------------------------------------------------------
    # prefix caching
    # ------------------------------------------------------------------------------------------
    def hash_salt(self) -> int:
        """Salt of every block hash: the user's salt, the formats, groups and the stored dtype."""
        parts = [self.salt, str(self.dtype), str(self.block_size), str(self.flush_quantum), str(self.exact_prefix),
                 str(self.rotated_layers)]
        parts += [f"{p.fmt.key}/{p.fmt.value}/{p.key_group}/{p.value_group}" for p in self.pages.values()]
        return int.from_bytes(hashlib.blake2b("|".join(parts).encode(), digest_size=8).digest(), "little")

    def now(self) -> float:
        t = float(self.clock())
        for g in self.groups:
            if g.index is not None:
                g.index.set_now(t)
        return t

    def expire(self) -> int:
        """Drop cached blocks idle longer than ``ttl_seconds``; returns how many."""
        t = self.now()
        return sum(g.index.expire(t) for g in self.groups if g.index is not None)

    def evict(self, num_blocks: int) -> int:
        """Evict up to ``num_blocks`` unreferenced cached blocks per group by policy; returns how many."""
        t = self.now()
        return sum(g.index.evict(num_blocks, t) for g in self.groups if g.index is not None)

    def clear_prefixes(self) -> int:
        """Forget every unreferenced, unpinned cached block; returns how many."""
        return sum(g.index.clear() for g in self.groups if g.index is not None)

    def unpin(self, token_ids: Any) -> int:
        """Unpin the cached blocks of a prefix (see ``PagedKVCache.cache_prefix(pin=True)``)."""
        ids = as_token_rows(token_ids)
        salt = self.hash_salt()
        return sum(g.index.unpin(row, salt) for g in self.groups if g.index is not None for row in ids)

    def _count(self, hit_blocks: int, miss_blocks: int) -> None:
        c = self._counters
        c["requests"] += 1
        c["hit_blocks"] += hit_blocks
        c["miss_blocks"] += miss_blocks
        c["hit_tokens"] += hit_blocks * self.block_size
        c["bytes_saved"] += hit_blocks * sum(g.pool.bytes_per_block for g in self.groups)

    def prefix_stats(self) -> dict[str, float]:
        """Counters since creation: requests (rows looked up), hit/miss blocks, hit rate, tokens reused,
        bytes saved (page bytes the hits did not have to store again), evictions, expirations, and the
        blocks and bytes cached now."""
        c = dict(self._counters)
        looked = c["hit_blocks"] + c["miss_blocks"]
        c["hit_rate"] = c["hit_blocks"] / looked if looked else 0.0
        idx = [g for g in self.groups if g.index is not None]
        c["evictions"] = sum(g.index.stats["evicted"] for g in idx)
        c["expired"] = sum(g.index.stats["expired"] for g in idx)
        c["cached_blocks"] = sum(g.index.size for g in idx)
        c["cached_bytes"] = sum(g.index.size * g.pool.bytes_per_block for g in idx)
        c["evictable_blocks"] = sum(g.index.reclaimable for g in idx)
        return c

    def memory_bytes(self) -> dict[str, int]:
        """Page bytes in use (allocated blocks, all layers) and reserved (page tensors held)."""
        return {"used_bytes": sum(g.pool.num_used * g.pool.bytes_per_block for g in self.groups),
                "reserved_bytes": sum(g.pool.reserved_bytes for g in self.groups)}


def as_token_rows(token_ids: Any) -> list:
    """Token ids as a list of 1-D int32 numpy rows (accepts a tensor, array or nested lists; 1-D = one row)."""
    import numpy as np

    if isinstance(token_ids, torch.Tensor):
        if token_ids.is_floating_point() or token_ids.is_complex():
            raise TypeError(f"token ids must be an integer tensor, got {token_ids.dtype}")
        arr = token_ids.detach().cpu().numpy()
    else:
        arr = np.asarray(token_ids)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"token ids must be [seq_len] or [batch, seq_len], got shape {tuple(arr.shape)}")
    return [np.ascontiguousarray(r, dtype=np.int32) for r in arr]
