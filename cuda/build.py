"""Build helper for the CUDA C++ extension ``vision_eff._C`` (torch.utils.cpp_extension).

Install-time build (opt-in, needs nvcc): in setup.py,

    import os, runpy
    if os.environ.get("VISION_EFF_BUILD_CUDA") == "1":
        from torch.utils.cpp_extension import BuildExtension
        ext = runpy.run_path("cuda/build.py")["extension"]()
        setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})

or in place from a checkout: ``python cuda/build.py`` (builds vision_eff/_C*.so next to the package).
Without it, ``vision_eff.kernels.extension.load()`` compiles the same sources just in time on first
GPU use. ``nvcc_object()`` compiles the kernel alone to an object file (the GPU-less CI check).
This folder is deliberately not a Python package.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vision_eff.kernels.extension import CUDA_SOURCES, CXX_FLAGS, NVCC_FLAGS, nvcc_path  # noqa: E402


def extension():
    from torch.utils.cpp_extension import CUDAExtension

    return CUDAExtension(
        name="vision_eff._C",
        sources=[str(HERE / s) for s in CUDA_SOURCES],
        include_dirs=[str(HERE)],
        extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
    )


def nvcc_object(source: str, out: Path, arch: str = "sm_90") -> subprocess.CompletedProcess:
    """Compile one .cu file to an object file (no GPU needed)."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME)")
    cmd = [nvcc, "-c", f"-arch={arch}", *NVCC_FLAGS, "-I", str(HERE), str(HERE / source), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True)


if __name__ == "__main__":
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension

    sys.argv = [sys.argv[0], "build_ext", "--inplace"]
    import os

    os.chdir(HERE.parent)
    setup(name="vision-eff-cuda", ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
