"""Streaming ids-to-text: per-token cost of :class:`pagedkv.TokenDecoder` against transformers'
``TextStreamer`` logic and against decoding the whole sequence every step, side by side in one run.

The output is real text (WikiText-2 test paragraphs joined into one line, the worst case for
``TextStreamer``, which re-decodes its buffer until a newline), tokenized by the chosen tokenizer and
streamed one token at a time. Every method's text is checked against ``tokenizer.decode``.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoTokenizer, TextStreamer

from pagedkv import TokenDecoder, data
from pagedkv.bench.common import environment, markdown_table, write_json


class _SilentTextStreamer(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.text: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text.append(text)


def run_textstreamer(tok, ids: list[int]) -> str:
    s = _SilentTextStreamer(tok)
    for i in ids:
        s.put(torch.tensor([i]))
    s.end()
    return "".join(s.text)


def run_full_decode(tok, ids: list[int]) -> str:
    sent = 0
    out = []
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=True)
        end = len(text.rstrip("\ufffd"))
        out.append(text[sent:end])
        sent = max(sent, end)
    out.append(tok.decode(ids, skip_special_tokens=True)[sent:])
    return "".join(out)


def run_pagedkv(dec: TokenDecoder, ids: list[int]) -> str:
    out = [dec.push([i]) for i in ids]
    out.append(dec.flush())
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv.bench decode", description=__doc__)
    ap.add_argument("--tokenizer", choices=["smollm2", "stories260k"], default="smollm2")
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 2048, 16384])
    ap.add_argument("--max-baseline", type=int, default=16384, help="skip the baselines above this length")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    path = data.smollm2() if args.tokenizer == "smollm2" else data.stories260k()
    tok = AutoTokenizer.from_pretrained(path)
    text = " ".join(line.strip() for line in data.text_file("wikitext2").read_text(encoding="utf-8").splitlines()
                    if line.strip())
    all_ids = tok(text[: 8 * max(args.lengths)], add_special_tokens=False).input_ids
    methods = {"pagedkv TokenDecoder": run_pagedkv, "TextStreamer": run_textstreamer,
               "decode whole sequence per step": run_full_decode}
    t0 = time.perf_counter()
    decoder = TokenDecoder(tok)  # one-time: vocabulary table and self-check, outside the per-token timing
    setup_ms = (time.perf_counter() - t0) * 1e3
    rows, records = [], []
    for n in args.lengths:
        ids = all_ids[:n]
        want = tok.decode(ids, skip_special_tokens=True)
        times = {}
        for name, fn in methods.items():
            if name != "pagedkv TokenDecoder" and n > args.max_baseline:
                continue
            t0 = time.perf_counter()
            got = fn(decoder if name == "pagedkv TokenDecoder" else tok, ids)
            times[name] = time.perf_counter() - t0
            exact = got == want
            records.append(dict(tokens=n, method=name, seconds=times[name], us_per_token=times[name] / n * 1e6,
                                exact=exact))
        for name, sec in times.items():
            base = times.get("TextStreamer")
            rows.append([n, name, f"{sec * 1e3:.1f}", f"{sec / n * 1e6:.2f}",
                         f"{base / sec:.1f}x" if base else "", "yes" if records[-len(times) +
                                                                                list(times).index(name)]["exact"]
                         else "NO"])
    env = environment()
    print(f"\n{args.tokenizer} tokenizer, {env['device']}, {env['date']}; TokenDecoder construction "
          f"(once per tokenizer) {setup_ms:.1f} ms, not in the per-token times\n")
    print(markdown_table(["tokens", "method", "total ms", "µs / token", "speed vs TextStreamer",
                          "text == tokenizer.decode"], rows))
    write_json(args.json, {"env": env, "tokenizer": args.tokenizer, "setup_ms": setup_ms, "results": records})


if __name__ == "__main__":
    main()
