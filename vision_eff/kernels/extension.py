"""Loader for the compiled CUDA C++ extension ``vision_eff._C`` (sources in the repository's ``cuda/``).

Resolution order:
1. ``import vision_eff._C`` (built at install time: ``VISION_EFF_BUILD_CUDA=1`` with the build
   helper ``cuda/build.py``);
2. a just-in-time build with ``torch.utils.cpp_extension.load`` on first GPU use, when nvcc and
   the sources are present (cached in ``$TORCH_EXTENSIONS_DIR``; set ``VISION_EFF_NO_JIT=1`` to
   forbid it).
The source list and compiler flags live here so the install-time build and the JIT agree.
"""
from __future__ import annotations

import importlib
import os
import shutil
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
CUDA_SOURCES = ("vision_eff_C.cpp", "match_tokens.cu")
NVCC_FLAGS = ("-O2", "--use_fast_math", "-std=c++20")
CXX_FLAGS = ("-O2", "-std=c++20")
JIT_NAME = "vision_eff_C"


def nvcc_path() -> str | None:
    """The nvcc that builds would use: ``$CUDA_HOME/bin/nvcc``, ``/usr/local/cuda/bin/nvcc`` or PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def source_paths() -> list[Path]:
    return [CUDA_DIR / s for s in CUDA_SOURCES]


def _prebuilt() -> ModuleType | None:
    try:
        return importlib.import_module("vision_eff._C")
    except ImportError:
        return None


def unavailable_reason() -> str | None:
    """None when the extension can be used (prebuilt, or buildable now), else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if _prebuilt() is not None:
        return None
    if os.environ.get("VISION_EFF_NO_JIT") == "1":
        return "vision_eff._C is not built and VISION_EFF_NO_JIT=1 forbids a just-in-time build"
    if nvcc_path() is None:
        return "vision_eff._C is not built and nvcc was not found (set CUDA_HOME) for a just-in-time build"
    missing = [p.name for p in source_paths() if not p.is_file()]
    if missing:
        return f"vision_eff._C is not built and its sources are missing from {CUDA_DIR} ({', '.join(missing)})"
    return None


@lru_cache(maxsize=1)
def load() -> ModuleType:
    """The extension module (building it just in time if needed); raises with the reason otherwise."""
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(f"the CUDA C++ extension is unavailable: {why}")
    module = _prebuilt()
    if module is not None:
        return module
    from torch.utils.cpp_extension import load as jit_load

    return jit_load(name=JIT_NAME, sources=[str(p) for p in source_paths()], extra_include_paths=[str(CUDA_DIR)],
                    extra_cflags=list(CXX_FLAGS), extra_cuda_cflags=list(NVCC_FLAGS), verbose=False)
