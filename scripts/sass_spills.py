"""Per kernel in a cuobjdump -sass listing: instruction count, the local-memory (spill) loads and
stores with their positions, and an opcode histogram of the largest loop (the span of the backward
branch that covers the most instructions), so hot-loop costs can be compared between builds.

Usage: python scripts/sass_spills.py SASS_FILE [NAME_SUBSTRING] [--dump DIR]
(--dump writes each matching kernel's SASS to DIR/<index>.sass).
"""
import collections
import os
import re
import sys

LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse(part):
    ins = []
    for l in part.split("\n"):
        m = LINE.match(l)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    return ins


def opcode(text):
    t = re.sub(r"^@!?U?P\w+\s+", "", text)
    return t.split()[0] if t else ""


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    dump = sys.argv[sys.argv.index("--dump") + 1] if "--dump" in sys.argv else None
    if dump:
        args = [a for a in args if a != dump]
        os.makedirs(dump, exist_ok=True)
    text = open(args[0]).read()
    want = args[1] if len(args) > 1 else ""
    for k, part in enumerate(re.split(r"\n\s*Function : ", text)[1:]):
        name = part.split("\n", 1)[0].strip()
        if want not in name:
            continue
        ins = parse(part)
        addr = {a: i for i, (a, _) in enumerate(ins)}
        local = [(i, t) for i, (_, t) in enumerate(ins) if re.search(r"\b(STL|LDL)\b", t)]
        loops = []
        for i, (a, t) in enumerate(ins):
            m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", t)
            if m:
                tgt = int(m.group(1), 16)
                if tgt <= a and tgt in addr:
                    loops.append((i - addr[tgt], addr[tgt], i))
        print(f"[{k}] {name[:120]}: {len(ins)} instructions, {len(local)} local loads/stores")
        if loops:
            n, lo, hi = max(loops)
            hist = collections.Counter(opcode(t) for _, t in ins[lo:hi + 1])
            inl = [i for i, _ in local if lo <= i <= hi]
            print(f"  largest loop [{lo}, {hi}] ({n + 1} instructions), spill ops inside: {len(inl)}")
            print("  " + ", ".join(f"{o} {c}" for o, c in hist.most_common(40)))
        for i, t in local[:24]:
            print(f"  {i:6d} {t[:90]}")
        if dump:
            with open(os.path.join(dump, f"{k}.sass"), "w") as f:
                f.write(name + "\n" + "\n".join(f"{i:5d} {a:06x} {t}" for i, (a, t) in enumerate(ins)) + "\n")


if __name__ == "__main__":
    main()
