#!/usr/bin/env bash
# Builds scripts/cpu_attention_driver.cpp with the kernel sources (torch-free, -g for perf annotate)
# and runs it: bash scripts/cpu_attention_driver.sh FORMAT [ITERS]. MARCH picks the target
# (default native; e.g. MARCH=haswell for the AVX2 build). The binary lands in build/driver/.
set -euo pipefail
cd "$(dirname "$0")/.."
MARCH=${MARCH:-native}
OUTDIR=build/driver
mkdir -p "$OUTDIR"
BIN="$OUTDIR/cpu_attention_driver_$MARCH"
g++ -O3 -g -std=gnu++17 -fopenmp-simd -ffp-contract=fast -march="$MARCH" -Wno-psabi -Icsrc/include -Icsrc/kernels/cpu \
  scripts/cpu_attention_driver.cpp csrc/kernels/cpu/attention_cpu.cpp csrc/kernels/cpu/append_cpu.cpp \
  csrc/core/formats.cpp -o "$BIN"
"$BIN" "$@"
