#!/usr/bin/env bash
# Builds llm2comp_kernels._C against a CUDA build of torch in a throwaway venv (no GPU needed),
# imports it and checks that the ops registered and reject CPU tensors with the binding's error.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.ci-venv-cuda
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.14.1 setuptools wheel ninja numpy 2>&1 | grep -v "^WARNING: Location" || true
cuda_root=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
if grep -q "exec " "$(command -v nvcc)" 2>/dev/null; then   # nvcc may be a wrapper script
    cuda_root=$(dirname "$(dirname "$(grep -o '/[^ ]*/bin/nvcc' "$(command -v nvcc)" | head -1)")")
fi
site=$("$venv/bin/python" -c "import site; print(site.getsitepackages()[0])")
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
CUDA_HOME="$cuda_root" CPLUS_INCLUDE_PATH="$site/nvidia/cu13/include" TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" \
    LLM2COMP_BUILD_CUDA=1 MAX_JOBS=2 "$venv/bin/python" setup.py -q build_ext --build-lib "$build" --build-temp "$build/tmp"
so=$(find "$build" -name "_C*.so" | head -1)
SO="$so" "$venv/bin/python" - <<'PY'
import importlib.util
import os

import torch

# Load the built module by path: the package itself needs triton etc., not installed in this venv.
spec = importlib.util.spec_from_file_location("llm2comp_kernels._C", os.environ["SO"])
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers torch.ops.llm2comp.*
names = {"span_mean_pool_fwd", "span_mean_pool_bwd", "contrastive_loss_fwd", "contrastive_loss_bwd",
         "memory_attention_fwd"}
missing = {n for n in names if not hasattr(torch.ops.llm2comp, n)}  # dir() lists only looked-up ops
assert not missing, f"ops not registered: {missing}"
h = torch.randn(2, 4, 8)
s = torch.zeros(2, dtype=torch.long)
try:
    torch.ops.llm2comp.span_mean_pool_fwd(h, s, s + 1)
except RuntimeError as exc:
    assert "CUDA" in str(exc), exc
    print("extension built; ops registered; CPU tensors rejected:", str(exc).splitlines()[0])
else:
    raise SystemExit("the binding accepted CPU tensors")
PY
