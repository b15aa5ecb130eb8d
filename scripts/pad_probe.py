"""Does left padding hurt int4? A padded row's padded positions (whatever the prefill computed there)
share its first key group with real tokens, and its exact first position is a padded one.

    python scripts/pad_probe.py   (SmolLM2, CPU, 2 threads, about 2 minutes)

Teacher-forced logits of one WikiText-2 row (200-token prompt, 120 steps), left-padded by 0 / 30 / 63
tokens in a batch of 2, against the same row on fp32 pages unpadded: next-token NLL, top-1 agreement
and the largest logit difference. One row: a probe, not a benchmark."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pagedkv
from pagedkv import data

PROMPT, STEPS = 200, 120


def run(model, ids: torch.Tensor, row: torch.Tensor, fmt: str, pad: int, pad_id: int) -> torch.Tensor:
    """Logits of `row` (batch row 0, left-padded by `pad`) at each teacher-forced step; row 1 is other text."""
    x = torch.stack([torch.cat([torch.full((pad,), pad_id), row[:PROMPT]]), ids[1000:1000 + pad + PROMPT]])
    m = torch.ones_like(x)
    m[0, :pad] = 0
    cache = pagedkv.PagedKVCache(model.config, fmt)
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.inference_mode():
        out.append(model(x, attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True).logits[0, -1])
        p = pos[:, -1:]
        for i in range(STEPS - 1):
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            p = p + 1
            t = torch.stack([row[PROMPT + i], ids[1000 + pad + PROMPT + i]])[:, None]
            out.append(model(t, attention_mask=m, position_ids=p, past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(out)


def main() -> None:
    torch.set_num_threads(2)
    path = data.smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("pagedkv")
    ids = tok(data.text_file("wikitext2").read_text(encoding="utf-8")[:20000], return_tensors="pt").input_ids[0]
    row = ids[:PROMPT + STEPS]
    target = row[PROMPT:PROMPT + STEPS]
    pad_id = tok.eos_token_id or 0
    ref = run(model, ids, row, "fp32", 0, pad_id)
    nll = lambda lg: torch.nn.functional.cross_entropy(lg, target).item()  # noqa: E731
    print(f"fp32 pad  0: nll {nll(ref):.4f}")
    for pad in (0, 30, 63):
        lg = run(model, ids, row, "int4", pad, pad_id)
        agree = (lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"int4 pad {pad:2d}: nll {nll(lg):.4f}  top-1 agreement with fp32 {agree:.3f}  "
              f"max |dlogit| {(lg - ref).abs().max().item():.3f}")


if __name__ == "__main__":
    main()
