#!/usr/bin/env bash
# One device call: build with CUDA, run the CUDA tests, then the GPU benchmarks, writing every log,
# JSON and plot under $OUT. Usage (device tool): bash scripts/gpu.sh [tests|bench|serve|all] (default all;
# several may be given: "tests serve"). serve = the long-context (200k chunked prefill) and
# shared-prompt benchmarks; sanitize (not part of all) = the CUDA tests under compute-sanitizer
# memcheck, and racecheck/synccheck on the attention kernels; profile (not part of all) = torch
# profiler table and Nsight Compute sections of the decode attention kernel (PROFILE_ARGS); tp (not
# part of all) = tensor-parallel decode, 1 rank and then every GPU of the machine (TP_ARGS); build =
# only build. CUDA_FLAGS sets the build's extra nvcc flags (for example -DPAGEDKV_DECODE_BLOCKS=3; empty
# resets them, so a warm machine's build dir does not keep an earlier call's flags).
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT=" ${*:-all} "
has() { [[ $WHAT == *" $1 "* || $WHAT == *" all "* ]]; }
OUT=${OUT:-/tmp/pagedkv-out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1
export PAGEDKV_DATA_DIR=${PAGEDKV_DATA_DIR:-$PWD/shared/data}
# Packages the image may lack travel as wheels in .whl (carried, git-ignored).
if ls .whl/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)" | tee -a "$OUT/gpu.txt"
PY=$(command -v python)
t0=$(date +%s)
CMAKE_ARGS="-DPython_EXECUTABLE=$PY '-DCMAKE_CUDA_FLAGS=${CUDA_FLAGS:-}'" PAGEDKV_CUDA=ON PAGEDKV_CUDA_ARCHS=90 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build ok ($(( $(date +%s) - t0 )) s)"
# Deselected on the device: the exact-token stories260K bf16 test (it checks CPU SDPA bf16 numerics of
# the pinned torch 2.13; the image has 2.11).
if has tests; then
  timeout ${TEST_TIMEOUT:-900} python -m pytest tests/python/test_cuda.py tests/python/test_attention_op.py tests/python/test_attention_hf.py \
    tests/python/test_graph_decode.py tests/python/test_padding.py tests/python/test_ops.py tests/python/test_errors.py -q -x \
    -k "not stories_greedy_identical_to_sdpa_dynamic" -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -15
fi
if has bench; then
  python -m pagedkv.bench attention ${ATTN_ARGS:-} --json "$OUT/attention.json" --plot "$OUT/attention.png" \
    2>&1 | tee "$OUT/attention.log" | grep -v "^done"
  if [[ -n ${GENERATE-1} ]]; then
    python -m pagedkv.bench generate ${GEN_ARGS:-} --json "$OUT/generate.json" 2>&1 | tee "$OUT/generate.log" | tail -25
  fi
fi
if has serve; then
  python -m pagedkv.bench longctx ${LONGCTX_ARGS:-} --json "$OUT/longctx.json" 2>&1 | tee "$OUT/longctx.log" | tail -14
  python -m pagedkv.bench prefix --device cuda ${PREFIX_ARGS:-} --json "$OUT/prefix.json" 2>&1 | tee "$OUT/prefix.log" | tail -8
fi
if [[ $WHAT == *" tp "* ]]; then
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  NGPU=$(nvidia-smi -L | wc -l)
  for n in $(echo 1 "$NGPU" | tr ' ' '\n' | sort -un); do
    torchrun --standalone --nproc-per-node "$n" -m pagedkv.bench tp ${TP_ARGS:-} --json "$OUT/tp_$n.json" 2>&1 \
      | tee "$OUT/tp_$n.log" | grep -v -i warn | tail -8
  done
fi
if [[ $WHAT == *" profile "* ]]; then
  python scripts/profile_attention.py ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile_torch.log" | head -20
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  "$NCU" --kernel-name regex:attention --launch-skip 3 --launch-count 1 --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    python scripts/profile_attention.py ${PROFILE_ARGS:-} --calls 2 --no-table > "$OUT/profile_ncu.log" 2>&1
  grep -E "Duration|Throughput|Occupancy|Registers|Block Limit|Stall|Warp Cycles|Issue|Executed Ipc|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Grid Size|Waves|One or More|No Eligible|Dynamic Shared" "$OUT/profile_ncu.log" | head -60
fi
if [[ $WHAT == *" sanitize "* ]]; then
  CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  SEL="cuda and not bad_input and not generate"
  for tool in memcheck racecheck synccheck; do
    k=$SEL
    [[ $tool != memcheck ]] && k="$SEL and (bf16 or int4)"
    "$CS" --tool $tool --error-exitcode 9 python -m pytest tests/python/test_cuda.py tests/python/test_attention_op.py \
      -q -x -p no:cacheprovider -k "$k" > "$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? ($(grep -E "passed|failed" "$OUT/sanitize_$tool.log" | tail -1)); $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize_$tool.log" | tail -1)"
  done
fi
