"""Builders of random paged K/V for the attention op tests (CPU and CUDA)."""

from __future__ import annotations

import torch

from pagedkv import ops
from pagedkv.config import FORMATS, GROUPED, KEY, VALUE, group_for, layout


class PagedInputs:
    """Random keys/values of ``num_seqs`` sequences written into shuffled blocks.

    Page bytes start as 0xFF (NaN scales, NaN bf16), so any read of an unwritten slot poisons the
    result. ``dense(s)`` returns the sequence's dequantized fp32 K/V, read back through ``gather``.
    """

    def __init__(self, lens: list[int], skips: list[int], kf: str, vf: str, num_kv_heads: int, head_dim: int,
                 block_size: int = 64, blocks_per_chunk: int = 7, device: str = "cpu", seed: int = 0,
                 key_scale: float = 1.0, key_group: int | None = None, value_group: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.kf, self.vf = kf, vf
        self.H, self.D, self.bs, self.bpc = num_kv_heads, head_dim, block_size, blocks_per_chunk
        self.kg = group_for(kf, KEY, head_dim, key_group, value_group, block_size)
        self.vg = group_for(vf, VALUE, head_dim, key_group, value_group, block_size)
        kl = layout(kf, KEY, num_kv_heads, head_dim, block_size, self.kg)
        vl = layout(vf, VALUE, num_kv_heads, head_dim, block_size, self.vg)
        need = [(sk + n + block_size - 1) // block_size for n, sk in zip(lens, skips)]
        total = sum(need) + 3
        perm = torch.randperm(total, generator=g)
        self.table = torch.zeros(len(lens), max(max(need), 1), dtype=torch.int32)
        i = 0
        for s, nb in enumerate(need):
            self.table[s, :nb] = perm[i:i + nb].to(torch.int32)
            i += nb
        self.k_pages, self.v_pages = [], []
        for c in range(0, total, blocks_per_chunk):
            n = min(blocks_per_chunk, total - c)
            self.k_pages.append(torch.full((n, kl["block_bytes"]), 255, dtype=torch.uint8, device=device))
            self.v_pages.append(torch.full((n, vl["block_bytes"]), 255, dtype=torch.uint8, device=device))
        self.table = self.table.to(device)
        self.lens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.skip = torch.tensor(skips, dtype=torch.int32, device=device)
        for s, (n, sk) in enumerate(zip(lens, skips)):
            if n == 0:
                continue
            # Grouped keys are written in whole aligned groups covering [skip, skip + n).
            a = sk // self.kg * self.kg if kf in GROUPED else sk
            b = -(-(sk + n) // self.kg) * self.kg if kf in GROUPED else sk + n
            pos = torch.arange(a, b)
            slots = (self.table[s].cpu().long()[pos // block_size] * block_size + pos % block_size).to(device)
            k = torch.randn(b - a, num_kv_heads, head_dim, generator=g) * key_scale
            v = torch.randn(b - a, num_kv_heads, head_dim, generator=g)
            kw = dict(block_size=block_size, blocks_per_chunk=blocks_per_chunk)
            ops.append(k.to(device), self.k_pages, slots, format=FORMATS[kf], role=KEY, group=self.kg, **kw)
            ops.append(v.to(device), self.v_pages, slots, format=FORMATS[vf], role=VALUE, group=self.vg, **kw)

    def dense(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``[1, H, len, D]`` keys and values of sequence ``s`` as stored."""
        n = int(self.lens[s])
        kw = dict(block_size=self.bs, blocks_per_chunk=self.bpc, num_kv_heads=self.H, head_dim=self.D, out_len=n,
                  dtype=torch.float32)
        t, ln, sk = self.table[s:s + 1], self.lens[s:s + 1], self.skip[s:s + 1]
        k = ops.gather(self.k_pages, t, ln, sk, format=FORMATS[self.kf], role=KEY, group=self.kg, **kw)
        v = ops.gather(self.v_pages, t, ln, sk, format=FORMATS[self.vf], role=VALUE, group=self.vg, **kw)
        return k, v

    def attend(self, query: torch.Tensor, k_tail=None, v_tail=None, **kw) -> torch.Tensor:
        return ops.paged_attention(query, self.k_pages, self.v_pages, self.table, self.lens, skip=self.skip,
                                   k_tail=k_tail, v_tail=v_tail, k_format=FORMATS[self.kf],
                                   v_format=FORMATS[self.vf], k_group=self.kg, v_group=self.vg, block_size=self.bs,
                                   blocks_per_chunk=self.bpc, num_kv_heads=self.H, **kw)
