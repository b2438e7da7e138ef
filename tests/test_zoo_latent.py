"""Latent diffusion in the zoo: the autoencoder shapes-vae and the DiT in its latent space."""
import pytest
import torch

from vision_eff import zoo
from vision_eff.metrics import Evaluator, psnr
from vision_eff.zoo import data, weights
from vision_eff.zoo import train as train_mod


@pytest.fixture(scope="module")
def vae():
    return zoo.load_model("shapes-vae")["vae"]


def test_the_autoencoder_reconstructs_held_out_images_the_evaluator_still_recognises(vae):
    x, y = data.eval_split(32, 256)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample.clamp(-1, 1)
    assert z.shape == (256, 4, 16, 16)
    assert psnr(rec, x).mean() > 28.0
    assert Evaluator().accuracy(rec, y) >= 0.98


def test_the_scaling_factor_gives_latents_of_unit_variance(vae):
    meta = weights.read_metadata(weights.weights_path("shapes-vae"))
    assert vae.config.scaling_factor == pytest.approx(meta["scaling_factor"])
    x, _ = data.batch("train", 4096, 512, 32)  # other images than the factor was measured on
    with torch.no_grad():
        z = train_mod.encode_latents(vae, x)
    assert 0.9 < z.std().item() < 1.1


def test_autoencoder_weights_without_a_scaling_factor_are_refused(tmp_path, vae):
    path = weights.save({"vae": vae}, tmp_path / "v.safetensors", {"model": "shapes-vae"})
    with pytest.raises(weights.WeightsError, match="scaling factor"):
        zoo.load_model("shapes-vae", weights=path)


def test_the_latent_dit_pipeline_decodes_its_latents_with_the_vae():
    from vision_eff.zoo.pipeline import ShapesLatentDiTPipeline

    pipe = zoo.load_pipeline("shapes-latent-dit")
    assert isinstance(pipe, ShapesLatentDiTPipeline) and pipe.latent_shape == (4, 16, 16)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(class_labels=[0, 5], num_inference_steps=3, latents=noise)
    lat = pipe(**kw, output_type="latent").images
    img = pipe(**kw, output_type="pt").images
    with torch.no_grad():
        ref = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert torch.allclose(img, (ref + 1) / 2, atol=1e-6) and img.shape == (2, 3, 32, 32)


def test_the_latent_objective_denoises_the_scaled_latents_of_the_images(vae):
    """The loss equals a by-hand v-prediction loss on encode(x) * scaling_factor (same random draws)."""
    modules = zoo.build("shapes-latent-dit")
    recipe = zoo.ZOO["shapes-latent-dit"].train  # its labels are dropped once per sample (here never)
    obj = train_mod._Objective("shapes-latent-dit", modules, 0.0, None, recipe["loss"], vae=vae,
                               shared_label_dropout=recipe["shared_label_dropout"]).train()
    x, y = data.batch("train", 0, 4, 32)
    loss = obj(x, y, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        z0 = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).double()
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(z0.shape, generator=g).double()
    a = obj.alphas_cumprod[t].double().view(4, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        out = modules["transformer"](zt.float(), t, class_labels=y).sample.double()
    ref = (out - (a.sqrt() * noise - (1 - a).sqrt() * z0)).square().mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


def test_training_the_latent_dit_records_its_autoencoder_and_a_retrained_one_is_refused(tmp_path, vae):
    from vision_eff.samplers.schedules import model_fingerprint

    out = train_mod.train("shapes-latent-dit", steps=2, batch_size=4, out=tmp_path / "l.safetensors", progress=False)
    meta = weights.read_metadata(out)
    assert meta["vae"] == "shapes-vae" and meta["vae_fingerprint"] == model_fingerprint(vae)
    assert meta["recipe"]["shared_label_dropout"] is True
    assert zoo.load_pipeline("shapes-latent-dit", weights=out).latent_shape == (4, 16, 16)
    meta["vae_fingerprint"] = "0" * 16
    modules = zoo.load_model("shapes-latent-dit", weights=out)
    other = weights.save(modules, tmp_path / "o.safetensors", meta)
    with pytest.raises(weights.WeightsError, match="retrain it"):
        zoo.load_pipeline("shapes-latent-dit", weights=other)


def test_a_teacher_in_another_space_and_repa_on_latents_are_refused():
    with pytest.raises(ValueError, match="same space"):
        train_mod.train("shapes-latent-dit", teacher="shapes-unet", steps=1)
    with pytest.raises(ValueError, match="pixel-space DiT"):
        train_mod._Objective("shapes-latent-dit", zoo.build("shapes-latent-dit"), repa={"weight": 0.5})
