"""``python -m pagedkv formats [--head-dim D] [--num-kv-heads H] [--block-size B]``: the bits-per-element table."""

from __future__ import annotations

import argparse

from pagedkv.config import format_table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv", description=__doc__)
    ap.add_argument("command", choices=["formats"])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=64)
    args = ap.parse_args(argv)
    print(format_table(args.num_kv_heads, args.head_dim, args.block_size))


if __name__ == "__main__":
    main()
