"""The CUDA kernels of csrc/, built by the host C++ compiler against the CPU emulator of this folder, and
called through ctypes on CPU tensors (see cpu_emulation.h for what the emulator runs and checks).

`load()` compiles once per content of the sources (cached under the system temp dir) and returns a
`ctypes.CDLL`, or raises `Unavailable` when there is no C++ compiler or no CUDA headers. The build has
UBSan in trap mode: a misaligned typed access (a vector load or store off its alignment), an index past a
fixed-size array (fragments, per-warp slots) or a signed overflow stops the process with SIGILL, which
fails the test run."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/launchers.h's DType


class Unavailable(RuntimeError):
    """No host compiler or no CUDA headers here."""


class EmulationError(RuntimeError):
    """A kernel failed an emulator check, or its launcher returned an error."""


def cuda_include_dir() -> Path:
    """The directory holding cuda_runtime.h: $CUDA_HOME, the CUDA root of nvcc, or /usr/local/cuda."""
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
        # /usr/local/bin/nvcc may be a wrapper script that execs the real one.
        text = Path(nvcc).read_bytes()[:4096]
        if text.startswith(b"#!"):
            for word in text.decode(errors="ignore").split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(Path(word).parents[1] / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for candidate in candidates:
        if (candidate / "cuda_runtime.h").is_file():
            return candidate
    raise Unavailable("no CUDA headers (cuda_runtime.h) found: set CUDA_HOME")


def sources() -> list[Path]:
    return sorted(HERE.glob("*.cpp")) + sorted((ROOT / "csrc").rglob("*.cu"))


def _headers() -> list[Path]:
    return sorted(HERE.glob("*.h")) + sorted((ROOT / "csrc").rglob("*.cuh")) + sorted((ROOT / "csrc").rglob("*.h"))


def _build(target: Path, include: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise Unavailable("no C++ compiler (g++) found")
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    # The half-precision switches of torch's extension build (setup.py), so that code relying on implicit
    # half/bfloat16 conversions fails here as it would there.
    no_implicit_halves = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                          "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing", "-DLLM2COMP_CPU_EMULATION",
           "-fsanitize=undefined", "-fsanitize-undefined-trap-on-error",
           *no_implicit_halves,
           "-Wall", "-Wno-unknown-pragmas", "-Werror", f"-I{ROOT / 'csrc'}", f"-I{HERE}", f"-I{include}",
           "-x", "c++", *map(str, sources()), "-Wl,-z,defs", "-o", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the emulated kernels failed:\n{' '.join(cmd)}\n{result.stderr[-6000:]}")
    os.replace(tmp, target)  # atomic: parallel test workers may build the same library


def load() -> ctypes.CDLL:
    include = cuda_include_dir()
    digest = hashlib.sha256()
    for path in sources() + _headers():
        digest.update(path.name.encode() + path.read_bytes())
    target = Path(tempfile.gettempdir()) / "llm2comp-cuda-emulation" / f"{digest.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _build(target, include)
    lib = ctypes.CDLL(str(target))
    lib.emu_last_error.restype = ctypes.c_char_p
    lib.emu_contrastive_loss_doc_chunk.restype = ctypes.c_int64
    lib.emu_contrastive_loss_doc_chunk.argtypes = [ctypes.c_int64] * 3
    lib.emu_set_device_dynamic_smem.restype = ctypes.c_int64
    lib.emu_set_device_dynamic_smem.argtypes = [ctypes.c_int64]
    return lib


def call(lib: ctypes.CDLL, name: str, *args) -> None:
    """lib.<name>(*args), tensors passed as their data pointers and Python floats as C floats;
    EmulationError with the emulator's message if it fails."""
    def convert(a):
        if isinstance(a, torch.Tensor):
            return ctypes.c_void_p(a.data_ptr())
        if a is None:
            return ctypes.c_void_p(0)
        if isinstance(a, bool):
            return ctypes.c_bool(a)
        if isinstance(a, float):
            return ctypes.c_float(a)
        if isinstance(a, int):
            return ctypes.c_int64(a)
        raise TypeError(f"cannot pass {type(a).__name__} to {name}")

    if getattr(lib, name)(*map(convert, args)) != 0:
        raise EmulationError(f"{name}: {lib.emu_last_error().decode()}")


GUARD_BYTES = 256


class Guards:
    """Places tensors inside 0xff-filled buffers and checks afterwards that nothing wrote past them."""

    def __init__(self, shift: int = 0):
        self.buffers = []
        self.shift = shift  # elements past 16-byte alignment at which each tensor starts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of x inside a guarded buffer, 16-byte aligned (like the allocator's) plus `shift`."""
        pad = GUARD_BYTES // x.element_size() + self.shift
        buffer = torch.empty(x.numel() + 2 * pad, dtype=x.dtype)
        buffer.view(torch.uint8).fill_(0xFF)
        inner = buffer[pad:pad + x.numel()].view(x.shape)
        inner.copy_(x)
        self.buffers.append((buffer, pad, x.numel()))
        return inner

    def check(self) -> None:
        for buffer, pad, n in self.buffers:
            for side in (buffer[:pad], buffer[pad + n:]):
                assert bool((side.view(torch.uint8) == 0xFF).all()), "a kernel wrote outside its tensor"
