"""Non-uniform StepCache schedules: the full steps run exactly as listed, and the calibration places them
by the measured drift of the cached feature (checked against an independent recomputation)."""
from __future__ import annotations

import math

import pytest
import torch

import vision_eff as ve
from tests.cache.test_step_cache import STEPS, generate
from tests.cache.tiny import pipelines
from vision_eff.cache import calibrate_full_steps, drift_per_step, full_steps_from_drift


def test_even_drift_gives_the_uniform_schedule():
    # oracle: with drift 1 per step, full step k is the first i with i >= k * 49 / K
    for k_full in (1, 4, 7, 10, 25, 50):
        expect = tuple(sorted({0} | {math.ceil(49 * k / k_full - 1e-9) for k in range(1, k_full)}))
        assert full_steps_from_drift(torch.ones(49), k_full) == expect
    # alpha=0 ignores the drift's shape
    d = torch.linspace(0.01, 1.0, 49)
    assert full_steps_from_drift(d, 10, alpha=0) == full_steps_from_drift(torch.ones(49), 10)


def test_full_steps_follow_the_drift():
    d = torch.cat([torch.full((24,), 0.01), torch.full((25,), 1.0)])  # the second half moves 100x more
    steps = full_steps_from_drift(d, 10, alpha=1.0)
    assert len(steps) == 10 and steps[0] == 0
    assert sum(s >= 25 for s in steps) == 9  # equal drift per gap: all but step 0 land in the busy half
    mild = torch.cat([torch.full((24,), 0.25), torch.full((25,), 1.0)])
    half = full_steps_from_drift(mild, 10, alpha=0.5)
    assert 5 < sum(s >= 25 for s in half) < 9  # between uniform (5) and equal drift (9)
    assert half == full_steps_from_drift(mild.sqrt(), 10, alpha=1.0)
    # every count up to the run length is met exactly, ties split
    assert [len(full_steps_from_drift(d, k, alpha=1.0)) for k in (30, 50)] == [30, 50]


def test_bad_inputs():
    for args, word in [((torch.ones(9), 0), "num_full"), ((torch.ones(9), 11), "more than"),
                       ((torch.tensor([1.0, -1.0]), 2), "non-negative"), ((torch.ones(9), 2, -1.0), "alpha")]:
        with pytest.raises(ValueError, match=word):
            full_steps_from_drift(*args)
    for kw, word in [({"full_steps": ()}, "full_steps"), ({"full_steps": (0, -2)}, "full_steps"),
                     ({"full_steps": (0, 3), "threshold": 0.1}, "threshold=None")]:
        with pytest.raises(ValueError, match=word):
            ve.StepCache(**kw)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_listed_full_steps_run_exactly(kind):
    pipe = pipelines(kind)
    ref = generate(pipe)
    with ve.patched(pipe, ve.StepCache(full_steps=tuple(range(STEPS)))) as h:  # every step listed: uncached
        assert torch.equal(generate(pipe), ref)
    with ve.patched(pipe, ve.StepCache(full_steps=(3, 0, 1), interval=2, order=1)) as h:
        out = generate(pipe)
        log = h.parts[0].state["schedule"].log
    assert [i for i, _, full in log if full] == [0, 1, 3, 5]  # as listed, then every 2nd after the last
    assert not torch.equal(out, ref)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_drift_is_measured_on_the_cached_feature(kind):
    pipe = pipelines(kind)
    model = pipe.denoiser
    # independent capture: the feature each cache replays, read with plain hooks on an unpatched model
    feats, start = [], []
    if kind == "unet":
        from vision_eff.cache.unet import plan_unet

        hooks = [plan_unet(model, 0)[-1].register_forward_hook(lambda m, a, o: feats.append(o[0].flatten(1)))]
        probe = 1
    else:
        blocks = model.transformer_blocks
        hooks = [blocks[1].register_forward_pre_hook(lambda m, a: start.append(a[0])),
                 blocks[-1].register_forward_hook(lambda m, a, o: feats.append((o - start[-1]).flatten(1)))]
        probe = 1
    with torch.no_grad():
        generate(pipe)
    for h in hooks:
        h.remove()
    expect = torch.stack([((b - a).norm(dim=1) / b.norm(dim=1)).mean() for a, b in zip(feats, feats[1:])])
    d = drift_per_step(pipe, lambda: generate(pipe), probe=probe)
    torch.testing.assert_close(d, expect)
    assert not model._forward_hooks and not model._forward_pre_hooks and "step" not in pipe.scheduler.__dict__
    steps = calibrate_full_steps(pipe, 3, lambda: generate(pipe))
    assert steps == full_steps_from_drift(expect, 3)


def test_bench_runs_a_calibrated_setting(tmp_path):
    """`vision-eff bench diffusion` end to end on the built-in UNet, one calibrated row (speed numbers mean nothing)."""
    from vision_eff.cache.bench import main

    out = tmp_path / "d.md"
    assert main(["--n", "2", "--batch", "2", "--steps", "10", "--no-eval", "--models", "shapes-unet",
                 "--only", "calibrated 8 full steps, order 1", "--out", str(out), "--gallery", str(tmp_path),
                 "--system-allocator"]) == 0  # mallopt is process-wide: leave pytest's allocator alone
    assert "Allocator: as the system set it (nothing changed)." in out.read_text()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| StepCache calibrated 8")]
    assert len(rows) == 2  # with and without merging
    assert (tmp_path / "unet.png").exists()
