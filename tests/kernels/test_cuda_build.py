"""The CUDA C++ kernel compiles with nvcc on a machine without a GPU (a build break fails CI)."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from vision_eff.kernels import extension

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(extension.nvcc_path() is None, reason="nvcc is not installed on this machine")
def test_match_tokens_kernel_compiles_to_an_object_file(tmp_path):
    build = runpy.run_path(str(ROOT / "cuda" / "build.py"))
    obj = tmp_path / "match_tokens.o"
    proc = build["nvcc_object"]("match_tokens.cu", obj, arch="sm_90")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert obj.stat().st_size > 1000
    # the kernel and its C entry point are really in the object (not an empty translation unit)
    data = obj.read_bytes()
    assert b"vision_eff_match_tokens" in data and b"match_tokens_kernel" in data


def test_extension_sources_exist_and_cuda_is_not_a_package():
    for p in extension.source_paths():
        assert p.is_file(), p
    assert not (ROOT / "cuda" / "__init__.py").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_loader_explains_why_the_extension_is_unavailable_without_gpu():
    assert extension.unavailable_reason() == "no CUDA device"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        extension.load.__wrapped__()
