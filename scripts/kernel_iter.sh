#!/usr/bin/env bash
# One device call for a decode-kernel change: build, the attention-op CUDA tests, the target-case
# benchmark, Nsight Compute on the decode kernel per format (FMTS, default int4 int8), and the spill
# instructions of its SASS (scripts/sass_spills.py). VARIANTS="name:NVCC_FLAGS ..." rebuilds with
# extra CUDA flags (for example "b3:-DPAGEDKV_DECODE_BLOCKS=3"; commas separate several flags) and
# repeats the benchmark and ncu.
# BASE_FLAGS: the first build's flags (default none); NCU_ARGS: extra ncu options (for example --clock-control none). NO_TESTS=1 skips the tests (a call that only measures). SOURCE=1 also exports the decode kernel's
# per-instruction counters (executed instructions and stall samples per SASS instruction, ncu's source
# page as CSV: $L/source_<fmt>_<variant>.csv; summarize with scripts/ncu_source.py).
# Usage (device tool): bash scripts/kernel_iter.sh. Logs: $OUT/logs.tgz and the summary on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pagedkv-out}
L=$OUT/logs
mkdir -p "$L"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
measure() {  # $1: variant name
  python -m pagedkv.bench attention --shapes llama3-8b --batches 8 --contexts 32768 --reps ${REPS:-30} \
    --formats ${BENCH_FORMATS:-bf16 int8 fp8_e4m3 int4 int2} --json "$L/attention_$1.json" 2>&1 \
    | tee "$L/attention_$1.log" | grep -E "^\| llama|copy bandwidth"
  for f in ${FMTS:-int4 int8}; do
    "$NCU" ${NCU_ARGS:-} --kernel-name regex:attention_decode --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats --section InstructionStats --section LaunchStats --section Occupancy \
      --section SourceCounters python scripts/profile_attention.py --fmt "$f" --calls 2 --no-table > "$L/ncu_${f}_$1.log" 2>&1
    if [[ -n ${SOURCE:-} ]]; then
      "$NCU" ${NCU_ARGS:-} --kernel-name regex:attention_decode --launch-skip 2 --launch-count 1 --section SourceCounters \
        --section WarpStateStats -f -o "$L/rep_${f}_$1" python scripts/profile_attention.py --fmt "$f" --calls 2 --no-table \
        > "$L/ncu_src_${f}_$1.log" 2>&1
      "$NCU" -i "$L/rep_${f}_$1.ncu-rep" --page source --csv --print-source sass > "$L/source_${f}_$1.csv" 2>&1
      rm -f "$L/rep_${f}_$1.ncu-rep"
    fi
    echo "== $1 $f: $(grep -E "Elapsed Cycles|DRAM Throughput|Executed Instructions  |Warp Cycles Per Issued|Registers Per|Dynamic Shared Memory Per" "$L/ncu_${f}_$1.log" | awk '{print $1" "$2" "$NF}' | tr '\n' ';')"
  done
}
finish() { tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$L"; }
trap finish EXIT
build() {  # $1: extra CUDA flags (scripts/gpu.sh build; its log goes to $OUT/build.log)
  CUDA_FLAGS="${1//,/ }" bash scripts/gpu.sh build
}
build "${BASE_FLAGS:-}" || exit 1
[[ -n ${NO_TESTS:-} ]] || timeout ${TEST_TIMEOUT:-240} python -m pytest tests/python/test_attention_op.py tests/python/test_cuda.py -q -x \
  -p no:cacheprovider 2>&1 | tee "$L/pytest.log" | tail -3
measure base
SO=$(python -c "import torch, pagedkv._C as c; print(c.__file__)")
cuobjdump -sass "$SO" > /tmp/sass.txt 2>/dev/null && python scripts/sass_spills.py /tmp/sass.txt attention_decode_kernelILi128 > "$L/spills.txt"
for v in ${VARIANTS:-}; do
  build "${v#*:}" && measure "${v%%:*}"
done
