"""append/gather ops against the plain-PyTorch reference (pagedkv/reference.py)."""

from __future__ import annotations

import pytest
import torch

from pagedkv import ops
from pagedkv.config import FORMATS, GROUPED, KEY, VALUE, layout
from pagedkv.reference import fake_quantize

ALL_FORMATS = list(FORMATS)
ROLES = [KEY, VALUE]
BLOCK = 16
SEQ_LENS = [1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 3]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _group(fmt: str, role: int, head_dim: int) -> int:
    if fmt not in GROUPED:
        return 1
    return BLOCK if role == KEY else min(16, head_dim)


def _pages(lay: dict, num_blocks: int, bpc: int) -> list[torch.Tensor]:
    """Chunks filled with 0xff: NaN in every float field, so reading an unwritten slot shows."""
    chunks = []
    left = num_blocks
    while left > 0:
        n = min(bpc, left)
        chunks.append(torch.full((n, lay["block_bytes"]), 0xFF, dtype=torch.uint8))
        left -= n
    return chunks


def _roundtrip(fmt, role, seq_lens, num_kv_heads, head_dim, dtype, noncontig=False, bpc=3):
    group = _group(fmt, role, head_dim)
    lay = layout(fmt, role, num_kv_heads, head_dim, BLOCK, group)
    blocks_per_seq = [-(-n // BLOCK) for n in seq_lens]
    total = sum(blocks_per_seq) + 2
    perm = torch.randperm(total, dtype=torch.int32)
    table = torch.full((len(seq_lens), max(blocks_per_seq)), -1, dtype=torch.int32)
    i = 0
    for s, nb in enumerate(blocks_per_seq):
        table[s, :nb] = perm[i:i + nb]
        i += nb
    pages = _pages(lay, total, bpc)
    expected = []
    for s, n in enumerate(seq_lens):
        # Grouped keys are written in whole groups: write the padded group, then read only n.
        n_write = -(-n // group) * group if (fmt in GROUPED and role == KEY) else n
        x = torch.randn(n_write, num_kv_heads, head_dim, dtype=torch.float32).to(dtype) * 3
        if noncontig:
            big = torch.randn(n_write, num_kv_heads * 2, head_dim, dtype=dtype)
            big[:, ::2] = x
            x = big[:, ::2]
            assert not x.is_contiguous()
        pos = torch.arange(n_write)
        slots = table[s, pos // BLOCK].long() * BLOCK + pos % BLOCK
        ops.append(x, pages, slots, format=FORMATS[fmt], role=role, group=group, block_size=BLOCK, blocks_per_chunk=bpc)
        expected.append(fake_quantize(x.float(), fmt, role, group)[:n])
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out_len = max(seq_lens) + 1
    out = ops.gather(pages, table, lens, None, format=FORMATS[fmt], role=role, group=group, block_size=BLOCK,
                     blocks_per_chunk=bpc, num_kv_heads=num_kv_heads, head_dim=head_dim, out_len=out_len,
                     dtype=torch.float32)
    assert out.shape == (len(seq_lens), num_kv_heads, out_len, head_dim)
    for s, n in enumerate(seq_lens):
        ref = expected[s].transpose(0, 1)
        assert not torch.isnan(out[s, :, :n]).any()
        torch.testing.assert_close(out[s, :, :n], ref, rtol=0, atol=0)
        assert (out[s, :, n:] == 0).all()
    return out, expected


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_append_gather_matches_reference(fmt, role, dtype):
    _roundtrip(fmt, role, SEQ_LENS, num_kv_heads=2, head_dim=32, dtype=dtype)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("head_dim,num_kv_heads", [(8, 4), (64, 3), (128, 1)])
def test_head_shapes(fmt, head_dim, num_kv_heads):
    for role in ROLES:
        _roundtrip(fmt, role, [BLOCK + 1, 2 * BLOCK], num_kv_heads, head_dim, torch.bfloat16)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_noncontiguous_source(fmt):
    for role in ROLES:
        _roundtrip(fmt, role, [BLOCK + 3], 2, 32, torch.float32, noncontig=True)


def test_passthrough_is_bit_exact():
    for dt, fmt in [(torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")]:
        lay = layout(fmt, KEY, 2, 16, BLOCK, 1)
        pages = _pages(lay, 2, 2)
        x = torch.randn(20, 2, 16).to(dt)
        slots = torch.arange(20)
        ops.append(x, pages, slots, format=FORMATS[fmt], role=KEY, group=1, block_size=BLOCK, blocks_per_chunk=2)
        out = ops.gather(pages, torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32), None,
                         format=FORMATS[fmt], role=KEY, group=1, block_size=BLOCK, blocks_per_chunk=2,
                         num_kv_heads=2, head_dim=16, out_len=20, dtype=dt)
        assert torch.equal(out[0].transpose(0, 1), x)


def test_skip_and_negative_slots():
    lay = layout("int8", VALUE, 1, 16, BLOCK, 1)
    pages = _pages(lay, 2, 4)
    x = torch.randn(2 * BLOCK, 1, 16)
    slots = torch.arange(2 * BLOCK)
    slots[5] = -1  # skipped: its slot keeps the NaN fill
    ops.append(x, pages, slots, format=FORMATS["int8"], role=VALUE, group=1, block_size=BLOCK, blocks_per_chunk=4)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    out = ops.gather(pages, table[:, 1:], torch.tensor([10], dtype=torch.int32), torch.tensor([4], dtype=torch.int32),
                     format=FORMATS["int8"], role=VALUE, group=1, block_size=BLOCK, blocks_per_chunk=4,
                     num_kv_heads=1, head_dim=16, out_len=10, dtype=torch.float32)
    torch.testing.assert_close(out[0, 0], fake_quantize(x, "int8", VALUE)[20:30, 0], rtol=0, atol=0)
    full = ops.gather(pages, table, torch.tensor([8], dtype=torch.int32), None, format=FORMATS["int8"], role=VALUE,
                      group=1, block_size=BLOCK, blocks_per_chunk=4, num_kv_heads=1, head_dim=16, out_len=8,
                      dtype=torch.float32)
    assert torch.isnan(full[0, 0, 5]).all()
    assert not torch.isnan(full[0, 0, 4]).any()


def test_quantization_error_bounds():
    """Quantization error against the unquantized values, by NMSE (separate from kernel exactness)."""
    x = torch.randn(256, 4, 128)
    bounds = {"bf16": 1e-5, "fp16": 1e-6, "int8": 1e-4, "fp8_e4m3": 2e-3, "int4": 2e-2, "nf4": 2e-2, "int2": 0.25}
    for fmt, bound in bounds.items():
        for role in ROLES:
            g = 64 if fmt in GROUPED else 1
            y = fake_quantize(x, fmt, role, g)
            nmse = ((y - x) ** 2).sum() / (x**2).sum()
            assert nmse < bound, (fmt, role, float(nmse))


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_opcheck(fmt):
    for role in ROLES:
        group = _group(fmt, role, 32)
        lay = layout(fmt, role, 2, 32, BLOCK, group)
        pages = [torch.zeros((3, lay["block_bytes"]), dtype=torch.uint8)]
        x = torch.randn(BLOCK, 2, 32)
        slots = torch.arange(BLOCK, 2 * BLOCK)
        torch.library.opcheck(torch.ops.pagedkv.append.default,
                              (x, pages, slots, FORMATS[fmt], role, group, BLOCK, 3))
        table = torch.tensor([[1, 2]], dtype=torch.int32)
        torch.library.opcheck(torch.ops.pagedkv.gather.default,
                              (pages, table, torch.tensor([BLOCK], dtype=torch.int32), None, FORMATS[fmt], role, group,
                               BLOCK, 3, 2, 32, BLOCK, torch.float32))
        torch.library.opcheck(torch.ops.pagedkv.copy_blocks.default,
                              (pages, torch.tensor([[1, 0]]), lay["block_bytes"], 3))


BAD_OP_CALLS = [
    ("src int", lambda p, s: ops.append(torch.ones(16, 2, 32, dtype=torch.int32), p, s, **_KW), TypeError, "src must be float32"),
    ("src rank", lambda p, s: ops.append(torch.ones(16, 64), p, s, **_KW), ValueError, "src must be [num_tokens"),
    ("slot dtype", lambda p, s: ops.append(torch.ones(16, 2, 32), p, s.int(), **_KW), TypeError, "slot_mapping must be int64"),
    ("slot length", lambda p, s: ops.append(torch.ones(15, 2, 32), p, s, **_KW), ValueError, "slot_mapping must be [num_tokens=15]"),
    ("slot range", lambda p, s: ops.append(torch.ones(16, 2, 32), p, s + 1000, **_KW), ValueError, "out of range"),
    ("page dtype", lambda p, s: ops.append(torch.ones(16, 2, 32), [p[0].float()], s, **_KW), TypeError, "pages[0] must be uint8"),
    ("bad format", lambda p, s: ops.append(torch.ones(16, 2, 32), p, s, **{**_KW, "format": 42}), ValueError, "format must be in"),
]
_KW = dict(format=FORMATS["int8"], role=KEY, group=1, block_size=BLOCK, blocks_per_chunk=2)


@pytest.mark.parametrize("name,call,exc,msg", BAD_OP_CALLS, ids=[c[0] for c in BAD_OP_CALLS])
def test_op_bad_input(name, call, exc, msg):
    lay = layout("int8", KEY, 2, 32, BLOCK, 1)
    pages = [torch.full((2, lay["block_bytes"]), 7, dtype=torch.uint8)]
    before = pages[0].clone()
    with pytest.raises(exc, match=msg.replace("[", r"\[")):
        call(pages, torch.arange(16))
    assert torch.equal(pages[0], before)


def test_gather_rejects_bad_tables():
    lay = layout("bf16", KEY, 1, 16, BLOCK, 1)
    pages = [torch.zeros((2, lay["block_bytes"]), dtype=torch.uint8)]
    kw = dict(format=FORMATS["bf16"], role=KEY, group=1, block_size=BLOCK, blocks_per_chunk=2, num_kv_heads=1,
              head_dim=16, out_len=20, dtype=torch.float32)
    with pytest.raises(ValueError, match="not a block of these pages"):
        ops.gather(pages, torch.tensor([[0, 5]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32), None, **kw)
    with pytest.raises(ValueError, match="needs 2 blocks"):
        ops.gather(pages, torch.tensor([[0]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32), None, **kw)
    with pytest.raises(TypeError, match="block_table must be int32"):
        ops.gather(pages, torch.tensor([[0, 1]]), torch.tensor([20], dtype=torch.int32), None, **kw)
