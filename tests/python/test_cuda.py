"""CUDA ops against the CPU ops and the reference on identical inputs (runs on the GPU device only)."""

from __future__ import annotations

import pytest
import torch

import pagedkv
from pagedkv import ops
from pagedkv.config import FORMATS, GROUPED, KEY, VALUE, layout
from pagedkv.reference import fake_quantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs via scripts/gpu.sh)")
BLOCK = 16


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("role", [KEY, VALUE])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_matches_cpu_and_reference(fmt, role, head_dim):
    group = (BLOCK if role == KEY else 32) if fmt in GROUPED else 1
    lay = layout(fmt, role, 4, head_dim, BLOCK, group)
    n_tokens = 3 * BLOCK
    x = torch.randn(n_tokens, 4, head_dim, dtype=torch.bfloat16) * 2
    perm = torch.randperm(6, dtype=torch.int32)[:3]
    pos = torch.arange(n_tokens)
    slots = perm[pos // BLOCK].long() * BLOCK + pos % BLOCK
    results = []
    for dev in ("cpu", "cuda"):
        pages = [torch.full((4, lay["block_bytes"]), 0xFF, dtype=torch.uint8, device=dev) for _ in range(2)]
        ops.append(x.to(dev), pages, slots.to(dev), format=FORMATS[fmt], role=role, group=group, block_size=BLOCK,
                   blocks_per_chunk=4)
        out = ops.gather(pages, perm[None].to(dev), torch.tensor([n_tokens - 5], dtype=torch.int32, device=dev),
                         torch.tensor([5], dtype=torch.int32, device=dev), format=FORMATS[fmt], role=role, group=group,
                         block_size=BLOCK, blocks_per_chunk=4, num_kv_heads=4, head_dim=head_dim, out_len=n_tokens,
                         dtype=torch.float32)
        results.append((pages, out.cpu()))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b.cpu()), "page bytes differ between CPU and CUDA"
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
    ref = fake_quantize(x.float(), fmt, role, group)[5:].transpose(0, 1)
    torch.testing.assert_close(results[1][1][0, :, : n_tokens - 5], ref, rtol=0, atol=0)


def test_cuda_generate_identical_bf16():
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from pagedkv import data

    path = data.stories260k()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(["Once upon a time"], return_tensors="pt").input_ids.cuda()
    kw = dict(max_new_tokens=100, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, past_key_values=DynamicCache(), **kw)
    out = model.generate(ids, past_key_values=pagedkv.PagedKVCache(model.config, kv_format="bf16"), **kw)
    assert torch.equal(out, ref)
    out4 = model.generate(ids, num_beams=3, past_key_values=pagedkv.PagedKVCache(model.config, kv_format="int4",
                          residual_length=16, key_group_size=16, block_size=16), **kw)
    assert out4.shape[0] == 1
