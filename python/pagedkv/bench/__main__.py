"""``python -m pagedkv.bench <memory|attention|generate|decode|prefix|longctx|tp> [options]``."""

from __future__ import annotations

import sys


def main() -> None:
    commands = {"memory": "pagedkv.bench.memory", "attention": "pagedkv.bench.attention", "decode": "pagedkv.bench.decode",
                "generate": "pagedkv.bench.generate", "prefix": "pagedkv.bench.prefix", "longctx": "pagedkv.bench.longctx",
                "tp": "pagedkv.bench.tp"}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m pagedkv.bench {{{','.join(commands)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    import importlib

    name = sys.argv.pop(1)
    importlib.import_module(commands[name]).main(sys.argv[1:])


if __name__ == "__main__":
    main()
