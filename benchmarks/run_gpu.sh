#!/usr/bin/env bash
# One call on a fresh GPU machine with CUDA torch installed: build the extension, run every test
# (GPU-marked ones included), run every benchmark, and leave logs + JSON in $OUT (default ./out).
#   bash benchmarks/run_gpu.sh            # everything
#   BENCH="attention" bash benchmarks/run_gpu.sh   # a subset of benchmarks/bench_<name>.py
# Wheels for peers missing there (liger-kernel, inf-cl, gguf) are installed from .gpu-wheels/ if present.
# The Lee data (tests' tokenizer, end-to-end benchmarks) does not travel with ../shared: copy it first
#   mkdir -p .gpu-data && cp -r ../shared/data/lee .gpu-data/    (then carry .gpu-data with the call)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log() { echo "== [$(date +%T)] $*"; }

if [ -d .gpu-data/lee ]; then export LLM2COMP_LEE_DIR=$PWD/.gpu-data/lee; fi

log "machine"
nvidia-smi -L
"$PY" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
    log "peer wheels"
    "$PY" -m pip install -q --no-deps --no-index .gpu-wheels/*.whl
fi

log "build (extension for this GPU's arch)"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" MAX_JOBS=${MAX_JOBS:-16} LLM2COMP_BUILD_CUDA=1 \
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -20
"$PY" -c "import llm2comp_kernels as K; print(K.available_backends())"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    log "tests (all, on the GPU)"
    timeout_opt=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 300")
    "$PY" -m pytest -q -p no:cacheprovider -m "${TEST_MARKS:-gpu or not slow}" $timeout_opt \
        --junitxml "$OUT/results/junit.xml" ${TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -40
fi

log "benchmarks"
for bench in ${BENCH:-$(ls benchmarks/bench_*.py | sed 's#benchmarks/bench_##; s#\.py##')}; do
    log "bench_$bench"
    timeout "${BENCH_TIMEOUT:-240}" "$PY" -m "benchmarks.bench_$bench" --out "$OUT/results" 2>&1 \
        | tee -a "$OUT/bench.log" | tail -40
done
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
log "done"
