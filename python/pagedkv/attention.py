"""The ``"pagedkv"`` attention implementation for transformers.

Select it with ``attn_implementation="pagedkv"`` (``from_pretrained``) or
``model.set_attn_implementation("pagedkv")``. With a :class:`pagedkv.PagedKVCache`, each layer's
``update`` stores the new tokens and hands back only its full-precision tail, tagged with the cache;
this function then runs the fused ``paged_attention`` op over the quantized pages plus that tail, so
decoding never rebuilds the dense history. Anything the op does not cover (no paged cache, a custom
4-D mask, a long query chunk on an empty cache) takes the dense path, with the same result as sdpa.

The matching mask function returns a :class:`PagedMask`: the 2-D padding mask (absolute positions),
plus what is needed to build sdpa's 4-D mask on demand for the dense path.
"""

from __future__ import annotations

import contextvars
import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "pagedkv"

#: Query chunks longer than this run on dense K/V (they are compute-bound, not bandwidth-bound).
MAX_FUSED_QUERY = 64


class PagedMask:
    """What the ``"pagedkv"`` mask function hands to the attention layers.

    ``padding`` is a bool ``[batch, positions]`` mask indexed by absolute position (False = padding),
    or None. ``dense()`` builds the 4-D sdpa mask (cached) for the dense path.
    """

    def __init__(self, padding: torch.Tensor | None, mask_kwargs: dict[str, Any]):
        self.padding = padding
        self._kwargs = mask_kwargs
        self._dense: torch.Tensor | None = None
        self._built = False

    def dense(self) -> torch.Tensor | None:
        if not self._built:
            kw = dict(self._kwargs)
            kw.pop("dtype", None)
            self._dense = sdpa_mask(**kw)
            self._built = True
        return self._dense

    @property
    def shape(self) -> tuple[int, ...]:  # some model code logs mask shapes
        d = self.dense()
        return tuple(d.shape) if d is not None else ()


# The PagedKVCache whose get_mask_sizes ran last in this thread (transformers calls it just before
# the mask function of the same step), so the mask function can hand it the padding mask.
_MASK_CACHE: contextvars.ContextVar[weakref.ref | None] = contextvars.ContextVar("pagedkv_mask_cache", default=None)


def expect_mask(cache: Any) -> None:
    """Called by ``PagedKVCache.get_mask_sizes``: the next mask function call builds this cache's mask."""
    _MASK_CACHE.set(weakref.ref(cache))


def _hand_padding(kwargs: dict[str, Any]) -> None:
    ref = _MASK_CACHE.get()
    if ref is None:
        return
    _MASK_CACHE.set(None)
    cache = ref()
    if cache is None:
        return
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    if mask is not None and cache.batch_size not in (-1, mask.shape[0]):
        return  # not this cache's step
    cache.note_padding(mask)


def pagedkv_mask(*args: Any, **kwargs: Any) -> PagedMask | torch.Tensor | None:
    """AttentionMaskInterface entry: a :class:`PagedMask`, or sdpa's 4-D mask when the mask function
    is more than causal + sliding window + padding (packed sequences, bidirectional overlays). A
    ``PagedKVCache`` that asked for this mask (its ``get_mask_sizes``) is told the padding first."""
    if args:
        raise TypeError("the pagedkv mask function takes keyword arguments only")
    _hand_padding(kwargs)
    if not kwargs.get("allow_is_causal_skip", True):
        kw = dict(kwargs)
        kw.pop("dtype", None)
        return sdpa_mask(**kw)
    padding = kwargs.get("attention_mask")
    if padding is not None and padding.dim() != 2:
        padding = None
    return PagedMask(padding, kwargs)


def _dense_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None, scaling: float | None, dropout: float, softcap: float | None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    if not softcap:
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(rep, dim=1)
    v = value.repeat_interleave(rep, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    s = torch.matmul(query, k.transpose(2, 3)) * scaling
    s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    elif query.shape[2] > 1:
        causal = torch.ones(query.shape[2], k.shape[2], dtype=torch.bool, device=query.device).tril(
            k.shape[2] - query.shape[2])
        s = s.masked_fill(~causal, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(query.dtype)
    p = torch.nn.functional.dropout(p, p=dropout, training=module.training)
    return torch.matmul(p, v).transpose(1, 2).contiguous(), None


def pagedkv_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                              sliding_window: int | None = None, softcap: float | None = None, **kwargs: Any
                              ) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: fused paged attention when ``key`` comes from a ``PagedKVCache``."""
    ctx = getattr(key, "_pagedkv_ctx", None)
    fused = (ctx is not None and not isinstance(attention_mask, torch.Tensor) and dropout == 0.0
             and not (module.training and torch.is_grad_enabled()))
    if fused:
        cache, layer_idx = ctx
        padding = attention_mask.padding if isinstance(attention_mask, PagedMask) else None
        out = cache._attend(layer_idx, query, padding, scaling, softcap or 0.0, MAX_FUSED_QUERY)
        if out is not None:
            return out, None
    if ctx is not None:
        key, value = ctx[0]._dense_kv(ctx[1])
    mask = attention_mask.dense() if isinstance(attention_mask, PagedMask) else attention_mask
    return _dense_attention(module, query, key, value, mask, scaling, dropout, softcap, **kwargs)


def register() -> None:
    """Register ``"pagedkv"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, pagedkv_attention_forward)
    AttentionMaskInterface.register(NAME, pagedkv_mask)
