#!/usr/bin/env bash
# One device call: build with CUDA, run the CUDA tests (and the CPU suite on the GPU image),
# writing every log under $OUT. Usage (device tool): bash scripts/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pagedkv-out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PATH=/usr/local/cuda/bin:$PATH PYTHONUNBUFFERED=1
export PAGEDKV_DATA_DIR=${PAGEDKV_DATA_DIR:-$PWD/shared/data}
# Build tools the image may lack travel as wheels in .whl (carried, git-ignored).
if ls .whl/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)" | tee -a "$OUT/gpu.txt"
PY=$(command -v python)
CMAKE_ARGS="-DPython_EXECUTABLE=$PY" PAGEDKV_CUDA=ON PAGEDKV_CUDA_ARCHS=90 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build ok"
python -m pytest tests/python/test_cuda.py tests/python/test_ops.py tests/python/test_hf_cache.py -q -p no:cacheprovider \
  2>&1 | tee "$OUT/pytest.log" | tail -15
