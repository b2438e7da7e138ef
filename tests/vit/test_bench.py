"""`vision-eff bench vit --smoke` runs end to end and writes its table and picture."""
from __future__ import annotations

from vision_eff.vit.bench import agreement, main
import torch


def test_bench_smoke(tmp_path):
    out = tmp_path / "vit.md"
    rc = main(["--smoke", "--iters", "1", "--batches", "1", "--r", "4", "--models", "vit_small_patch16_224",
               "--builtin-batch", "4", "--out", str(out), "--gallery", str(tmp_path / "g")])
    assert rc == 0
    text = out.read_text()
    assert "TokenMerge(r=16)" in text and "vit_small_patch16_224" in text and "command:" in text
    assert (tmp_path / "g" / "merge_maps.png").exists()


def test_agreement_metric():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    agree, kl = agreement(a, a)
    assert agree == 1.0 and abs(kl) < 1e-7
    agree, kl = agreement(a, -a)
    assert agree == 0.0 and kl > 0
