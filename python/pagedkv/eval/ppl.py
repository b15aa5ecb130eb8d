"""Teacher-forced streaming perplexity through a KV cache.

The text is cut into windows of ``--context`` tokens (``--tokens`` in all). Each window is fed in
chunks of ``--chunk`` tokens with the cache, so every chunk attends to the stored (quantized)
history, and every token after the first chunk is scored. The same protocol runs with DynamicCache
(the unquantized reference), each pagedkv format and the rivals (transformers ``QuantizedCache`` with
quanto nbits 4 / 2 and its fp8 backend, where installed), side by side.
"""

from __future__ import annotations

import argparse
import math

import torch
from tqdm import tqdm

from pagedkv.bench.common import environment, markdown_table, write_json
from pagedkv.eval.common import RIVALS, bits_per_element, load_model, make_cache, text_path
from pagedkv.hf_compat import cache_kwargs

DEFAULT_FORMATS = ["bf16", "fp8_e4m3", "int8", "nf4", "int4", "int2"]


@torch.no_grad()
def stream_nll(model, windows: torch.Tensor, method: str, chunk: int, batch: int, progress: tqdm | None = None,
               **cache_kw) -> tuple[float, int]:
    """Summed NLL and token count over ``windows [num_windows, context]``, scoring positions >= chunk."""
    total, count = 0.0, 0
    for b0 in range(0, windows.shape[0], batch):
        ids = windows[b0:b0 + batch]
        cache = make_cache(method, model, **cache_kw)
        ctx = ids.shape[1]
        for c in range(0, ctx, chunk):
            logits = model(ids[:, c:c + chunk], use_cache=True, **cache_kwargs(model, cache)).logits.float()
            targets = ids[:, c + 1:c + chunk + 1]
            logits = logits[:, :targets.shape[1]]
            first = max(chunk - 1 - c, 0)  # score targets at positions >= chunk
            if targets.shape[1] > first:
                lp = torch.log_softmax(logits[:, first:], dim=-1)
                nll = -lp.gather(-1, targets[:, first:, None]).squeeze(-1)
                total += float(nll.sum())
                count += nll.numel()
            if progress is not None:
                progress.update(ids.shape[0] * min(chunk, ctx - c))
    return total, count


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv.eval ppl", description=__doc__)
    ap.add_argument("--model", default="smollm2", help="stories260k, smollm2 or a local HF model folder")
    ap.add_argument("--text", default=None, help="wikitext2 (default), tinystories or a text file")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=32768, help="token budget (whole windows)")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="windows evaluated together")
    ap.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS)
    ap.add_argument("--rivals", nargs="*", default=RIVALS)
    ap.add_argument("--key-group", type=int, default=None)
    ap.add_argument("--value-group", type=int, default=None)
    ap.add_argument("--residual", type=int, default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.context % args.chunk or args.context <= args.chunk:
        raise SystemExit(f"--context ({args.context}) must be a multiple of --chunk ({args.chunk}) and larger")
    model, tok, name = load_model(args.model, getattr(torch, args.dtype), args.device)
    text = text_path(args.text)
    ids = tok(text.read_text(encoding="utf-8"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_win = max(1, min(args.tokens, ids.numel()) // args.context)
    if ids.numel() < args.context:
        raise SystemExit(f"{text} has {ids.numel()} tokens, fewer than --context {args.context}")
    windows = ids[:n_win * args.context].reshape(n_win, args.context).to(args.device)
    methods = ["dynamic"] + list(args.formats) + list(args.rivals)
    cache_kw = dict(key_group=args.key_group, value_group=args.value_group, residual=args.residual)
    results = []
    with tqdm(total=len(methods) * windows.numel(), unit="tok", desc="ppl") as bar:
        for m in methods:
            bar.set_postfix_str(m)
            try:
                kw = cache_kw if m not in RIVALS and m != "dynamic" else {}
                nll, n = stream_nll(model, windows, m, args.chunk, args.batch, bar, **kw)
            except Exception as e:  # a rival's backend may be missing: say so and go on
                results.append(dict(method=m, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
                bar.update(windows.numel())
                continue
            results.append(dict(method=m, ppl=math.exp(nll / n), scored=n,
                                bits=bits_per_element(m, model, args.key_group, args.value_group)))
    ref = results[0]["ppl"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["method"], "", "not run", r["error"][:60]])
            continue
        r["delta_pct"] = 100 * (r["ppl"] / ref - 1)
        label = "DynamicCache (unquantized)" if r["method"] == "dynamic" else r["method"]
        rows.append([label, f"{r['bits']:.3f}", f"{r['ppl']:.4f}", f"{r['delta_pct']:+.3f}%"])
    env = environment()
    print(f"\n{name} ({args.dtype}), {text.name}, context {args.context}, chunk {args.chunk}, "
          f"{results[0]['scored']} scored tokens, {env['device']}, {env['date']}\n")
    print(markdown_table(["cache", "bits / element", "ppl", "delta vs unquantized"], rows))
    write_json(args.json, {"env": env, "model": name, "text": str(text), "context": args.context,
                           "chunk": args.chunk, "results": results})
    if args.plot:
        plot(args.plot, results, f"{name}, {text.name}, ctx {args.context}")


def plot(path: str, results: list[dict], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib missing: no plot written to {path})")
        return
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in results:
        if "error" in r or r["method"] == "dynamic":
            continue
        rival = r["method"] in RIVALS
        ax.scatter(r["bits"], max(r["delta_pct"], 1e-3), marker="s" if rival else "o",
                   color="tab:red" if rival else "tab:blue")
        ax.annotate(r["method"], (r["bits"], max(r["delta_pct"], 1e-3)), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per element (metadata included)")
    ax.set_ylabel("delta ppl vs unquantized (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
