#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a GPU visit: gathers what the offline GPU machine lacks into two
# git-ignored folders, to name in the device call's `carry`: [".gpu-wheels", ".gpu-data"].
#   .gpu-wheels/  Python 3.12 wheels of the peers and loaders (pinned: the benchmarks' peer configurations were
#                 checked against these versions; liger-kernel < 0.8 also computes the unused hard-label term)
#   .gpu-data/lee the Lee corpus (tests' tokenizer, end-to-end benchmarks); ../shared does not travel
#   .gpu-data/commit  HEAD's hash, which run_gpu.sh records (the device's copy of .git is not current)
# Then, there: OUT=$OUT bash benchmarks/run_gpu.sh
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
