"""Thin typed wrappers over the ``torch.ops.pagedkv`` library, with fake (meta) kernels for
``torch.library.opcheck``, ``torch.compile`` and CUDA graphs."""

from __future__ import annotations

import torch

import pagedkv._C  # noqa: F401  (registers torch.ops.pagedkv)


@torch.library.register_fake("pagedkv::append")
def _append_fake(src, pages, slot_mapping, format, role, group, block_size, blocks_per_chunk):  # noqa: A002
    return None


@torch.library.register_fake("pagedkv::gather")
def _gather_fake(pages, block_table, seq_lens, skip, format, role, group, block_size, blocks_per_chunk,  # noqa: A002
                 num_kv_heads, head_dim, out_len, dtype):
    return block_table.new_empty((block_table.shape[0], num_kv_heads, out_len, head_dim), dtype=dtype)


@torch.library.register_fake("pagedkv::all_finite")
def _all_finite_fake(a, b):
    return True


@torch.library.register_fake("pagedkv::copy_blocks")
def _copy_blocks_fake(pages, pairs, block_bytes, blocks_per_chunk):
    return None


def append(src: torch.Tensor, pages: list[torch.Tensor], slot_mapping: torch.Tensor, *, format: int, role: int,  # noqa: A002
           group: int, block_size: int, blocks_per_chunk: int) -> None:
    """Quantize ``src [num_tokens, num_kv_heads, head_dim]`` into the slots ``slot_mapping [num_tokens]``
    (``block * block_size + offset``; ``-1`` skips a token)."""
    torch.ops.pagedkv.append(src, pages, slot_mapping, format, role, group, block_size, blocks_per_chunk)


def gather(pages: list[torch.Tensor], block_table: torch.Tensor, seq_lens: torch.Tensor, skip: torch.Tensor | None,
           *, format: int, role: int, group: int, block_size: int, blocks_per_chunk: int,  # noqa: A002
           num_kv_heads: int, head_dim: int, out_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize to ``[num_seqs, num_kv_heads, out_len, head_dim]``; positions past ``seq_lens`` are zero."""
    return torch.ops.pagedkv.gather(pages, block_table, seq_lens, skip, format, role, group, block_size,
                                    blocks_per_chunk, num_kv_heads, head_dim, out_len, dtype)


def copy_blocks(pages: list[torch.Tensor], pairs: torch.Tensor, *, block_bytes: int, blocks_per_chunk: int) -> None:
    """Copy whole blocks ``pairs[i, 0] -> pairs[i, 1]`` (``int64 [num_pairs, 2]``)."""
    torch.ops.pagedkv.copy_blocks(pages, pairs, block_bytes, blocks_per_chunk)


@torch.library.register_fake("pagedkv::paged_attention")
def _paged_attention_fake(query, k_pages, v_pages, block_table, seq_lens, skip, k_tail, v_tail, kv_mask, mask_offset,
                          k_format, v_format, k_group, v_group, block_size, blocks_per_chunk, num_kv_heads, scale,
                          softcap, window, num_splits):
    b, h, t, d = query.shape
    return query.new_empty((b, t, h, d))


def paged_attention(query: torch.Tensor, k_pages: list[torch.Tensor], v_pages: list[torch.Tensor],
                    block_table: torch.Tensor, seq_lens: torch.Tensor, *, skip: torch.Tensor | None = None,
                    k_tail: torch.Tensor | None = None, v_tail: torch.Tensor | None = None,
                    kv_mask: torch.Tensor | None = None, mask_offset: int = 0, k_format: int, v_format: int,
                    k_group: int = 1, v_group: int = 1, block_size: int, blocks_per_chunk: int, num_kv_heads: int,
                    scale: float, softcap: float = 0.0, window: int = 0, num_splits: int = 0) -> torch.Tensor:
    """Attention of ``query [B, Hq, Lq, D]`` over quantized pages then a dense tail; see ``ops_def.cpp``.

    Returns ``[B, Lq, Hq, D]`` (the layout transformers' attention functions return)."""
    return torch.ops.pagedkv.paged_attention(query, k_pages, v_pages, block_table, seq_lens, skip, k_tail, v_tail,
                                             kv_mask, mask_offset, k_format, v_format, k_group, v_group, block_size,
                                             blocks_per_chunk, num_kv_heads, float(scale), float(softcap), window,
                                             num_splits)
