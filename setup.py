"""Builds the optional CUDA extension `llm2comp_kernels._C`; everything else is in pyproject.toml.

LLM2COMP_BUILD_CUDA=0 skips the extension, =1 makes a failed or impossible build an error; unset,
a missing toolchain prints one line and the pure-Python package installs. CUDA torch must be
importable at build time, so install with ``pip install --no-build-isolation -e .`` on GPU machines.
"""

import glob
import os
import re
import sys

from setuptools import setup

MODE = os.environ.get("LLM2COMP_BUILD_CUDA", "")


def skip(reason):
    if MODE == "1":
        sys.exit(f"llm2comp: LLM2COMP_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"llm2comp: building without the CUDA extension ({reason})")
    return {}


def cuda_build():
    if MODE == "0":
        return skip("LLM2COMP_BUILD_CUDA=0")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable at build time; use pip install --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None:
        return skip("nvcc not found (set CUDA_HOME)")
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
    if not sources:
        return skip("no sources in csrc/")
    # +PTX: newer GPUs (sm_100, sm_120) JIT-compile the sm_90 PTX instead of finding no kernel image.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    # bf16 tensor-core mma and cp.async need sm_80 or newer.
    old = [a for a in re.findall(r"\d+\.\d+", os.environ["TORCH_CUDA_ARCH_LIST"]) if float(a) < 8.0]
    if old:
        return skip(f"TORCH_CUDA_ARCH_LIST has {', '.join(old)}; the kernels need compute capability 8.0 or newer")

    class TolerantBuild(BuildExtension):
        """Turns a compile failure into a warning unless LLM2COMP_BUILD_CUDA=1."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if MODE == "1":
                    raise
                print(f"llm2comp: the CUDA extension failed to build ({exc}); installing without it")

    ext = CUDAExtension(
        "llm2comp_kernels._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": TolerantBuild}}


setup(**cuda_build())
