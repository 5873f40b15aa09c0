#!/usr/bin/env bash
# On a GPU machine with CUDA torch: build the extension, run the GPU tests and the benchmarks, and leave the
# logs and JSON in $OUT (default ./out) as one results.tar.gz. Prepare the offline machine's wheels and data
# here first with `bash benchmarks/prepare_gpu.sh`, and carry .gpu-wheels and .gpu-data with the call.
#
# A device call runs at most 10 minutes, so the work comes in parts, chosen with PARTS (default: all four):
#   PARTS=tests    every gpu-marked test (TEST_MARKS overrides the marker expression)
#   PARTS=kernels  the op benchmarks: attention, contrastive_loss, linear_kl_loss, span_mean_pool
#   PARTS=e2e      the end-to-end benchmarks: encode, train
#   PARTS=sanitize compute-sanitizer memcheck and racecheck over a few small CUDA-extension tests (SANITIZE_K)
# e.g. LLM2COMP_GIT_COMMIT=$(git rev-parse HEAD) PARTS=tests OUT=$OUT bash benchmarks/run_gpu.sh
# BENCH="attention" runs a subset of benchmarks/bench_<name>.py instead of the parts' lists. Each part builds
# the extension first unless it already imports (a machine kept warm between calls). Every step gets the time
# left before DEADLINE_S (default 560 s after the start), so the tarball is written even when a step runs long.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
PARTS=${PARTS:-tests sanitize kernels e2e}
start=$SECONDS
log() { echo "== [$(date +%T) +$((SECONDS - start))s] $*"; }
# Run "$@" under a timeout of the time left (minus a margin for the tarball); skip it when none is left.
in_time() {
    local left=$(( ${DEADLINE_S:-560} - (SECONDS - start) - 15 ))
    if [ "$left" -lt 20 ]; then log "no time left: skipped $*"; return 1; fi
    timeout "$left" "$@"
}

if [ -d .gpu-data/lee ]; then export LLM2COMP_LEE_DIR=$PWD/.gpu-data/lee; fi

log "machine"
nvidia-smi -L
"$PY" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
    log "peer wheels"
    "$PY" -m pip install -q --no-deps --no-index .gpu-wheels/*.whl 2>&1 | tail -3
fi

if "$PY" -c "import llm2comp_kernels._C" 2>/dev/null; then
    log "extension already built"
else
    log "build (extension for this GPU's arch)"
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" MAX_JOBS=${MAX_JOBS:-16} LLM2COMP_BUILD_CUDA=1 \
        in_time "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -20
fi
"$PY" -c "import llm2comp_kernels as K; print(K.available_backends())"

benches=""
for part in $PARTS; do
    case $part in
        tests)
            log "tests (-m '${TEST_MARKS:-gpu}')"
            in_time "$PY" -m pytest -q -p no:cacheprovider -m "${TEST_MARKS:-gpu}" \
                --junitxml "$OUT/results/junit.xml" ${TESTS:-tests} 2>&1 | tee "$OUT/results/tests.log" | tail -40 ;;
        sanitize)
            # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
            for tool in memcheck racecheck; do
                log "compute-sanitizer --tool $tool"
                PYTORCH_NO_CUDA_MEMORY_CACHING=1 in_time compute-sanitizer --tool "$tool" --error-exitcode 1 \
                    "$PY" -m pytest -q -x -p no:cacheprovider -m gpu tests/kernels/test_cuda_extension.py \
                    -k "${SANITIZE_K:-unaligned_pointer or unnormalized_reductions or strided_inputs}" 2>&1 \
                    | tee "$OUT/results/sanitize_$tool.log" | tail -20
            done ;;
        kernels) benches="$benches attention contrastive_loss linear_kl_loss span_mean_pool" ;;
        e2e) benches="$benches encode train" ;;
        *) log "unknown part '$part' (tests, sanitize, kernels, e2e)"; exit 2 ;;
    esac
done
for bench in ${BENCH:-$benches}; do
    log "bench_$bench"
    in_time "$PY" -m "benchmarks.bench_$bench" --out "$OUT/results" 2>&1 | tee -a "$OUT/results/bench.log" | tail -40
done
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
log "done"
