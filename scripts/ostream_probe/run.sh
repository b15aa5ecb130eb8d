#!/usr/bin/env bash
# Does this machine's torch + compiler crash when extension code inserts a number into a std::ostream?
# Builds a minimal torch extension (ext.cpp: ops s1..s8, g, h, each formatting or throwing one way) and
# calls every op twice in a fresh process. On the GPU image (torch 2.11.0+cu130, Ubuntu GCC 13.3)
# s1, s2, s6, g and h kill the process; s3, s4, s5, s7 and s8 (no number through an ostream) survive.
# pagedkv therefore builds its messages without std::ostream (csrc/include/pagedkv/common.h).
# Usage: bash scripts/ostream_probe/run.sh (about a minute).
cd "$(dirname "$0")"
B=${TMPDIR:-/tmp}/ostream_probe_build
cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python)" > "$B.cmake.log" 2>&1 \
  && cmake --build "$B" -j 8 > "$B.build.log" 2>&1 || { tail "$B.build.log"; exit 1; }
for m in s1 s2 s3 s4 s5 s6 s7 s8 g h; do
  out=$(python - "$B" "$m" 2>&1 <<'PY'
import sys, torch
sys.path.insert(0, sys.argv[1]); import diagx  # noqa: F401
for i in range(2):
    try:
        r = getattr(torch.ops.diagx, sys.argv[2])(torch.ones(2, 2))
        print(i, "returned", tuple(r.shape))
    except Exception as e:
        print(i, type(e).__name__, str(e).splitlines()[0][:40])
print("survived")
PY
)
  rc=$?
  echo "== $m: $(echo "$out" | tail -3 | tr '\n' ' ') rc=$rc"
done
