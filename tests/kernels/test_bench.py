"""`vision-eff bench attention`: refuses clearly without a GPU; the table machinery works (dry run)."""
from __future__ import annotations

import pytest
import torch

from vision_eff.kernels import bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_refuses_without_gpu(capsys, tmp_path):
    assert bench.main(["--out", str(tmp_path / "x.md")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


def test_dry_run_writes_a_table_with_provenance(tmp_path):
    out = tmp_path / "attention.md"
    assert bench.main(["--dry-run", "--out", str(out), "--sets", "1", "--passes", "fwd,fwd+bwd"]) == 0
    text = out.read_text()
    for needle in ("DRY RUN", "device:", "date:", "commit:", "command: `vision-eff bench attention --dry-run",
                   "| toy odd D | 1,2,64,40 | per-key | fwd+bwd |", "Fused token matching", "attention share"):
        assert needle in text, needle
    # the error column is filled from a float64 comparison and is small for the exact path
    row = next(line for line in text.splitlines() if line.startswith("| toy D64 | 1,2,48,64 | none | fwd |"))
    ours_err = float(row.split("|")[-3])
    assert row.split("|")[-4].strip().endswith("x")  # speed ratio against the best SDPA backend
    assert 0 <= ours_err < 1e-5
