#!/usr/bin/env bash
# On a GPU machine with CUDA torch: build the extension, run the GPU tests and the benchmarks, and leave the
# logs and JSON in $OUT (default ./out) as one results.tar.gz, beside this script's timestamped log run_gpu.log.
# An offline GPU machine needs the wheels and data that `bash benchmarks/prepare_gpu.sh` gathers, on a machine
# with PyPI, into .gpu-wheels and .gpu-data: copy those folders with the checkout.
#
# Parts, chosen with PARTS (default: tests kernels profile e2e, run in the order given):
#   PARTS=tests    the kernel test matrix on the GPU (TEST_MARKS, default "gpu or not slow") and every gpu-marked
#                  test elsewhere. The Triton tests run while the extension builds; its own tests after the build,
#                  beside compute-sanitizer memcheck and racecheck over a few small extension tests (SANITIZE_K).
#                  The outcome, per phase and sanitizer tool: tests_gpu.json (benchmarks/tests_summary.py).
#   PARTS=profile  benchmarks/profile_ops.py: device time per kernel and wall time per call of each op
#   PARTS=kernels  the op benchmarks: attention, contrastive_loss, linear_kl_loss, span_mean_pool
#   PARTS=e2e      the end-to-end benchmarks: encode, train
# e.g. PARTS=tests OUT=$OUT bash benchmarks/run_gpu.sh (the commit recorded: $LLM2COMP_GIT_COMMIT, else the one
# prepare_gpu.sh wrote to .gpu-data/commit)
# BENCH="attention profile_ops" runs these benchmarks/bench_<name>.py (and profile_ops) instead of the parts'
# lists.
# Time limits, for a GPU machine held for a fixed time: every step gets at most the time left before DEADLINE_S
# (seconds after the start, default 560), each benchmark at most BENCH_CAP_S (default 150 s); a benchmark past its
# cap records its remaining rows as not measured and still writes its JSON ($LLM2COMP_BENCH_DEADLINE, see
# benchmarks/harness.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
R=$OUT/results
mkdir -p "$R"
exec > >(tee -a "$OUT/run_gpu.log") 2>&1  # the timestamped steps, beside the tarball: how long each one took
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
PARTS=${PARTS-tests kernels profile e2e}  # PARTS= (empty): none, e.g. with BENCH=...
WORKERS=${WORKERS:-12}
# The extension tests compute-sanitizer runs: small, and between them every kernel and its edge paths.
SANITIZE_K=${SANITIZE_K:-"unaligned_pointer or unnormalized_reductions or strided_inputs or (doc_chunks and 7) \
or (block_edges and causal)"}
start=$SECONDS
# What tests_gpu.json records as the run's command (the settings that shaped it).
export LLM2COMP_RUN_COMMAND=${LLM2COMP_RUN_COMMAND:-"PARTS=\"$PARTS\" BENCH=\"${BENCH:-}\" DEADLINE_S=${DEADLINE_S:-560} \
BENCH_CAP_S=${BENCH_CAP_S:-150} WORKERS=$WORKERS bash benchmarks/run_gpu.sh"}
log() { echo "== [$(date +%T) +$((SECONDS - start))s] $*"; }
left() { echo $(( ${DEADLINE_S:-560} - (SECONDS - start) - 15 )); }
# Run "$@" under a timeout of the time left (minus a margin for the tarball) or $CAP if smaller; skip it when
# none is left. At the limit it gets SIGTERM (a benchmark then records what it measured, benchmarks/harness.py),
# and SIGKILL 15 s later if it is still running.
in_time() {
    local t; t=$(left)
    if [ -n "${CAP:-}" ] && [ "$CAP" -lt "$t" ]; then t=$CAP; fi
    if [ "$t" -lt 20 ]; then log "no time left: skipped $*"; return 1; fi
    timeout -k 15 "$t" "$@"
}
pytest_run() {  # pytest_run NAME WORKERS ARGS...: a pytest run with its junit XML and log under $R
    local name=$1 workers=$2; shift 2
    local xdist=()
    if [ "$workers" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n "$workers"); fi
    log "pytest $name: $*"
    in_time "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" --junitxml "$R/junit_$name.xml" "$@" 2>&1 \
        | tee "$R/tests_$name.log" | tail -25
}

if [ -d .gpu-data/lee ]; then export LLM2COMP_LEE_DIR=$PWD/.gpu-data/lee; fi
if [ -z "${LLM2COMP_GIT_COMMIT:-}" ] && [ -f .gpu-data/commit ]; then
    LLM2COMP_GIT_COMMIT=$(cat .gpu-data/commit); export LLM2COMP_GIT_COMMIT
fi
export HF_HUB_OFFLINE=1  # the machine is offline: no hub lookups to time out

log "machine"
nvidia-smi -L
"$PY" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
    log "peer wheels"
    "$PY" -m pip install -q --no-deps --no-index .gpu-wheels/*.whl 2>&1 | tail -3
fi

build_pid=""
if "$PY" -c "import llm2comp_kernels._C" 2>/dev/null; then
    log "extension already built"
else
    log "build (extension for this GPU's arch), in the background: $R/build.log"
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" MAX_JOBS=${MAX_JOBS:-16} LLM2COMP_BUILD_CUDA=1 \
        in_time "$PY" setup.py build_ext --inplace >"$R/build.log" 2>&1 &
    build_pid=$!
fi
wait_build() {
    [ -n "$build_pid" ] || return 0
    wait "$build_pid"; log "build exit $? ($(tail -1 "$R/build.log"))"; build_pid=""
    "$PY" -c "import llm2comp_kernels as K; print(K.available_backends())"
}

benches=""
for part in $PARTS; do
    case $part in
        tests)
            # Everything that does not need the extension, while it builds.
            pytest_run triton "$WORKERS" -m "${TEST_MARKS:-gpu or not slow}" -k "not cuda" tests/kernels
            pytest_run others 1 -m gpu tests/llm2comp tests/integrations tests/training
            wait_build
            # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
            ( for tool in memcheck racecheck; do
                log "compute-sanitizer --tool $tool"
                PYTORCH_NO_CUDA_MEMORY_CACHING=1 CAP=90 in_time compute-sanitizer --tool "$tool" --error-exitcode 1 \
                    "$PY" -m pytest -q -x -p no:cacheprovider -m gpu tests/kernels/test_cuda_extension.py \
                    -k "$SANITIZE_K" \
                    >"$R/sanitize_$tool.log" 2>&1
                log "compute-sanitizer --tool $tool: exit $? ($(tail -1 "$R/sanitize_$tool.log"))"
              done ) &
            sanitize_pid=$!
            # The CPU emulation of the CUDA kernels (test_cuda_emulat*.py) adds nothing on a GPU: left out.
            pytest_run cuda "$WORKERS" -m "${TEST_MARKS:-gpu or not slow}" -k "cuda and not emulat" tests/kernels
            wait "$sanitize_pid"
            "$PY" -m benchmarks.tests_summary "$R" | tail -5 ;;
        profile) benches="$benches profile_ops" ;;
        kernels) benches="$benches attention contrastive_loss linear_kl_loss span_mean_pool" ;;
        e2e) benches="$benches encode train" ;;
        *) log "unknown part '$part' (tests, profile, kernels, e2e)"; exit 2 ;;
    esac
done
wait_build
for bench in ${BENCH:-$benches}; do
    cap=${BENCH_CAP_S:-150}
    if [ "$(left)" -lt "$cap" ]; then cap=$(left); fi
    if [ "$bench" = profile_ops ]; then
        log "profile_ops (cap ${cap}s)"
        CAP=$cap in_time "$PY" -m benchmarks.profile_ops --out "$R" 2>&1 | tee "$R/profile.log" | grep -v "^USDT" \
            | tail -60
        continue
    fi
    log "bench_$bench (cap ${cap}s)"
    LLM2COMP_BENCH_DEADLINE=$(( $(date +%s) + cap - 20 )) CAP=$cap \
        in_time "$PY" -m "benchmarks.bench_$bench" --out "$R" 2>&1 | tee -a "$R/bench.log" | tail -40
done
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$R"
log "done"
