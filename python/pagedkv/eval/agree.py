"""Greedy-generation agreement of each cache with the unquantized DynamicCache: ``--prompts`` WikiText-2
paragraphs cut to ``--prompt-tokens`` tokens, ``--new-tokens`` greedy tokens each, batched. Reports the
percentage of identical tokens and the first divergence per prompt (median and minimum)."""

from __future__ import annotations

import argparse
import statistics

import torch

from pagedkv.bench.common import environment, markdown_table, write_json
from pagedkv.eval.common import RIVALS, bits_per_element, load_model, make_cache, text_path
from pagedkv.eval.ppl import DEFAULT_FORMATS
from pagedkv.hf_compat import cache_kwargs


def prompts(tok, path, n: int, length: int) -> torch.Tensor:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if len(line) < 200 or line.startswith("="):
            continue
        ids = tok(line, add_special_tokens=False).input_ids
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == n:
            break
    if len(rows) < n:
        raise SystemExit(f"{path} has only {len(rows)} paragraphs of >= {length} tokens")
    return torch.tensor(rows)


@torch.no_grad()
def greedy(model, ids: torch.Tensor, cache, new_tokens: int) -> torch.Tensor:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))
    return out[:, ids.shape[1]:]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv.eval agree", description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default=None)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS)
    ap.add_argument("--rivals", nargs="*", default=RIVALS)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, name = load_model(args.model, getattr(torch, args.dtype), args.device)
    ids = prompts(tok, text_path(args.text), args.prompts, args.prompt_tokens).to(args.device)
    ref = greedy(model, ids, make_cache("dynamic", model), args.new_tokens)
    rows, results = [], []
    for m in list(args.formats) + list(args.rivals):
        try:
            out = greedy(model, ids, make_cache(m, model), args.new_tokens)
        except Exception as e:
            results.append(dict(method=m, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
            rows.append([m, "", "not run", "", ""])
            continue
        same = out == ref
        first = [int((~r).nonzero()[0]) if (~r).any() else args.new_tokens for r in same]
        rec = dict(method=m, bits=bits_per_element(m, model), identical=float(same.float().mean()),
                   first_divergence=first)
        results.append(rec)
        rows.append([m, f"{rec['bits']:.3f}", f"{100 * rec['identical']:.1f}%", statistics.median(first), min(first)])
    env = environment()
    print(f"\n{name} ({args.dtype}), {args.prompts} prompts x {args.prompt_tokens} tokens, {args.new_tokens} greedy "
          f"tokens, {env['device']}, {env['date']}\n")
    print(markdown_table(["cache", "bits / element", "identical tokens", "first divergence (median)",
                          "first divergence (min)"], rows))
    write_json(args.json, {"env": env, "model": name, "results": results})


if __name__ == "__main__":
    main()
