"""Differences between the transformers 5.x releases pagedkv supports (>= 5.17, < 6)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from transformers.cache_utils import Cache

# transformers >= 5.2x: crop(tokens_to_remove <= 0); earlier 5.x: crop(max_length), negative = remove.
CROP_TAKES_REMOVAL = "tokens_to_remove" in inspect.signature(Cache.crop).parameters


@functools.lru_cache(maxsize=None)
def _cache_name(model_type: type) -> str:
    # 5.24 renamed the argument `cache` (forward: the old name goes in 5.40; generate: in 6.0); 5.17
    # knows only `past_key_values`.
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name this release's ``model.forward`` and ``model.generate`` take it."""
    return {_cache_name(type(model)): cache}


def generate_cache(kwargs: dict[str, Any]) -> Any:
    """The cache passed to ``generate``: ``past_key_values=``, or ``cache=`` (5.24 on; it moves the old
    name to the new one before a custom decoding loop sees the arguments)."""
    cache = kwargs.get("past_key_values")
    return kwargs.get("cache") if cache is None else cache
