"""StepCache: cache off equals unpatched, remove() is bit-exact, a cached step replays exactly what a full
step computed, the step index follows the pipeline's loop for every scheduler, per-sample decisions are
batch independent, transformers (DiT/PixArt/SD3/Flux) are supported, bad configs fail clearly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vision_eff as ve
from tests.cache.tiny import ALL, output, pipelines, sd_unet, unet_inputs
from vision_eff.cache.blocks import transformer_blocks

KINDS = ["unet", "dit"]
STEPS = 6


def generate(pipe, labels=(0, 3), latents=None, **kw):
    if latents is None:
        latents = torch.randn(len(labels), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return pipe(class_labels=list(labels), num_inference_steps=STEPS, latents=latents, output_type="latent",
                **kw).images


def _no_instance_forward(model):
    return all("forward" not in m.__dict__ for m in model.modules())


@pytest.fixture(scope="module", params=KINDS)
def pipe(request):
    return pipelines(request.param)


def test_cache_off_equals_unpatched(pipe):
    ref = generate(pipe)
    with ve.patched(pipe, ve.StepCache(interval=1)) as h:
        assert torch.equal(generate(pipe), ref)
        assert all(full for _, _, full in h.parts[0].state["schedule"].log)


def test_remove_restores_bit_exactly(pipe):
    ref = generate(pipe)
    h = ve.apply(pipe, ve.StepCache(interval=3), ve.TokenMerge(ratio=0.5), ve.FastAttention())  # all three compose
    cached = generate(pipe)
    log = h.parts[0].state["schedule"].log
    h.remove()
    assert [i for i, _, full in log if full] == [0, 3]
    assert not torch.equal(cached, ref)
    assert torch.equal(generate(pipe), ref)
    assert _no_instance_forward(pipe.denoiser) and not pipe.denoiser._forward_pre_hooks
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__


def test_unet_cached_step_replays_the_deep_branch_exactly():
    """Oracle: with the same input twice, a cached step must equal the full step bit for bit, and the
    deep branch must not run."""
    unet = sd_unet(channels=4)
    k = unet_inputs(batch=2)
    calls = []
    unet.mid_block.resnets[0].register_forward_hook(lambda *a: calls.append(1))
    with ve.patched(unet, ve.StepCache(interval=2, warmup=0)):
        first = output(unet, k)
        second = output(unet, k)  # bare model: same timestep -> next step of the same run, a cached one
    assert len(calls) == 1
    assert torch.equal(first, second)
    # the shallow branch did run: a different input changes the cached step's output
    with ve.patched(unet, ve.StepCache(interval=2, warmup=0)):
        output(unet, k)
        other = output(unet, dict(k, sample=k["sample"] * 0.5))
    assert not torch.allclose(other, first, atol=1e-3)


def test_unet_order_one_extrapolates_the_deep_branch_linearly():
    """Oracle: the deep branch's output on a cached step is f_b + (f_b - f_a) * (i - i_b) / (i_b - i_a);
    deep modules the shallow branch does not read replay their last output."""
    unet = sd_unet(channels=4)
    k = unet_inputs(batch=2)
    seen, mid = [], []

    def first(out):
        return (out[0] if isinstance(out, tuple) else getattr(out, "sample", out)).detach().clone()

    with ve.patched(unet, ve.StepCache(interval=2, warmup=0, order=1)) as h:
        plan = h.parts[0].state["deep_modules"]
        assert unet.mid_block in plan and plan[-1] is not unet.mid_block
        plan[-1].register_forward_hook(lambda m, a, out: seen.append(first(out)))
        unet.mid_block.register_forward_hook(lambda m, a, out: mid.append(first(out)))
        for scale in (1.0, 0.9, 0.7, 0.6, 0.4):  # steps 0..4, full on 0, 2, 4
            output(unet, dict(k, sample=k["sample"] * scale))
        log = h.parts[0].state["schedule"].log
    assert [full for *_, full in log] == [True, False, True, False, True]
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)  # one full step known: plain reuse
    torch.testing.assert_close(seen[3], seen[2] + (seen[2] - seen[0]) * 0.5, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(seen[2], seen[0])
    assert torch.equal(mid[3], mid[2]) and not torch.equal(mid[2], mid[0])


@pytest.mark.parametrize("name", ["pixart", "sd3", "flux"])
def test_transformer_cached_step_reuses_the_residual(name):
    make, inputs = ALL[name]
    model = make()
    k = inputs(batch=2)
    blocks = transformer_blocks(model)
    calls = []
    next(blocks[-1].children()).register_forward_hook(lambda *a: calls.append(1))  # inside the last block
    ref = output(model, k)
    with ve.patched(model, ve.StepCache(interval=3, warmup=0, threshold=0.05)) as h:
        first = output(model, k)
        second = output(model, k)  # probe residual unchanged -> cached
        log = h.parts[0].state["schedule"].log
    assert [full for *_, full in log] == [True, False]
    assert len(calls) == 2  # ref and first; the cached call did not run the last block's body
    assert torch.equal(first, ref)
    torch.testing.assert_close(second, first, atol=1e-5, rtol=1e-5)
    assert torch.equal(output(model, k), ref)


def test_probe_zero_caches_the_whole_stack():
    """probe=0 (fixed interval): a cached step runs no block and replays the whole stack's residual."""
    make, inputs = ALL["pixart"]
    model = make()
    k = inputs(batch=2)
    calls = []
    for blk in transformer_blocks(model):
        next(blk.children()).register_forward_hook(lambda *a: calls.append(1))
    n = len(transformer_blocks(model))
    ref = output(model, k)
    with ve.patched(model, ve.StepCache(interval=2, warmup=0, probe=0, order=0)) as h:
        first = output(model, k)
        second = output(model, k)
        log = h.parts[0].state["schedule"].log
    assert [full for *_, full in log] == [True, False]
    assert len(calls) == 2 * n  # ref and the full step; the cached step ran no block
    assert torch.equal(first, ref)
    torch.testing.assert_close(second, first, atol=1e-5, rtol=1e-5)


SCHEDULERS = ["DDIMScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler"]


@pytest.mark.parametrize("sched_name", SCHEDULERS)
def test_step_index_follows_the_pipeline_loop(sched_name):
    import diffusers

    pipe = pipelines("unet")
    pipe.scheduler = getattr(diffusers, sched_name).from_config(pipe.scheduler.config)
    h = ve.apply(pipe, ve.StepCache(interval=2))
    clock = h.parts[0].state["clock"]
    seen, loop = [], []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: seen.append(clock.index))
    generate(pipe, callback_on_step_end=lambda p, i, t, kw: loop.append(i) or kw)
    # a scheduler swapped in after apply is picked up too
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    seen2 = []
    hook.remove()
    hook = pipe.unet.register_forward_pre_hook(lambda *a: seen2.append(clock.index))
    generate(pipe)
    log = h.parts[0].state["schedule"].log
    hook.remove()
    h.remove()
    n = len(loop)
    assert n == (2 * STEPS - 1 if sched_name.startswith("Heun") else STEPS)
    assert seen == loop == list(range(n))
    assert seen2 == list(range(STEPS))
    assert [i for i, _, full in log if full] == [i for i in range(STEPS) if i % 2 == 0]


@pytest.mark.parametrize("kind", KINDS)
def test_adaptive_decisions_are_per_sample_and_batch_independent(kind):
    pipe = pipelines(kind)
    lat = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    thr = 1.5 if kind == "unet" else 0.3  # random weights: the UNet probe (conv_in) drifts a lot per step
    with ve.patched(pipe, ve.StepCache(interval=3, threshold=thr, order=1)) as h:
        big = generate(pipe, labels=(1, 2, 4), latents=lat)
        log = list(h.parts[0].state["schedule"].log)
        one = generate(pipe, labels=(2,), latents=lat[1:2])
    assert not all(full for *_, full in log) and any(full for i, _, full in log if i > 0)  # the rule acts
    torch.testing.assert_close(big[1:2], one, atol=1e-4, rtol=1e-4)


def test_bad_configuration_errors():
    for kw, word in [({"interval": 0}, "interval"), ({"interval": 1.5}, "interval"), ({"threshold": -1.0}, "threshold"),
                     ({"order": 2}, "order"), ({"probe": -1}, "probe"), ({"probe": 0, "threshold": 0.1}, "probe")]:
        with pytest.raises(ValueError, match=word):
            ve.StepCache(**kw)
    with pytest.raises(ve.UnsupportedModelError, match="not a supported denoiser"):
        ve.apply(nn.Linear(2, 2), ve.StepCache())
    with pytest.raises(ve.UnsupportedModelError, match="branch"):
        ve.apply(sd_unet(), ve.StepCache(branch=99))
    with pytest.raises(ve.UnsupportedModelError, match="probe"):
        ve.apply(ALL["pixart"][0](), ve.StepCache(probe=2))
