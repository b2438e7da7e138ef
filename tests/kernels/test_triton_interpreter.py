"""Triton kernels under TRITON_INTERPRET=1 (in a subprocess), at tiny shapes, against float64.

Pass rule (DESIGN.md): error <= 2x PyTorch SDPA's error in the same dtype, forward and gradients,
plus a rounding floor: one ulp of the result's scale for float16/bfloat16, four for float32 (there
both errors are rounding noise, ~1e-7, and recomputing probabilities from the log-sum-exp in the
exp2 domain, as every flash backward does, costs a few ulps that CPU SDPA does not pay).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

WORKER = Path(__file__).with_name("_interp_worker.py")
sys.path.insert(0, str(WORKER.parent))
from _interp_worker import ATTENTION_CASES, MATCH_CASES  # noqa: E402

FLOOR_ULPS = {"float32": 4, "float16": 1, "bfloat16": 1}
EPS = {"float32": torch.finfo(torch.float32).eps, "float16": torch.finfo(torch.float16).eps,
       "bfloat16": torch.finfo(torch.bfloat16).eps}


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", [c[0] for c in ATTENTION_CASES])
def test_flash_forward_and_backward_within_twice_sdpa_error(results, case):
    r = results[case]
    eps = EPS[r["dtype"]] * FLOOR_ULPS[r["dtype"]]
    labels = ["out", "dq", "dk", "dv"]
    for label, ours, sdpa, scale in zip(labels, r["ours"], r["sdpa"], r["ref_scale"]):
        assert ours <= 2 * sdpa + eps * scale, f"{case} {label}: triton error {ours:.3g} > 2 x SDPA error {sdpa:.3g}"


def test_rows_without_keys_are_zero_with_zero_gradient(results):
    r = results["empty_rows"]
    assert r["row0_max"] == 0.0 and r["grad_row0_max"] == 0.0 and r["finite"]
    assert r["out_err"] < 1e-5


@pytest.mark.parametrize("case", [c[0] for c in MATCH_CASES])
def test_fused_matching_against_float64(results, case):
    r = results[case]
    tol = 4 * EPS[r["dtype"]]  # cosine similarities are <= 1; inputs are rounded to dtype before the reference
    assert r["idx_in_range"]
    assert r["best_err"] <= tol, f"max similarity off by {r['best_err']:.3g}"
    assert r["chosen_gap"] <= 2 * tol, f"argmax picks a token {r['chosen_gap']:.3g} below the best"
