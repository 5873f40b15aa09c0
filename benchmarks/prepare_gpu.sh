#!/usr/bin/env bash
# Run on a machine with PyPI before benchmarks/run_gpu.sh runs on an offline GPU machine: gathers what that
# machine lacks into two git-ignored folders, to copy there with the checkout: .gpu-wheels and .gpu-data.
#   .gpu-wheels/  Python 3.12 wheels of the peers and loaders (pinned: the benchmarks' peer configurations were
#                 checked against these versions; liger-kernel < 0.8 also computes the unused hard-label term)
#   .gpu-data/lee the Lee corpus (tests' tokenizer, end-to-end benchmarks); ../shared is outside the checkout
#   .gpu-data/commit  HEAD's hash, which run_gpu.sh records (a copied checkout's .git may not be current)
# Then, on the GPU machine: OUT=$OUT bash benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS="gguf==0.19.0 liger-kernel==0.8.5 inf-cl==1.2.1"
rm -rf .gpu-wheels && mkdir -p .gpu-wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d .gpu-wheels $WHEELS
lee=${LLM2COMP_LEE_DIR:-../shared/data/lee}
[ -d "$lee" ] || { echo "no Lee data at $lee (set LLM2COMP_LEE_DIR)"; exit 1; }
rm -rf .gpu-data && mkdir -p .gpu-data && cp -r "$lee" .gpu-data/lee
du -sh .gpu-wheels .gpu-data
git rev-parse HEAD > .gpu-data/commit
echo "commit to record: $(cat .gpu-data/commit)$(git diff --quiet HEAD || echo ' (uncommitted changes: commit first)')"
