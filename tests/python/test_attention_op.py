"""The fused paged_attention op against the fp32 reference on the same dequantized values."""

from __future__ import annotations

import pytest
import torch

from pagedkv import ops
from pagedkv.config import FORMATS
from pagedkv.reference import dense_attention
from paged_inputs import PagedInputs

ALL = ["fp32", "bf16", "fp16", "fp8_e4m3", "int8", "int4", "int2", "nf4"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference(pi: PagedInputs, query, k_tail=None, v_tail=None, scale=None, window=0, softcap=0.0, kv_mask=None,
              mask_offset=0):
    """Per sequence: dense fp32 attention over gathered pages + tail; [B, Lq, Hq, D]."""
    outs = []
    for s in range(query.shape[0]):
        k, v = pi.dense(s)
        if k_tail is not None:
            k = torch.cat([k, k_tail[s:s + 1].float()], 2)
            v = torch.cat([v, v_tail[s:s + 1].float()], 2)
        n, lq = k.shape[2], query.shape[2]
        km = None
        if kv_mask is not None:
            km = kv_mask[s:s + 1, mask_offset:mask_offset + n].bool()
        o = dense_attention(query[s:s + 1], k.to(query.device), v.to(query.device), scale=scale,
                            causal_offset=n - lq, sliding_window=window or None, softcap=softcap or None,
                            key_mask=km)
        outs.append(o.transpose(1, 2))
    return torch.cat(outs)


def _close(out, ref, dtype=torch.float32):
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("gqa", [1, 4, 8])
def test_formats_gqa_lengths(device, fmt, gqa):
    bs = 64 if fmt in ("int4", "int2", "nf4") else 16
    lens = [1, bs - 1, bs, bs + 1, 5 * bs + 7]
    pi = PagedInputs(lens, [0] * len(lens), fmt, fmt, 2, 64, block_size=bs, device=device, seed=gqa)
    q = torch.randn(len(lens), 2 * gqa, 1, 64, device=device)
    out = pi.attend(q, scale=0.125)
    assert not out.isnan().any()
    _close(out, reference(pi, q, scale=0.125))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "int8", "int4", "int2", "nf4"])
@pytest.mark.parametrize("head_dim", [8, 64, 128, 256])
def test_head_dims_tail_and_splits(device, fmt, head_dim):
    pi = PagedInputs([300, 64, 0], [3, 0, 0], fmt, fmt, 2, head_dim, device=device)
    q = torch.randn(3, 4, 1, head_dim, device=device)
    kt, vt = torch.randn(3, 2, 5, head_dim, device=device), torch.randn(3, 2, 5, head_dim, device=device)
    ref = reference(pi, q, kt, vt, scale=head_dim ** -0.5)
    for splits in (0, 1, 4):
        _close(pi.attend(q, kt, vt, scale=head_dim ** -0.5, num_splits=splits), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["fp32", "fp8_e4m3", "int8", "int4", "int2", "nf4"])
def test_long_context_across_softmax_chunks(device, fmt):
    """Contexts over several of the CPU op's 512-entry softmax chunks, with a skip and a tail: the
    running max grows between chunks (a later key scores far higher), so the accumulators rescale."""
    pi = PagedInputs([1700, 530], [0, 0], fmt, fmt, 2, 128, device=device, seed=3)
    q = torch.randn(2, 8, 2, 128, device=device)
    kt, vt = torch.randn(2, 2, 2, 128, device=device), torch.randn(2, 2, 2, 128, device=device)
    kt[:, :, -1] = 4 * q[:, ::4, 1]  # the newest key matches the last query token of a head of each group
    ref = reference(pi, q, kt, vt, scale=128 ** -0.5)
    for splits in (0, 1, 3):
        _close(pi.attend(q, kt, vt, scale=128 ** -0.5, num_splits=splits), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_query_chunk_is_causal(device, fmt):
    pi = PagedInputs([200, 130], [0, 10], fmt, fmt, 2, 64, device=device)
    q = torch.randn(2, 8, 7, 64, device=device)
    kt, vt = torch.randn(2, 2, 7, 64, device=device), torch.randn(2, 2, 7, 64, device=device)
    _close(pi.attend(q, kt, vt, scale=0.125, num_splits=3), reference(pi, q, kt, vt, scale=0.125))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int2"])
def test_window_softcap_mask(device, fmt):
    pi = PagedInputs([180, 90], [30, 0], fmt, fmt, 2, 64, device=device)
    q = torch.randn(2, 4, 3, 64, device=device)
    kt, vt = torch.randn(2, 2, 3, 64, device=device), torch.randn(2, 2, 3, 64, device=device)
    mask = torch.rand(2, 20 + 183, device=device) > 0.3
    kw = dict(scale=0.3, window=50, softcap=5.0)
    out = pi.attend(q, kt, vt, kv_mask=mask, mask_offset=20, num_splits=2, **kw)
    _close(out, reference(pi, q, kt, vt, kv_mask=mask, mask_offset=20, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_query_and_tail(device, dtype):
    pi = PagedInputs([333], [0], "int8", "int8", 2, 128, block_size=16, device=device)
    q = torch.randn(1, 8, 1, 128, device=device, dtype=dtype)
    kt, vt = (torch.randn(1, 2, 9, 128, device=device, dtype=dtype) for _ in range(2))
    out = pi.attend(q, kt, vt, scale=128 ** -0.5)
    assert out.dtype == dtype and out.shape == (1, 1, 8, 128)
    _close(out, reference(pi, q.float(), kt, vt, scale=128 ** -0.5), dtype)


HALF_CASES = [  # head_dim, gqa, query tokens, window, softcap, masked
    (64, 1, 1, 0, 0.0, False), (128, 4, 1, 0, 0.0, False), (256, 8, 1, 0, 0.0, False),
    (128, 4, 3, 40, 0.0, True), (64, 8, 5, 0, 4.0, False),
    (128, 2, 3, 40, 3.0, True), (64, 1, 1, 30, 0.0, True),  # at most 8 rows: the swapped-operand kernel
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8_e4m3", "int8", "int4", "int2", "nf4"])
@pytest.mark.parametrize("case", range(len(HALF_CASES)))
def test_half_precision_models(device, dtype, fmt, case):
    """bf16 / fp16 models (on CUDA: the tensor-core kernel): every format, head_dim 64/128/256, GQA 1/4/8,
    lengths 1 / block-1 / block / block+1 / long with a tail, query chunks (causal), window, softcap, mask,
    several row tiles (8 x 5 rows), split and unsplit."""
    d, gqa, lq, window, softcap, masked = HALF_CASES[case]
    bs = 64 if fmt in ("int4", "int2", "nf4") else 16
    lens = [1, bs - 1, bs, bs + 1, 9 * bs + 7]
    skips = [0, 3, 0, 1, 5] if fmt not in ("int4", "int2", "nf4") else [0] * 5
    pi = PagedInputs(lens, skips, fmt, fmt, 2, d, block_size=bs, device=device, seed=case)
    q = torch.randn(len(lens), 2 * gqa, lq, d, device=device).to(dtype)
    kt, vt = (torch.randn(len(lens), 2, lq + 2, d, device=device).to(dtype) for _ in range(2))
    kw = dict(scale=d ** -0.5, window=window, softcap=softcap)
    mask = None
    if masked:
        mask = torch.rand(len(lens), max(lens) + lq + 2, device=device) > 0.2
        mask[:, 0] = True  # every row keeps a key
        kw["kv_mask"] = mask
    ref = reference(pi, q.float(), kt, vt, **kw)
    for splits in (0, 1, 3):
        out = pi.attend(q, kt, vt, num_splits=splits, **kw)
        assert out.dtype == dtype and not out.isnan().any()
        _close(out, ref, dtype)


LONG_TAILS = [  # tail tokens, query tokens, window, masked
    (200, 1, 0, False), (150, 3, 120, True), (17, 1, 0, False), (70, 2, 0, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int2"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_long_dense_tail(device, fmt, d):
    """A dense tail of up to 200 tokens (a grouped format's residual window plus a key group) beside
    pages of very different lengths (none too), split and unsplit, a window that starts inside the
    tail, a key mask, a query chunk: on CUDA the decode kernel hands the tail's steps round every warp
    of the sequence's splits, whose pages lie elsewhere."""
    bs = 64 if fmt in ("int4", "int2") else 16
    lens = [0, 40, 9 * 64 + 7, 1500]
    pi = PagedInputs(lens, [0] * 4, fmt, fmt, 2, d, block_size=bs, device=device, seed=d)
    for tail, lq, window, masked in LONG_TAILS:
        q = torch.randn(len(lens), 8, lq, d, device=device).to(torch.bfloat16)
        kt, vt = (torch.randn(len(lens), 2, tail, d, device=device).to(torch.bfloat16) for _ in range(2))
        kw = dict(scale=d ** -0.5, window=window)
        if masked:
            mask = torch.rand(len(lens), max(lens) + tail, device=device) > 0.2
            mask[torch.arange(len(lens)), torch.tensor(lens) + tail - 1] = True  # every row keeps a key
            kw["kv_mask"] = mask
        ref = reference(pi, q.float(), kt, vt, **kw)
        for splits in (0, 1, 3, 8):
            out = pi.attend(q, kt, vt, num_splits=splits, **kw)
            assert not out.isnan().any()
            _close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "int8", "int4", "int2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_query_row_stays_in_its_row(device, fmt, bad):
    """A NaN / Inf in one query row leaves every other row exactly as it was, and that row gives no
    plausible-looking numbers: NaN, or zeros where every score is NaN and the row counts as fully
    masked (on CUDA: the decode kernel, including the int8 path that quantizes the query per row)."""
    bs = 64 if fmt in ("int4", "int2") else 16
    pi = PagedInputs([300, 37], [0, 0], fmt, fmt, 2, 128, block_size=bs, device=device, seed=11)
    q = torch.randn(2, 8, 1, 128, device=device).to(torch.bfloat16)
    good = pi.attend(q, scale=128 ** -0.5)
    q[1, 5, 0, 17] = bad  # sequence 1, query head 5 (KV head 1)
    out = pi.attend(q, scale=128 ** -0.5)
    row = out[1, 0, 5].float()
    assert (row.isnan() | (row == 0)).all()
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, 5] = False
    torch.testing.assert_close(out[:, 0][keep], good[:, 0][keep], atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["int4", "int2"])
@pytest.mark.parametrize("groups", [(16, 8), (32, 64), (64, 32), (8, 16), (16, 128)])
@pytest.mark.parametrize("d", [64, 128])
def test_grouped_formats_any_groups_and_skips(device, dtype, fmt, groups, d):
    """int4 / int2 with other key groups (tokens) and value groups (channels), sequences starting
    mid-block (skip), a query chunk with a window: on CUDA this covers the folded-scale path of the
    tensor-core kernels (key groups >= 16; value groups >= 64 in the swapped-operand one, where a
    value group of 128 spans two of its 64-channel chunks, >= 8 in the row-major one), their step
    alignment to positions that are multiples of 16, and the fallback (key group 8)."""
    kg, vg = groups
    lens = [1, 63, 64, 9 * 64 + 7, 5 * 64 + 30]
    skips = [0, 5, 16, 21, 57]
    skips = [sk // kg * kg for sk in skips]  # grouped keys start on a key-group boundary
    pi = PagedInputs(lens, skips, fmt, fmt, 2, d, block_size=64, device=device, seed=kg + vg, key_group=kg,
                     value_group=min(vg, d))
    for lq, window in ((1, 0), (3, 150)):
        q = torch.randn(len(lens), 8, lq, d, device=device).to(dtype)
        kt, vt = (torch.randn(len(lens), 2, lq + 5, d, device=device).to(dtype) for _ in range(2))
        kw = dict(scale=d ** -0.5, window=window)
        ref = reference(pi, q.float(), kt, vt, **kw)
        for splits in (0, 3):
            out = pi.attend(q, kt, vt, num_splits=splits, **kw)
            assert out.dtype == dtype and not out.isnan().any()
            _close(out, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_query_and_tail(device):
    pi = PagedInputs([100, 40], [0, 0], "bf16", "bf16", 2, 64, block_size=16, device=device)
    q = torch.randn(2, 1, 8, 64, device=device).transpose(1, 2)  # [B, Hq, 1, D] with odd strides
    kv = torch.randn(2, 4, 2, 64, device=device).transpose(1, 2)  # [B, 2, 4, D]
    _close(pi.attend(q, kv, kv * 2, scale=0.125), reference(pi, q, kv, kv * 2, scale=0.125))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_tail_views(device, dtype):
    # Tails one element into their storage (not 16-byte aligned; the CUDA op copies them for its
    # 16-byte tail loads), one of them also with odd strides.
    pi = PagedInputs([100, 40], [0, 0], "int4", "int4", 2, 64, block_size=64, device=device)
    q = torch.randn(2, 8, 1, 64, device=device, dtype=dtype)
    kt = torch.randn(2 * 2 * 5 * 64 + 1, device=device, dtype=dtype)[1:].view(2, 2, 5, 64)
    vt = torch.randn(2 * 5 * 2 * 64 + 1, device=device, dtype=dtype)[1:].view(2, 5, 2, 64).transpose(1, 2)
    assert kt.data_ptr() % 16 and vt.data_ptr() % 16
    _close(pi.attend(q, kt, vt, scale=0.125), reference(pi, q.float(), kt, vt, scale=0.125), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_out_rows_are_zero(device):
    pi = PagedInputs([50], [0], "bf16", "bf16", 1, 64, block_size=16, device=device)
    q = torch.randn(1, 2, 1, 64, device=device)
    mask = torch.zeros(1, 50, dtype=torch.bool, device=device)
    out = pi.attend(q, kv_mask=mask, scale=0.1, num_splits=3)
    assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "int8", "int4", "int2", "nf4"])
def test_cpu_and_cuda_agree(fmt):
    """Identical pages, tables and queries on both devices give the same output."""
    cpu = PagedInputs([300, 77, 5], [0, 9, 0], fmt, fmt, 2, 128, device="cpu", seed=3)
    q = torch.randn(3, 8, 2, 128)
    kt, vt = torch.randn(3, 2, 4, 128), torch.randn(3, 2, 4, 128)
    kw = dict(k_format=FORMATS[fmt], v_format=FORMATS[fmt], k_group=cpu.kg, v_group=cpu.vg, block_size=cpu.bs,
              blocks_per_chunk=cpu.bpc, num_kv_heads=2, scale=0.1, window=200)
    out_cpu = ops.paged_attention(q, cpu.k_pages, cpu.v_pages, cpu.table, cpu.lens, skip=cpu.skip, k_tail=kt,
                                  v_tail=vt, **kw)
    dev = lambda ts: [t.cuda() for t in ts]  # noqa: E731
    out_gpu = ops.paged_attention(q.cuda(), dev(cpu.k_pages), dev(cpu.v_pages), cpu.table.cuda(), cpu.lens.cuda(),
                                  skip=cpu.skip.cuda(), k_tail=kt.cuda(), v_tail=vt.cuda(), **kw)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    pi = PagedInputs([70, 20], [0, 3], "int4", "int8", 2, 64, device=device)
    q = torch.randn(2, 4, 2, 64, device=device)
    kt, vt = torch.randn(2, 2, 2, 64, device=device), torch.randn(2, 2, 2, 64, device=device)
    args = (q, pi.k_pages, pi.v_pages, pi.table, pi.lens, pi.skip, kt, vt, None, 0, FORMATS["int4"], FORMATS["int8"],
            pi.kg, pi.vg, 64, pi.bpc, 2, 0.125, 0.0, 0, 0)
    torch.library.opcheck(torch.ops.pagedkv.paged_attention.default, args)


def _bad_calls():
    pi = PagedInputs([70], [0], "int8", "int8", 2, 64, block_size=16)
    q = torch.randn(1, 4, 1, 64)
    base = dict(query=q, k_pages=pi.k_pages, v_pages=pi.v_pages, block_table=pi.table, seq_lens=pi.lens,
                k_format=FORMATS["int8"], v_format=FORMATS["int8"], block_size=16, blocks_per_chunk=pi.bpc,
                num_kv_heads=2, scale=0.125)
    bad_table = pi.table.clone()
    bad_table[0, 0] = 10_000
    return base, [
        ("query", dict(query=q[0]), "query must be"),
        ("query dtype", dict(query=q.double()), "query must be float32"),
        ("heads", dict(num_kv_heads=3), "not a multiple of num_kv_heads"),
        ("table dtype", dict(block_table=pi.table.long()), "block_table must be int32"),
        ("block id", dict(block_table=bad_table), "is not a block of these pages"),
        ("seq_lens", dict(seq_lens=torch.tensor([10_000], dtype=torch.int32)), "needs"),
        ("negative len", dict(seq_lens=torch.tensor([-1], dtype=torch.int32)), "is negative"),
        ("tail alone", dict(k_tail=torch.randn(1, 2, 1, 64)), "given together"),
        ("tail dtype", dict(k_tail=torch.randn(1, 2, 1, 64).half(), v_tail=torch.randn(1, 2, 1, 64).half()),
         "must have the query's dtype"),
        ("tail heads", dict(k_tail=torch.randn(1, 3, 1, 64), v_tail=torch.randn(1, 3, 1, 64)), "k_tail must be"),
        ("mask short", dict(kv_mask=torch.ones(1, 10, dtype=torch.bool)), "kv_mask has 10 positions"),
        ("format", dict(k_format=99), "format must be in"),
        ("scale", dict(scale=float("nan")), "scale must be"),
        ("window", dict(window=-2), "window must be"),
        ("softcap", dict(softcap=-1.0), "softcap must be"),
        ("splits", dict(num_splits=-1), "num_splits"),
    ]


@pytest.mark.parametrize("case", range(16))
def test_bad_input(case):
    base, cases = _bad_calls()
    name, change, msg = cases[case]
    kw = {**base, **change}
    q = kw.pop("query")
    kp, vp, t, ln = kw.pop("k_pages"), kw.pop("v_pages"), kw.pop("block_table"), kw.pop("seq_lens")
    with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
        ops.paged_attention(q, kp, vp, t, ln, **kw)
