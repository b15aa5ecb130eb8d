"""Differences between the transformers 5.x releases pagedkv supports (>= 5.17, < 6)."""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.lru_cache(maxsize=None)
def _cache_name(model_type: type) -> str:
    # 5.24 renamed the argument `cache` (forward: the old name goes in 5.40; generate: in 6.0); 5.17
    # knows only `past_key_values`.
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name this release's ``model.forward`` and ``model.generate`` take it."""
    return {_cache_name(type(model)): cache}
