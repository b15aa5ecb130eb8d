#!/usr/bin/env bash
# The whole test suite: installs what it needs, then Catch2 (ctest, under ASan+UBSan), the nvcc
# compile check of the CUDA kernels (when nvcc exists), and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh

echo "== Catch2 (torch-free core, -fsanitize=address,undefined)"
cmake -S . -B build/cpp-tests -G Ninja -DPAGEDKV_BUILD_PYTHON=OFF -DPAGEDKV_BUILD_TESTS=ON -DPAGEDKV_SANITIZE=ON >/dev/null
cmake --build build/cpp-tests >/dev/null
ctest --test-dir build/cpp-tests --output-on-failure

NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
if [ -n "$NVCC" ]; then
  echo "== nvcc compile check (sm_90, compile only)"
  for f in csrc/kernels/cuda/*.cu; do
    [ -e "$f" ] || continue
    "$NVCC" -std=c++17 -arch=sm_90 --expt-relaxed-constexpr -Icsrc/include -Icsrc/kernels -c "$f" -o /dev/null
    echo "ok $f"
  done
fi

echo "== pytest"
# Run from tests/ so the installed package (not the source tree) is imported.
$PY -m pytest tests/python -q -m "not slow" -p no:cacheprovider "$@"
