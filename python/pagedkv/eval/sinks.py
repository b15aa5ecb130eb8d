"""Perplexity of a stream longer than the model's trained context, with and without the sinks policy.

One stream of ``--multiple`` x the model's context (stories260K: 8 x 512 = 4096 tokens of TinyStories)
is scored token by token (``--chunk 1``, the exact streaming setting) through:

- ``sinks``: pagedkv's attention sinks + recent window (``--sinks`` + window = context), sinks re-rotated;
- ``truncation``: the recent window alone (same number of keys, no sinks);
- ``none``: the whole history, positions running past the trained context;
- ``in-context`` (the reference): the same tokens cut into independent windows of the trained context.

Printed: perplexity over the whole stream, over its last eighth, and the ratio to in-context.
"""

from __future__ import annotations

import argparse
import math

import torch
from tqdm import tqdm

from pagedkv import PagedKVCache
from pagedkv.bench.common import environment, markdown_table, write_json
from pagedkv.eval.common import load_model, text_path
from pagedkv.hf_compat import cache_kwargs


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """NLL of ids[1:] given everything before, fed in chunks through ``cache``; [len - 1]."""
    out = []
    n = ids.shape[1]
    for c in tqdm(range(0, n - 1, chunk), leave=False, desc="stream"):
        piece = ids[:, c:min(c + chunk, n - 1)]
        logits = model(piece, use_cache=True, **cache_kwargs(model, cache)).logits.float()
        targets = ids[:, c + 1:c + 1 + piece.shape[1]]
        out.append(-torch.log_softmax(logits, -1).gather(-1, targets[..., None])[0, :, 0])
    return torch.cat(out)


@torch.no_grad()
def in_context_nll(model, ids: torch.Tensor, context: int) -> torch.Tensor:
    out = []
    for c in range(0, ids.shape[1] - 1, context):
        w = ids[:, c:c + context + 1]
        logits = model(w[:, :-1]).logits.float()
        out.append(-torch.log_softmax(logits, -1).gather(-1, w[:, 1:, None])[0, :, 0])
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv.eval sinks", description=__doc__)
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--text", default="tinystories")
    ap.add_argument("--multiple", type=int, default=8, help="stream length in trained contexts")
    ap.add_argument("--context", type=int, default=None, help="trained context (default: max_position_embeddings)")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=1, help="tokens per forward (1 = exact streaming)")
    ap.add_argument("--formats", nargs="+", default=["fp32", "int4"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    model, tok, name = load_model(args.model, torch.float32)
    context = args.context or model.config.max_position_embeddings
    length = args.multiple * context
    text = text_path(args.text).read_text()
    ids = tok(text[: length * 8], return_tensors="pt").input_ids[:, : length + 1]
    if ids.shape[1] < length + 1:
        raise SystemExit(f"the text has only {ids.shape[1]} tokens; need {length + 1}")
    window = context - args.sinks
    rotary = model.model.rotary_emb

    results = {"in-context": in_context_nll(model, ids, context)}
    for fmt in args.formats:
        results[f"sinks {args.sinks}+{window} ({fmt})"] = token_nll(
            model, ids, PagedKVCache(model.config, fmt, recent_window=window, sink_tokens=args.sinks, rotary=rotary),
            args.chunk)
    fmt = args.formats[0]
    results[f"truncation 0+{context} ({fmt})"] = token_nll(model, ids, PagedKVCache(model.config, fmt,
                                                                                  recent_window=context), args.chunk)
    results[f"none ({fmt})"] = token_nll(model, ids, PagedKVCache(model.config, fmt), args.chunk)

    def ppl(nll: torch.Tensor) -> float:
        return math.exp(float(nll.mean()))

    ref = ppl(results["in-context"])
    tail = length - length // 8
    rows, records = [], []
    for method, nll in results.items():
        p, p_tail = ppl(nll), ppl(nll[tail:])
        rows.append([method, f"{p:.3f}", f"{p_tail:.3f}", f"{p / ref:.3f}x"])
        records.append(dict(method=method, ppl=p, ppl_last_eighth=p_tail, ratio_vs_in_context=p / ref,
                            segments=[ppl(nll[i:i + context]) for i in range(0, length, context)]))
    print(f"## {name}: stream of {length} tokens ({args.multiple} x context {context}), chunk {args.chunk}\n")
    print(markdown_table(["method", "ppl", "ppl last 1/8", "vs in-context"], rows))
    if args.json:
        write_json(args.json, dict(environment(), model=name, context=context, length=length, sinks=args.sinks,
                                   chunk=args.chunk, results=records))


if __name__ == "__main__":
    main()
