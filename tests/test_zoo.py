import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from vision_eff import zoo
from vision_eff.zoo import weights
from vision_eff.zoo.pipeline import ShapesUNetPipeline


@pytest.fixture(scope="module", params=zoo.diffusion_models(packaged=True))
def pipe(request):
    p = zoo.load_pipeline(request.param)
    p.zoo_name = request.param  # for the tests' own bookkeeping
    return p


def test_weights_record_their_training(pipe):
    name = pipe.zoo_name
    info = zoo.model_info(name)
    assert info["model"] == name and info["steps_done"] >= 1
    assert {"seed", "steps", "batch_size"} <= set(info["recipe"])
    assert info["train_seconds"] > 0


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDIMScheduler, HeunDiscreteScheduler])
def test_offline_generation_with_swapped_schedulers(pipe, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    noise = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    out = pipe(class_labels=[1, 4], num_inference_steps=4, guidance_scale=2.0, latents=noise,
               output_type="pt").images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert 0 <= out.min() and out.max() <= 1
    again = pipe(class_labels=[1, 4], num_inference_steps=4, guidance_scale=2.0, latents=noise,
                 output_type="pt").images
    assert torch.equal(out, again)  # deterministic for a fixed noise


def test_output_types_and_generator(pipe):
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    pil = pipe(class_labels=0, num_inference_steps=2, generator=g()).images
    np_img = pipe(class_labels=0, num_inference_steps=2, generator=g(), output_type="np").images
    lat = pipe(class_labels=0, num_inference_steps=2, generator=g(), output_type="latent").images
    assert pil[0].size == (32, 32) and np_img.shape == (1, 32, 32, 3)
    assert lat.shape == (1, *pipe.latent_shape)
    assert torch.allclose(torch.from_numpy(np_img).permute(0, 3, 1, 2), (pipe.decode_latents(lat) + 1) / 2, atol=1e-6)


def test_callback_sees_every_step(pipe):
    seen = []
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe(class_labels=[2], num_inference_steps=3, callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw)
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("kwargs, match", [
    (dict(class_labels=[8]), "out of range"),
    (dict(class_labels=[-1]), "out of range"),
    (dict(class_labels=[0.5]), "integers"),
    (dict(class_labels=[0], num_inference_steps=0), ">= 1"),
    (dict(class_labels=[0], output_type="jpg"), "output_type"),
    (dict(class_labels=[0], latents=torch.zeros(1, 3, 16, 16)), "shape"),
])
def test_pipeline_bad_input(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_unknown_model_and_non_diffusion_model():
    with pytest.raises(KeyError, match="built-in models are"):
        zoo.load_pipeline("stable-diffusion")
    with pytest.raises(ValueError, match="not a diffusion model"):
        zoo.load_pipeline("shapes-classifier")


def test_corrupt_and_mismatched_weights(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(weights.WeightsError, match="not a valid safetensors"):
        weights.load_into(zoo.build("shapes-classifier"), bad, "shapes-classifier")
    other = weights.save(zoo.build("shapes-classifier"), tmp_path / "c.safetensors", {"model": "shapes-classifier"})
    with pytest.raises(weights.WeightsError, match="holds weights for 'shapes-classifier'"):
        weights.load_into(zoo.build("shapes-dit"), other, "shapes-dit")
    wrong = weights.save(zoo.build("shapes-classifier"), tmp_path / "w.safetensors", {"model": "x"})
    with pytest.raises(weights.WeightsError, match="does not match"):
        weights.load_into(zoo.build("shapes-dit"), wrong, "x")
    with pytest.raises(weights.WeightsError, match="vision-eff zoo train"):
        weights.load_into(zoo.build("shapes-dit"), tmp_path / "missing.safetensors", "shapes-dit")


def test_training_a_few_steps_writes_a_loadable_record(tmp_path):
    from vision_eff.zoo.train import train

    out = train("shapes-unet", steps=2, batch_size=4, out=tmp_path / "u.safetensors", progress=False)
    meta = weights.read_metadata(out)
    assert meta["steps_done"] == 2 and meta["final"] is True and meta["recipe"]["batch_size"] == 4
    modules = zoo.build("shapes-unet")
    weights.load_into(modules, out, "shapes-unet")
    pipe = ShapesUNetPipeline(unet=modules["unet"], label_encoder=modules["label_encoder"],
                              scheduler=zoo.default_scheduler("shapes-unet"))
    assert pipe(class_labels=[0], num_inference_steps=1, output_type="pt").images.shape == (1, 3, 32, 32)


def test_a_pipeline_loads_weights_other_than_the_packaged_ones(tmp_path):
    fresh = zoo.build("shapes-dit")
    torch.manual_seed(3)
    for p in fresh["transformer"].parameters():
        p.data.normal_(0, 0.02)
    path = weights.save(fresh, tmp_path / "dit.safetensors", {"model": "shapes-dit"})
    pipe = zoo.load_pipeline("shapes-dit", weights=path)
    packaged = zoo.load_pipeline("shapes-dit")
    got = dict(pipe.transformer.named_parameters())
    assert all(torch.equal(got[k], v) for k, v in fresh["transformer"].named_parameters())
    assert not all(torch.equal(got[k], v) for k, v in packaged.transformer.named_parameters())
    with pytest.raises(weights.WeightsError, match="holds weights for 'shapes-dit'"):
        zoo.load_pipeline("shapes-unet", weights=path)


def _trained_two_steps(name: str, kind: str, pipeline_cls, tmp_path):
    """A label-token transformer trained for 2 steps, loaded as its pipeline, its weights then moved away
    from the (near-zero) start so that the label's effect is visible."""
    from vision_eff.zoo.train import train

    out = train(name, steps=2, batch_size=4, out=tmp_path / f"{kind}.safetensors", progress=False)
    meta = weights.read_metadata(out)
    assert meta["model"] == name and meta["kind"] == kind and meta["steps_done"] == 2
    pipe = zoo.load_pipeline(name, weights=out)
    assert type(pipe) is pipeline_cls
    torch.manual_seed(0)
    for p in pipe.transformer.parameters():
        p.data.normal_(0, 0.05)
    return pipe


def _generates_with_two_schedulers(pipe) -> None:
    for cls in (DPMSolverMultistepScheduler, EulerDiscreteScheduler):
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        img = pipe(class_labels=[1, 5], num_inference_steps=3, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()


def test_pixart_trains_and_its_label_reaches_the_output_through_cross_attention(tmp_path):
    from vision_eff.zoo.pipeline import ShapesPixArtPipeline

    pipe = _trained_two_steps("shapes-pixart", "pixart", ShapesPixArtPipeline, tmp_path)
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([500, 500])
    a, b = pipe._denoise(x, t, torch.tensor([0, 0])), pipe._denoise(x, t, torch.tensor([3, 3]))
    ctx = pipe.label_encoder(torch.tensor([3, 3]))
    direct = pipe.transformer(x, encoder_hidden_states=ctx, timestep=t).sample
    assert torch.equal(b, direct) and (a - b).abs().max() > 1e-3  # the label tokens are the cross-attention context
    _generates_with_two_schedulers(pipe)


def test_sana_trains_and_its_label_reaches_the_output_through_cross_attention_and_the_timestep(tmp_path):
    from vision_eff.zoo.models import SANA_LABEL_SCALE
    from vision_eff.zoo.pipeline import ShapesSanaPipeline

    pipe = _trained_two_steps("shapes-sana", "sana", ShapesSanaPipeline, tmp_path)
    assert type(pipe.transformer).__name__ == "SanaTransformer2DModel"
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([500, 500])
    tr, lab = pipe.transformer, torch.tensor([3, 3])
    ctx, other = pipe.label_encoder(lab), pipe.label_encoder(torch.tensor([0, 0]))
    scalar = torch.full((2,), 3 * SANA_LABEL_SCALE)
    direct = tr(x, encoder_hidden_states=ctx, timestep=t, guidance=scalar).sample
    assert torch.equal(pipe._denoise(x, t, lab), direct)
    # each path on its own changes the output: the tokens (same scalar) and the scalar (same tokens)
    assert (tr(x, encoder_hidden_states=other, timestep=t, guidance=scalar).sample - direct).abs().max() > 1e-3
    assert (tr(x, encoder_hidden_states=ctx, timestep=t, guidance=scalar * 0).sample - direct).abs().max() > 1e-3
    _generates_with_two_schedulers(pipe)


def test_sana_training_drops_labels_to_the_null_label_on_both_paths():
    from vision_eff.zoo.models import SANA_LABEL_SCALE
    from vision_eff.zoo.train import _Objective

    obj = _Objective("shapes-sana", zoo.build("shapes-sana"), label_dropout=1.0)
    tokens, scalars = [], []
    obj.parts["label_encoder"].register_forward_hook(lambda m, args, out: tokens.append(args[0].clone()))
    obj.parts["transformer"].register_forward_pre_hook(
        lambda m, args, kw: scalars.append(kw["guidance"].clone()), with_kwargs=True)
    x0 = torch.zeros(3, 3, 32, 32)
    assert torch.isfinite(obj(x0, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0)))
    null = torch.full((3,), zoo.NUM_CLASSES)
    assert torch.equal(tokens[0], null) and torch.equal(scalars[0], null.float() * SANA_LABEL_SCALE)
    obj.label_dropout = 0.0
    obj(x0, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    assert torch.equal(tokens[1], torch.tensor([0, 1, 2])) and torch.equal(scalars[1], torch.tensor([0.0, 100.0, 200.0]))


def test_pixart_training_drops_labels_to_the_null_token():
    from vision_eff.zoo.train import _Objective

    obj = _Objective("shapes-pixart", zoo.build("shapes-pixart"), label_dropout=1.0)
    seen = []
    obj.parts["label_encoder"].register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    x0 = torch.zeros(3, 3, 32, 32)
    loss = obj(x0, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and torch.equal(seen[0], torch.full((3,), zoo.NUM_CLASSES))
    obj.label_dropout = 0.0
    obj(x0, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    assert torch.equal(seen[1], torch.tensor([0, 1, 2]))


def test_a_model_without_packaged_weights_is_listed_and_says_how_to_train_it():
    every, packaged = zoo.diffusion_models(), zoo.diffusion_models(packaged=True)
    assert set(packaged) < set(every) and "shapes-sana" in set(every) - set(packaged)
    assert all(weights.weights_path(n).is_file() for n in packaged)
    with pytest.raises(weights.WeightsError, match="vision-eff zoo train shapes-sana"):
        zoo.load_pipeline("shapes-sana")
