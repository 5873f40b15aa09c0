#!/usr/bin/env bash
# Compiles every csrc/**/*.cu with plain nvcc (no torch) for sm_80 and sm_90 (what setup.py builds) and sm_100
# and sm_120 (Blackwell, which the default build reaches through the sm_90 PTX), prints each kernel's
# registers / shared memory / spills from ptxas, and fails if a kernel spills or a file does not compile.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }
failed=0
mapfile -t sources < <(find csrc -name '*.cu' | sort)
[ ${#sources[@]} -gt 0 ] || { echo "no .cu files under csrc/"; exit 1; }
for cu in "${sources[@]}"; do
    for arch in ${ARCHS:-80 90 100 120}; do
        log="$tmp/$(basename "$cu" .cu).sm$arch.log"
        if ! "$NVCC" -c -O3 -std=c++17 --use_fast_math -lineinfo -Icsrc \
                -gencode "arch=compute_$arch,code=sm_$arch" -Xptxas -v "$cu" -o "$tmp/out.o" >"$log" 2>&1; then
            echo "FAILED: $cu (sm_$arch)"; cat "$log"; failed=1; continue
        fi
        echo "== $cu sm_$arch"
        # ptxas prints, per kernel: "Compiling entry function 'NAME'", then stack/spill and register lines.
        awk '
            /Compiling entry function/ { match($0, /\047[^\047]+\047/); name = substr($0, RSTART + 1, RLENGTH - 2) }
            /bytes spill stores/ { spill = $5 + 0; spill_loads = $9 + 0 }
            /Used [0-9]+ registers/ {
                match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
                smem = "0"; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
                printf "  regs %3d  smem %6s B  spill st/ld %d/%d  %s\n", regs, smem, spill, spill_loads, name
            }' "$log" | demangle | sed -E 's/\(anonymous namespace\):://; s/llm2comp:://'
        if grep -E "[1-9][0-9]* bytes spill stores" "$log" >/dev/null; then
            echo "SPILL: $cu (sm_$arch) spills registers"; failed=1
        fi
    done
done
exit $failed
