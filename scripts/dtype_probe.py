"""Decode attention with the query in bf16 against fp16 on the same pages (int4 / int2 / int8, Llama-3-8B
heads, batch 8, 32k, 64-token pages; random keys, which also serve as the values): what the bf16 feed's extra
unpacking costs. Stream time, two rounds.

    python scripts/dtype_probe.py
"""

import torch

from pagedkv.bench.attention import SHAPES, Pages
from pagedkv.bench.timing import stream_time_us

hq, hkv, d = SHAPES["llama3-8b"]
dev = torch.device("cuda")
torch.manual_seed(0)
q = torch.randn(8, hq, 1, d, device=dev, dtype=torch.bfloat16)
k = torch.randn(8, hkv, 32768, d, device=dev, dtype=torch.bfloat16)
for fmt in ["int4", "int2", "int8"]:
    pages = Pages(k, k, fmt, 64)
    for rep in range(2):
        for dt in [torch.bfloat16, torch.float16]:
            qq = q.to(dt)
            t = stream_time_us(lambda: pages(qq), dev, reps=50)
            print(fmt, dt, rep, round(t, 1), flush=True)
    del pages
