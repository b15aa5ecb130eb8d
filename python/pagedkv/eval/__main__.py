"""``python -m pagedkv.eval <ppl|agree|sinks> [options]``."""

from __future__ import annotations

import importlib
import sys


def main() -> None:
    commands = {"ppl": "pagedkv.eval.ppl", "agree": "pagedkv.eval.agree", "sinks": "pagedkv.eval.sinks"}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m pagedkv.eval {{{','.join(commands)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    name = sys.argv.pop(1)
    importlib.import_module(commands[name]).main(sys.argv[1:])


if __name__ == "__main__":
    main()
