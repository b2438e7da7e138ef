"""Only for the optional install-time CUDA build; everything else lives in pyproject.toml.

    VISION_EFF_BUILD_CUDA=1 pip install -e .     # compiles cuda/*.cu into vision_eff._C (needs nvcc + torch)

Without the flag nothing is compiled: the extension is built just in time on first GPU use instead.
"""
import os
import runpy

from setuptools import setup

if os.environ.get("VISION_EFF_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension

    ext = runpy.run_path(os.path.join("cuda", "build.py"))["extension"]()
    setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
else:
    setup()
