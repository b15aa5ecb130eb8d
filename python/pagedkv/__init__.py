"""pagedkv: a quantized, paged KV cache for PyTorch / transformers inference."""

import torch  # noqa: F401  (must load before the extension: _C links libtorch)

from pagedkv import _C  # noqa: E402  (loads the TORCH_LIBRARY ops as well)
from pagedkv._C import BudgetExhaustedError  # noqa: E402
from pagedkv.config import FORMATS, KVFormat, LayerFormat, format_table  # noqa: E402
from pagedkv.store import KVStore, tensor_parallel_size  # noqa: E402
from pagedkv.cache import PagedKVCache  # noqa: E402
from pagedkv.graph_decode import GraphDecoder  # noqa: E402
from pagedkv.generation import (  # noqa: E402
    PrefillCancelled,
    auto_chunk_size,
    enable_prefix_reuse,
    generate,
    graph_generate,
    prefill,
    sample_next,
)
from pagedkv import attention as _attention  # noqa: E402
from pagedkv.streaming import (  # noqa: E402
    CachedTextIteratorStreamer,
    CachedTextStreamer,
    TokenDecoder,
    UnsupportedTokenizerError,
)

_attention.register()

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "BudgetExhaustedError",
    "CachedTextIteratorStreamer",
    "CachedTextStreamer",
    "TokenDecoder",
    "UnsupportedTokenizerError",
    "KVFormat",
    "KVStore",
    "GraphDecoder",
    "graph_generate",
    "tensor_parallel_size",
    "PrefillCancelled",
    "auto_chunk_size",
    "enable_prefix_reuse",
    "generate",
    "prefill",
    "sample_next",
    "LayerFormat",
    "PagedKVCache",
    "format_table",
    "__version__",
]
