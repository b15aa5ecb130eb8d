"""Summary of ncu's per-instruction counters of one kernel (the source page exported as CSV by
`SOURCE=1 bash scripts/kernel_iter.sh`, or by `ncu -i REPORT --page source --csv --print-source sass`).

    python scripts/ncu_source.py source_int8_base.csv            # stall totals, loop vs the rest, opcodes
    python scripts/ncu_source.py source_int8_base.csv --hot 25   # + the instructions with most samples
    python scripts/ncu_source.py a.csv b.csv                     # side by side, one block per file

"Steps" is the execution count that carries the most executed instructions (the decode kernel's warp steps);
"loop" instructions are those executed at least --loop-min times (default: half of that), which
separates the per-step body from the prologue, epilogue and rarely taken branches. Accepts .csv or .csv.gz.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io


def _rows(path: str) -> tuple[list[str], list[list[str]]]:
    raw = gzip.open(path, "rt") if path.endswith(".gz") else open(path)
    with raw as f:
        rows = list(csv.reader(io.StringIO(f.read())))
    hdr_at = next(i for i, r in enumerate(rows) if "Address" in r and "Source" in r)
    return rows[hdr_at], [r for r in rows[hdr_at + 1:] if len(r) == len(rows[hdr_at])]


def _num(x: str) -> float:
    try:
        return float(x.replace(",", "") or 0)
    except ValueError:
        return 0.0


def summarize(path: str, hot: int, loop_min: int | None) -> None:
    hdr, rows = _rows(path)
    ix = {h: i for i, h in enumerate(hdr)}
    stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    recs = []
    for r in rows:
        recs.append((r[ix["Address"]], r[ix["Source"]], int(_num(r[ix["Instructions Executed"]])),
                     int(_num(r[ix["Warp Stall Sampling (All Samples)"]])), {h: _num(r[ix[h]]) for h in stalls}))
    counts = collections.Counter(n for _, _, n, _, _ in recs if n)
    top = max(counts, key=lambda n: n * counts[n])  # the count that carries the most executed instructions
    cut = loop_min if loop_min is not None else top // 2
    inst = sum(n for _, _, n, _, _ in recs)
    samples = sum(s for _, _, _, s, _ in recs)
    loop_s = sum(s for _, _, n, s, _ in recs if n >= cut)
    loop_i = sum(n for _, _, n, _, _ in recs if n >= cut)
    tot = collections.Counter()
    for *_, st in recs:
        tot.update(st)
    print(f"== {path}")
    print(f"instructions {inst:,} (loop {loop_i:,}, {loop_i / top:.0f} per step; steps {top:,}, loop = executed >= {cut:,})")
    print(f"stall samples {samples:,}: loop {loop_s:,} ({100 * loop_s / max(samples, 1):.0f}%), "
          f"rest {samples - loop_s:,}")
    s = sum(tot.values()) or 1
    print("by reason: " + ", ".join(f"{k[6:]} {100 * v / s:.1f}%" for k, v in tot.most_common(10)))
    ops = collections.Counter()
    for _, src, n, _, _ in recs:
        if n >= cut:
            words = src.split()
            op = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "?")
            ops[op.split(".")[0]] += n
    print("loop opcodes per step: " + ", ".join(f"{k} {v / top:.1f}" for k, v in ops.most_common(16)))
    if hot:
        print(f"hottest {hot} instructions by stall samples (address, executed, samples, top reasons, source):")
        for a, src, n, smp, st in sorted(recs, key=lambda x: -x[3])[:hot]:
            why = ", ".join(f"{k[6:]} {int(v)}" for k, v in sorted(st.items(), key=lambda kv: -kv[1])[:2] if v)
            print(f"  {a} {n:>9,} {smp:>6}  [{why}]  {src[:80]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--hot", type=int, default=0, help="also list this many instructions with most stall samples")
    ap.add_argument("--loop-min", type=int, default=None, help="executions that make an instruction part of the loop")
    a = ap.parse_args()
    for path in a.csv:
        summarize(path, a.hot, a.loop_min)


if __name__ == "__main__":
    main()
