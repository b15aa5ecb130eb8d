"""Does left padding hurt the grouped key formats? A padded row's padded positions (whatever the prefill
computed there) would share its first key group with real tokens, and its exact first position would be
a padded one; PagedKVCache.note_padding (called by the "pagedkv" mask function) prevents both.

    python scripts/pad_probe.py [--fmt int4] [--rows 4] [--steps 120]   (SmolLM2, CPU, a few minutes)

Teacher-forced logits of WikiText-2 rows in one batch, left-padded by 0 / 17 / 30 / 63 / ... tokens
(prompts of 200 + 63 - pad tokens), against fp32 pages on the same batch: mean KL(fp32 || fmt) per
step and top-1 agreement, with and without the padding hand-over, and each row alone unpadded
("padded rows" there: the rows that the batch pads)."""

from __future__ import annotations

import argparse
import contextlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pagedkv
from pagedkv import data

PROMPT = 200
PADS = (0, 17, 30, 63, 5, 45, 62, 1)


def run(model, rows: torch.Tensor, pads: list[int], width: int, fmt: str, pad_id: int, steps: int) -> torch.Tensor:
    """Logits [rows, steps, vocab] of teacher-forced decoding from a prompt batch `width` wide; row b is
    left-padded by pads[b] (its prompt is its first width - pads[b] tokens)."""
    x = torch.full((len(rows), width), pad_id)
    m = torch.zeros_like(x)
    nxt = torch.empty(len(rows), steps - 1, dtype=torch.long)
    for b, p in enumerate(pads):
        x[b, p:] = rows[b, :width - p]
        m[b, p:] = 1
        nxt[b] = rows[b, width - p:width - p + steps - 1]
    cache = pagedkv.PagedKVCache(model.config, fmt)
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.inference_mode():
        out.append(model(x, attention_mask=m, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1])
        p = pos[:, -1:]
        for i in range(steps - 1):
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            p = p + 1
            out.append(model(nxt[:, i:i + 1], attention_mask=m, position_ids=p, past_key_values=cache,
                             use_cache=True).logits[:, -1])
    return torch.stack(out, 1).float()


@contextlib.contextmanager
def no_hand_over():
    """The cache as before note_padding existed: padding is not noted."""
    keep = pagedkv.PagedKVCache.note_padding
    pagedkv.PagedKVCache.note_padding = lambda self, mask: None
    try:
        yield
    finally:
        pagedkv.PagedKVCache.note_padding = keep


def compare(ref: torch.Tensor, lg: torch.Tensor, pads: list[int]) -> str:
    kl = torch.nn.functional.kl_div(lg.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    agree = (lg.argmax(-1) == ref.argmax(-1)).float()
    padded = torch.tensor([p > 0 for p in pads])
    part = lambda t, sel: f"{t[sel].mean().item():.4f}" if sel.any() else "-"  # noqa: E731
    return (f"KL {kl.mean().item():.4f} (padded rows {part(kl, padded)}, unpadded {part(kl, ~padded)}); "
            f"top-1 {agree.mean().item():.3f} (padded {part(agree, padded)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", default="int4")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = data.smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.set_attn_implementation("pagedkv")
    ids = tok(data.text_file("wikitext2").read_text(encoding="utf-8")[:60000], return_tensors="pt").input_ids[0]
    n = PROMPT + max(PADS) + args.steps
    rows = torch.stack([ids[1000 * b:1000 * b + n] for b in range(args.rows)])
    pads = list(PADS[:args.rows])
    pad_id = tok.eos_token_id or 0
    width = PROMPT + max(pads)
    ref = run(model, rows, pads, width, "fp32", pad_id, args.steps)
    print(f"pads {pads}, {args.rows} rows x {args.steps} steps, {args.fmt} against fp32 pages on the same batch")
    # Each row alone, unpadded (batch 1, the same prompt as in the batch).
    alone = [tuple(run(model, rows[b:b + 1], [0], width - p, f, pad_id, args.steps) for f in ("fp32", args.fmt))
             for b, p in enumerate(pads)]
    print(f"{args.fmt} each row alone:     {compare(torch.cat([a for a, _ in alone]), torch.cat([b for _, b in alone]), pads)}")
    print(f"{args.fmt} padded, noted:      {compare(ref, run(model, rows, pads, width, args.fmt, pad_id, args.steps), pads)}")
    with no_hand_over():
        lg = run(model, rows, pads, width, args.fmt, pad_id, args.steps)
    print(f"{args.fmt} padded, not noted:  {compare(ref, lg, pads)}")


if __name__ == "__main__":
    main()
