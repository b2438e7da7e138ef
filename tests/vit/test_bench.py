"""`vision-eff bench vit --smoke` runs end to end and writes its table and picture."""
from __future__ import annotations

from pathlib import Path

import torch

from vision_eff.vit.bench import agreement, main


def test_bench_smoke(tmp_path):
    out = tmp_path / "vit.md"
    rc = main(["--smoke", "--system-allocator", "--iters", "1", "--batches", "1", "--r", "4",
               "--models", "vit_small_patch16_224", "--builtin-batch", "4", "--out", str(out), "--gallery", str(tmp_path / "g")])
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


def test_time_interleaved_pairs_rounds_and_leaves_the_model_unpatched(monkeypatch):
    """Fake clock: the model slows down round by round (drift); the paired ratios stay exact."""
    import timm

    import vision_eff as ve
    from vision_eff.vit import bench

    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
    calls, timed_models = [], []

    def fake(m, xx, iters, warmup=1):
        patched = any(isinstance(t, ve.TokenMerge) for t in ve.active_techniques(m))
        rnd = len(calls) // 2  # two settings per round
        calls.append(patched)
        timed_models.append(m)
        drift = 1.0 + rnd
        return drift / (4.0 if patched else 1.0)

    monkeypatch.setattr(bench, "time_forward", fake)
    out = bench.time_interleaved(model, x, {"r2": ve.TokenMerge(r=2)}, iters=4)
    assert len(calls) == 10  # a warm-up round and 4 timed rounds, two settings each
    assert calls[:4] == [True, False, False, True]  # order reverses every other round
    assert out["r2"]["speedup"] == 4.0  # the drift between rounds cancels in the paired ratios
    assert out[None]["seconds"] == 3.5 and out["r2"]["seconds"] == 3.5 / 4  # medians of rounds 1..4
    # the unpatched side is the model itself; the patched side one copy, patched once for all rounds
    copies = {id(m) for m, p in zip(timed_models, calls) if p}
    assert len(copies) == 1 and id(model) not in copies
    assert all(m is model for m, p in zip(timed_models, calls) if not p)
    assert ve.active_techniques(model) == [] and ve.active_techniques(timed_models[0]) == []  # undone after
    with torch.inference_mode():
        assert torch.equal(model(x), ref)


def test_slice_bound_has_the_merged_models_token_counts_and_flops():
    """The slice bound keeps N - r tokens per block: its FLOPs are the merged model's, less only the matching's
    similarity products; the original model stays untouched, and post-norm models get None."""
    from tests.tokens.families import images, tiny
    from vision_eff.tokens.timm import merge_schedule
    from vision_eff.vit.bench import flops_per_image, slice_bound

    import vision_eff as ve

    model = tiny("deit3_layerscale")
    x = images(2)
    with torch.inference_mode():
        ref = model(x)
    cfg = ve.TokenMerge(r=(10, 0, 7))
    rs = merge_schedule(cfg, 3, 65, 1)
    fwd = slice_bound(model, rs)
    seen = []
    hook = model.blocks[2].register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
    assert fwd(x).shape == ref.shape and seen == []  # runs on its own copy
    hook.remove()
    sliced = flops_per_image(fwd, x)
    with ve.patched(model, cfg):
        merged = flops_per_image(model, x)
    # the matching adds one [Na, d] x [d, Nb] product of head-averaged keys (d = 48 / 3 heads) per merging block:
    # 65 tokens -> sets A, B of 32 in block 0; 55 -> 27 and 27 in block 2
    assert merged - sliced == 2 * 32 * 32 * 16 + 2 * 27 * 27 * 16
    with torch.inference_mode():
        assert torch.equal(model(x), ref)
    assert slice_bound(tiny("res_post"), rs) is None


def test_op_profile_counts_the_linear_layers_flops_and_profile_section(tmp_path, monkeypatch):
    """The profiler's addmm FLOPs against a by-hand count (2 * rows * in * out per nn.Linear call)."""
    import timm

    from vision_eff.vit.bench import op_profile

    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    by_hand = []
    hooks = [m.register_forward_hook(lambda m, i, o: by_hand.append(2 * i[0][..., 0].numel() * m.in_features
                                                                    * m.out_features))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    prof = op_profile(model, x, iters=2)
    secs, flops = prof["aten::addmm"]
    assert flops == sum(by_hand) and secs > 0

    out = tmp_path / "vit.md"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # allocator settings move CPU timings: the command keeps them
    assert main(["--smoke", "--system-allocator", "--skip-builtin", "--iters", "1", "--batches", "1",
                 "--r", "4,9999", "--profile", "--slice-bound", "--models", "vit_small_patch16_224", "--out", str(out), "--gallery", ""]) == 0
    text = out.read_text()
    assert "- command: `MALLOC_ARENA_MAX=2 vision-eff bench vit --smoke --system-allocator --skip-builtin" in text
    assert "- allocator: as the system set it" in text
    main_table = text.split("### Where the time goes")[0]
    line = next(line for line in main_table.splitlines() if line.startswith("| vit_small"))
    row = [cell.strip() for cell in line.split("|")[1:-1]]
    assert len(row) == 4 + 2 * 4  # per r: GFLOPs, img/s, agreement, slice bound
    assert row[7].endswith("x)") and row[11] == ""  # r=4 has a slice bound; r=9999 (too large) a blank cell
    section = text.split("### Where the time goes")[1]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| vit_small")]
    assert any("aten::addmm" in r[2] for r in rows) and rows[-3][2] == "total (all ops)"
    assert all(len(r) == 3 + 2 * 3 for r in rows)  # unpatched, r=4 and r=9999 (blank: too large) columns
    assert [r[2] for r in rows[-2:]] == ["system (kernel) time, no profiler", "minor page faults (count), no profiler"]


def test_kernel_cost_counts_the_page_faults_of_fresh_memory():
    """A forward that writes a fresh 64 MiB buffer (above glibc's largest mmap threshold, so mapped and unmapped
    on every call) faults at least once per 2 MiB (huge pages) and far more than a forward that allocates nothing.
    Measured in a fresh process: what a long pytest process ran before leaves its heap in a state no test controls
    (CI once read 0 faults here in process, with no test having called mallopt: tests/conftest.py guards that)."""
    import subprocess
    import sys

    code = """
import torch
from vision_eff.vit.bench import kernel_cost
class Fresh(torch.nn.Module):
    def forward(self, x):
        return torch.ones(16 * 2**20).sum() + x
class Nothing(torch.nn.Module):
    def forward(self, x):
        return x
x = torch.zeros(1)
sys_fresh, faults_fresh = kernel_cost(Fresh(), x, iters=3)
_, faults_nothing = kernel_cost(Nothing(), x, iters=3)
print(sys_fresh, faults_fresh, faults_nothing)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    sys_fresh, faults_fresh, faults_nothing = map(float, out[-3:])
    assert faults_fresh >= 64 * 2**20 / 2**21 and faults_fresh > faults_nothing + 16 and sys_fresh >= 0


def test_keep_freed_memory_removes_the_page_faults_of_fresh_memory():
    """In a fresh process (mallopt is process-wide): writing a fresh 64 MiB buffer faults on every call before,
    and hardly at all once glibc keeps freed memory and its heap has grown to size."""
    import subprocess
    import sys

    code = """
import importlib.util, resource, torch
spec = importlib.util.spec_from_file_location("timing", {path!r})  # the module alone, not the package
timing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(timing)
def faults():  # minor page faults of the last of 3 calls that write a fresh 64 MiB buffer
    for _ in range(3):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 * 2**20).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
before = faults()
line = timing.keep_freed_memory()
faults()  # the heap grows to its steady size over the first few calls (now and then over a few more)
print(before, min(faults() for _ in range(3)), line)
""".format(path=str(Path(__file__).parents[2] / "vision_eff" / "_timing.py"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, after = float(out[0]), float(out[1])
    assert " ".join(out[2:]).startswith("glibc malloc keeps freed memory")
    assert before >= 32 and after < 16
