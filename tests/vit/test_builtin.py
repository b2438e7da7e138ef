"""The built-in ViT: 257 tokens, a short training run writes loadable safetensors with its recipe."""
from __future__ import annotations

import torch

from vision_eff.vit.builtin import VIT_CONFIG, build_vit, load_vit, train_vit
from vision_eff.zoo.weights import read_metadata


def test_build_train_save_load(tmp_path):
    model = build_vit()
    assert model.patch_embed.num_patches + model.num_prefix_tokens == 257
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 8)
    out = train_vit(steps=2, pretrain_steps=2, batch_size=4, out=tmp_path / "vit.safetensors", progress=False,
                    eval_count=16)
    meta = read_metadata(out)
    assert meta["model"] == "shapes-vit" and meta["steps_done"] == 2 and meta["config"]["embed_dim"] == VIT_CONFIG["embed_dim"]
    loaded = load_vit(out)
    assert 0.0 <= meta["eval_accuracy"] <= 1.0 and meta["eval_images"] == 16
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_vit(out)(x), loaded(x))


def test_committed_weights_match_their_record():
    from vision_eff.vit.builtin import evaluate
    from vision_eff.zoo.weights import weights_path

    meta = read_metadata(weights_path("shapes-vit"))
    assert meta["steps_done"] >= 1 and meta["eval_images"] == 2048
    acc = evaluate(load_vit(), count=512)  # the first quarter of the split the record was measured on
    assert abs(acc - meta["eval_accuracy"]) < 0.04


def test_mixer_recovery_from_the_cli(tmp_path, capsys):
    from vision_eff.cli import main
    from vision_eff.vit.mixer import MixerSwap

    out = tmp_path / "mixer.safetensors"
    assert main(["zoo", "train", "shapes-vit-poolmixer", "--steps", "2", "--batch-size", "2", "--out", str(out),
                 "--system-allocator"]) == 0  # mallopt is process-wide: the tests leave it alone
    assert "allocator: as the system set it" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["swap"]["blocks"] == [0, 1] and meta["recipe"]["steps"] == 2
    model = load_vit()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        import vision_eff as ve

        with ve.patched(model, MixerSwap(blocks=(0, 1), weights=str(out))):
            swapped = model(x)
        assert torch.equal(model(x), ref) and not torch.equal(swapped, ref)
