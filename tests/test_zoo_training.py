"""The zoo's training recipe machinery: staged recipes, the zero-initialised class embedding, Min-SNR loss."""
import dataclasses
import math

import pytest
import torch

from vision_eff import zoo
from vision_eff.zoo import train as train_mod
from vision_eff.zoo import weights
from vision_eff.zoo.models import NUM_CLASSES, SCHEDULE_CONFIG


def _tiny_entry(monkeypatch, name="shapes-unet", **train_kw):
    base = zoo.ZOO[name]
    e = dataclasses.replace(base, train=dict(base.train, **train_kw))
    monkeypatch.setattr(train_mod, "entry", lambda name: e)
    return e


def test_staged_recipe_runs_every_stage_and_records_the_chain(tmp_path, monkeypatch):
    stages = [dict(prediction_type="epsilon", steps=1, lr=1e-4, batch_size=2, class_embed=False, loss="mse"),
              dict(prediction_type="v_prediction", steps=2, lr=1e-4, batch_size=2, class_embed=False, loss="mse")]
    _tiny_entry(monkeypatch, steps=1, batch_size=3, pretrain=stages)
    out = train_mod.train("shapes-unet", out=tmp_path / "u.safetensors", progress=False, save_every=0)
    s0, s1 = tmp_path / "u-stage0.safetensors", tmp_path / "u-stage1.safetensors"
    m0, m1, m = (weights.read_metadata(p) for p in (s0, s1, out))
    assert (m0["prediction_type"], m0["steps_done"], m0["init_from"]) == ("epsilon", 1, None)
    assert (m1["prediction_type"], m1["steps_done"], m1["init_from"]) == ("v_prediction", 2, s0.name)
    assert m["init_from"] == s1.name and m["recipe"]["pretrain"] == stages
    # the final stage reads data after the 1*2 + 2*2 samples the stages saw
    assert m["recipe"]["data_offset"] == 6 and "sample 6 +" in m["data"]
    # the early stages have no class embedding; the final model has it
    from safetensors import safe_open

    with safe_open(str(s1), "pt") as f:
        assert not any(k.startswith("unet.class_embedding.") for k in f.keys())
    with safe_open(str(out), "pt") as f:
        assert "unet.class_embedding.weight" in set(f.keys())


def test_continuing_from_weights_reads_fresh_data_and_keeps_the_history(tmp_path, monkeypatch):
    _tiny_entry(monkeypatch, steps=1, batch_size=2)
    first = train_mod.train("shapes-unet", steps=2, out=tmp_path / "a.safetensors", progress=False, save_every=0)
    again = train_mod.train("shapes-unet", steps=1, init_from=first, out=tmp_path / "b.safetensors",
                            progress=False, save_every=0)
    m1, m2 = weights.read_metadata(first), weights.read_metadata(again)
    assert m1["data_offset"] == 0 and m1["samples_seen"] == 4
    assert m2["data_offset"] == 4 and m2["init_from"] == "a.safetensors"
    assert [h["steps_done"] for h in m2["history"]] == [2]


def test_bf16_autocast_only_where_the_hardware_has_it_unless_forced(monkeypatch):
    asks, plain = {"bf16": True}, {}
    monkeypatch.setattr(train_mod, "native_bf16", lambda device: False)
    mixed, line = train_mod.training_precision(asks, "cpu")
    assert mixed == "no" and "no native bf16" in line and "--precision bf16" in line
    assert train_mod.training_precision(asks, "cpu", "bf16") == ("bf16", "bf16 autocast")
    assert train_mod.training_precision(plain, "cpu") == ("no", "fp32")
    monkeypatch.setattr(train_mod, "native_bf16", lambda device: True)
    assert train_mod.training_precision(asks, "cpu") == ("bf16", "bf16 autocast")
    assert train_mod.training_precision(asks, "cpu", "fp32") == ("no", "fp32")
    assert train_mod.training_precision(plain, "cpu", "bf16")[0] == "bf16"
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        train_mod.training_precision(asks, "cpu", "fp16")


def test_native_bf16_on_this_cpu_follows_its_instruction_set():
    """The oracle: the kernel's CPU flags (AVX512-BF16 or AMX; plain AVX-512 emulates bf16, slower than fp32)."""
    import platform
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not info.exists():
        pytest.skip("reads the x86 CPU flags from /proc/cpuinfo")
    flags = set(next(ln for ln in info.read_text().splitlines() if ln.startswith("flags")).split(":")[1].split())
    expected = bool(flags & {"avx512_bf16", "amx_tile"})
    assert train_mod.native_bf16("cpu") == expected
    assert not train_mod.native_bf16("meta")


def test_the_weights_record_the_precision_that_ran(tmp_path, monkeypatch):
    _tiny_entry(monkeypatch, steps=1, batch_size=2, bf16=True)
    monkeypatch.setattr(train_mod, "native_bf16", lambda device: False)
    auto = train_mod.train("shapes-unet", out=tmp_path / "a.safetensors", progress=False, save_every=0, steps=1)
    forced = train_mod.train("shapes-unet", out=tmp_path / "b.safetensors", progress=False, save_every=0, steps=1,
                             precision="bf16")
    assert weights.read_metadata(auto)["precision"].startswith("fp32: the recipe asks for bf16")
    assert weights.read_metadata(forced)["precision"] == "bf16 autocast"
    with pytest.raises(ValueError, match="precision must be one of"):
        train_mod.train("shapes-unet", out=tmp_path / "c.safetensors", progress=False, steps=1, precision="half")


def test_kept_checkpoints_are_the_weights_written_at_those_steps(tmp_path, monkeypatch):
    _tiny_entry(monkeypatch, steps=3, batch_size=2, pretrain=None)
    seen = {}
    save = train_mod.save

    def spy(modules, path, meta):  # what each periodic write held, to compare with the kept copies
        seen[meta["steps_done"]] = {f"{c}.{k}": v.clone() for c, m in modules.items() for k, v in m.state_dict().items()}
        return save(modules, path, meta)

    monkeypatch.setattr(train_mod, "save", spy)
    out = train_mod.train("shapes-unet", out=tmp_path / "u.safetensors", progress=False, save_every=1,
                          keep_checkpoints=True)
    kept = sorted(p.name for p in tmp_path.glob("u.step*.safetensors"))
    assert kept == ["u.step1.safetensors", "u.step2.safetensors"]  # the final weights are `out` itself
    from safetensors.torch import load_file

    for step in (1, 2):
        path = train_mod.checkpoint_path(out, step)
        assert weights.read_metadata(path)["steps_done"] == step
        got = load_file(str(path))
        assert all(torch.equal(got[k], v.float()) for k, v in seen[step].items())
    assert not torch.equal(load_file(str(tmp_path / "u.step1.safetensors"))["unet.conv_in.weight"],
                           load_file(str(out))["unet.conv_in.weight"])


def test_adding_the_zero_initialised_class_embedding_leaves_the_model_unchanged(tmp_path):
    torch.manual_seed(0)
    plain = zoo.build("shapes-unet", class_embed=False)
    path = weights.save(plain, tmp_path / "plain.safetensors", {"model": "shapes-unet"})
    grown = zoo.build("shapes-unet")
    with pytest.raises(weights.WeightsError, match="does not match"):
        weights.load_into(grown, path, "shapes-unet")
    weights.load_into(grown, path, "shapes-unet", allow_missing=("class_embedding.",))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([10, 700]), torch.tensor([3, NUM_CLASSES])
    with torch.no_grad():
        ref = plain["unet"](x, t, encoder_hidden_states=plain["label_encoder"](y)).sample
        out = grown["unet"](x, t, encoder_hidden_states=grown["label_encoder"](y), class_labels=y).sample
    assert torch.equal(out, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_is_the_clipped_snr_weighted_x0_error(prediction_type):
    """Independent check in float64: the loss equals mean(min(SNR, 5) * (x0_hat - x0)^2)."""
    torch.manual_seed(0)
    modules = zoo.build("shapes-unet")
    obj = train_mod._Objective("shapes-unet", modules, 0.0, prediction_type, "min_snr5").double()
    seen = {}

    def spy(mod, args, kwargs, out):
        seen.update(xt=args[0], t=args[1], out=out.sample)

    modules["unet"].register_forward_hook(spy, with_kwargs=True)
    x0 = torch.rand(4, 3, 32, 32, dtype=torch.float64) * 2 - 1
    loss = obj(x0, torch.arange(4), torch.Generator().manual_seed(3))
    from diffusers import DDPMScheduler

    a = DDPMScheduler(**SCHEDULE_CONFIG).alphas_cumprod.double()[seen["t"]].view(-1, 1, 1, 1)
    xt, out = seen["xt"].double(), seen["out"].double()
    x0_hat = (xt - (1 - a).sqrt() * out) / a.sqrt() if prediction_type == "epsilon" else a.sqrt() * xt - (1 - a).sqrt() * out
    snr = a / (1 - a)
    expected = (snr.clamp(max=5.0) * (x0_hat - x0) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)


def test_bad_loss_name_is_rejected():
    with pytest.raises(ValueError, match="min_snrG"):
        train_mod._Objective("shapes-unet", zoo.build("shapes-unet"), loss="snr")


@pytest.mark.parametrize("source", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("target", ["epsilon", "v_prediction", "sample"])
def test_convert_prediction_maps_between_the_three_parameterisations(source, target):
    """Against the definitions in float64: x_t = sqrt(a) x0 + sqrt(1-a) eps, v = sqrt(a) eps - sqrt(1-a) x0."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    a = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64).view(3, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    forms = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}
    got = train_mod.convert_prediction(forms[source], xt, a, source, target)
    torch.testing.assert_close(got, forms[target], rtol=1e-9, atol=1e-9)


def test_convert_prediction_rejects_unknown_types():
    with pytest.raises(ValueError, match="prediction types"):
        train_mod.convert_prediction(torch.zeros(1), torch.zeros(1), torch.ones(1), "flow", "epsilon")


def _dit_teacher_of(transformer):
    """A ShapesDiTPipeline around a frozen copy of ``transformer`` (the teacher interface the objective uses)."""
    import copy

    from vision_eff.zoo.pipeline import ShapesDiTPipeline

    return ShapesDiTPipeline(transformer=copy.deepcopy(transformer).eval(), scheduler=zoo.default_scheduler("shapes-dit"))


def test_distilling_from_an_identical_teacher_gives_zero_loss_with_dropped_labels():
    """The student's labels are dropped exactly where the teacher's are: one drop per sample for every
    DiT block (diffusers' DiT gives each block its own label embedding, which would otherwise drop on
    its own), so a student identical to its teacher has zero loss even with half the labels dropped."""
    torch.manual_seed(0)
    modules = zoo.build("shapes-dit")
    teacher = _dit_teacher_of(modules["transformer"])
    obj = train_mod._Objective("shapes-dit", modules, 0.5, None, "mse", teacher=teacher).train()
    x0 = torch.rand(8, 3, 32, 32) * 2 - 1
    loss = obj(x0, torch.arange(8) % NUM_CLASSES, torch.Generator().manual_seed(1))
    assert loss.item() < 1e-10
    # the control: training the same pair without the teacher (the DiT's own per-block dropout) is not zero
    plain = train_mod._Objective("shapes-dit", zoo.build("shapes-dit"), 0.1, None, "mse").train()
    assert plain(x0, torch.arange(8) % NUM_CLASSES, torch.Generator().manual_seed(1)).item() > 1e-3


def test_distillation_target_is_the_teachers_prediction_in_the_students_parameterisation():
    torch.manual_seed(0)
    student = zoo.build("shapes-dit")
    teacher_modules = zoo.build("shapes-dit")
    teacher = _dit_teacher_of(teacher_modules["transformer"])
    obj = train_mod._Objective("shapes-dit", student, 0.0, "v_prediction", "mse", teacher=teacher).train()
    seen = {}

    def spy(mod, args, kwargs, out):
        seen.update(xt=args[0], t=args[1], out=out.sample)

    student["transformer"].register_forward_hook(spy, with_kwargs=True)
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    labels = torch.arange(4)
    loss = obj(x0, labels, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_target = teacher.transformer(seen["xt"], seen["t"], class_labels=labels).sample
    torch.testing.assert_close(loss, (seen["out"] - ref_target).square().mean(), rtol=1e-5, atol=0)


def test_every_label_repeats_each_noisy_image_under_all_labels_and_the_null_one():
    xt, t = torch.randn(3, 3, 4, 4), torch.tensor([5, 500, 900])
    a = torch.rand(3, 1, 1, 1)
    ex, et, ea, labels = train_mod.every_label(xt, t, a)
    k = NUM_CLASSES + 1
    assert ex.shape[0] == et.shape[0] == ea.shape[0] == labels.shape[0] == 3 * k
    for i in range(3):  # image-major: rows i*k .. i*k + k-1 are image i under labels 0..NUM_CLASSES
        rows = slice(i * k, (i + 1) * k)
        assert torch.equal(labels[rows], torch.arange(k))
        assert torch.equal(ex[rows], xt[i].expand(k, -1, -1, -1))
        assert (et[rows] == t[i]).all() and (ea[rows] == a[i]).all()


def test_distilling_under_every_label_matches_the_teacher_on_each_label():
    """The loss is the mean squared gap to the teacher over every (noisy image, label) pair, the null label
    included, and no label is dropped (a student identical to its teacher has zero loss)."""
    torch.manual_seed(0)
    student = zoo.build("shapes-dit")
    teacher = _dit_teacher_of(zoo.build("shapes-dit")["transformer"])
    obj = train_mod._Objective("shapes-dit", student, 0.5, "v_prediction", "mse", teacher=teacher,
                               teacher_labels="all").train()
    seen = {}

    def spy(mod, args, kwargs, out):
        seen.update(xt=args[0], t=args[1], labels=kwargs["class_labels"], out=out.sample)

    student["transformer"].register_forward_hook(spy, with_kwargs=True)
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = obj(x0, torch.tensor([3, 5]), torch.Generator().manual_seed(2))
    k = NUM_CLASSES + 1
    assert torch.equal(seen["labels"], torch.arange(k).repeat(2))  # nothing dropped despite dropout 0.5
    assert torch.equal(seen["xt"][:k], seen["xt"][:1].expand(k, -1, -1, -1))
    with torch.no_grad():
        ref = teacher.transformer(seen["xt"], seen["t"], class_labels=seen["labels"]).sample
    torch.testing.assert_close(loss, (seen["out"] - ref).square().mean(), rtol=1e-5, atol=0)
    same = train_mod._Objective("shapes-dit", student, 0.5, "v_prediction", "mse",
                                teacher=_dit_teacher_of(student["transformer"]), teacher_labels="all").train()
    assert same(x0, torch.tensor([3, 5]), torch.Generator().manual_seed(2)).item() < 1e-10


def test_teacher_labels_needs_a_teacher_and_a_known_name(tmp_path):
    modules = zoo.build("shapes-dit")
    with pytest.raises(ValueError, match="needs a teacher"):
        train_mod._Objective("shapes-dit", modules, 0.1, None, "mse", teacher_labels="all")
    with pytest.raises(ValueError, match="teacher_labels must be one of"):
        train_mod._Objective("shapes-dit", modules, 0.1, None, "mse", teacher=_dit_teacher_of(modules["transformer"]),
                             teacher_labels="some")
    with pytest.raises(ValueError, match="needs a teacher"):  # refused before any training
        train_mod.train("shapes-dit", steps=1, teacher_labels="all", out=tmp_path / "x.safetensors", progress=False)


def test_a_model_cannot_be_its_own_teacher():
    with pytest.raises(ValueError, match="another built-in diffusion model"):
        train_mod._load_teacher("shapes-dit", "shapes-dit", "cpu")
    with pytest.raises(ValueError, match="another built-in diffusion model"):
        train_mod._load_teacher("shapes-classifier", "shapes-dit", "cpu")


def test_dit_paper_initialisation_starts_every_block_as_the_identity_and_still_learns():
    from vision_eff.zoo.models import build

    torch.manual_seed(0)
    t = build("shapes-dit", init="dit")["transformer"]
    x, ts, y = torch.randn(2, 3, 32, 32), torch.tensor([10, 700]), torch.tensor([1, NUM_CLASSES - 1])
    h = t.pos_embed(x)
    for blk in t.transformer_blocks:  # zero gates: each block returns its input exactly
        assert torch.equal(blk(h, timestep=ts, class_labels=y), h)
    out = t(x, ts, class_labels=y).sample
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    # the scales the paper asks for, against their own formulas
    lin = t.transformer_blocks[0].attn1.to_q
    bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound and not lin.bias.any()
    table = t.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert abs(table.std().item() - 0.02) < 0.004
    # diffusers' default initialisation is not the identity (so the option changes something) ...
    torch.manual_seed(0)
    default = build("shapes-dit")["transformer"]
    assert torch.count_nonzero(default(x, ts, class_labels=y).sample) > 0
    # ... and the zero final layer still gets a gradient, so training moves the output off zero
    loss = (t(x, ts, class_labels=y).sample - 1).square().mean()
    loss.backward()
    assert t.proj_out_2.weight.grad.abs().sum() > 0


def test_dit_initialisation_is_rejected_for_other_models_and_unknown_names():
    from vision_eff.zoo.models import build

    with pytest.raises(ValueError, match="is for the DiT"):
        build("shapes-unet", init="dit")
    with pytest.raises(ValueError, match="init must be one of"):
        build("shapes-dit", init="xavier")


def test_dit_initialisation_goes_to_the_first_stage_of_a_staged_recipe_and_not_with_init_from(tmp_path, monkeypatch):
    _tiny_entry(monkeypatch, "shapes-dit", steps=1, batch_size=2,
                pretrain=[dict(steps=1, lr=1e-4, loss="mse")])
    out = train_mod.train("shapes-dit", out=tmp_path / "d.safetensors", progress=False, save_every=0, init="dit")
    stage0 = weights.read_metadata(tmp_path / "d-stage0.safetensors")
    assert stage0["recipe"]["init"] == "dit" and stage0["init_from"] is None
    assert weights.read_metadata(out)["init_from"] == "d-stage0.safetensors"
    with pytest.raises(ValueError, match="trained from scratch"):
        train_mod.train("shapes-dit", steps=1, init_from=out, out=tmp_path / "e.safetensors", progress=False,
                        init="dit")


def test_a_loss_override_reaches_the_final_stage_only_and_a_bad_one_stops_before_any_stage(tmp_path, monkeypatch):
    _tiny_entry(monkeypatch, "shapes-dit", steps=1, batch_size=2, loss="min_snr5",
                pretrain=[dict(steps=1, lr=1e-4, loss="min_snr2")])
    out = train_mod.train("shapes-dit", out=tmp_path / "d.safetensors", progress=False, save_every=0, loss="mse")
    assert weights.read_metadata(tmp_path / "d-stage0.safetensors")["recipe"]["loss"] == "min_snr2"
    assert weights.read_metadata(out)["recipe"]["loss"] == "mse"
    with pytest.raises(ValueError, match="loss must be 'mse' or 'min_snrG'"):
        train_mod.train("shapes-dit", out=tmp_path / "e.safetensors", progress=False, save_every=0, loss="snr")
    assert not (tmp_path / "e-stage0.safetensors").exists()
    assert train_mod.min_snr_gamma("min_snr2.5") == 2.5 and train_mod.min_snr_gamma("mse") is None


def test_logit_normal_timesteps_follow_the_sd3_density_and_uniform_ones_cover_the_schedule():
    from statistics import NormalDist

    gen = torch.Generator().manual_seed(0)
    n, T = 200_000, SCHEDULE_CONFIG["num_train_timesteps"]
    t = train_mod.sample_timesteps(n, "logit_normal", gen, T)
    assert t.dtype == torch.long and 0 <= t.min() and t.max() < T
    for k in (100, 250, 500, 650, 900):  # P(t < k) = P(sigmoid(z) < k / T) = Phi(logit(k / T))
        p = k / T
        expected = NormalDist().cdf(math.log(p / (1 - p)))
        assert abs((t < k).double().mean().item() - expected) < 0.005, k
    u = train_mod.sample_timesteps(n, "uniform", gen, T)
    assert u.min() == 0 and u.max() == T - 1 and abs((u < 250).double().mean().item() - 0.25) < 0.005
    with pytest.raises(ValueError, match="timestep sampling must be one of"):
        train_mod.sample_timesteps(4, "cosine", gen, T)


def test_the_timestep_sampling_override_reaches_the_objective_and_the_metadata(tmp_path, monkeypatch):
    _tiny_entry(monkeypatch, "shapes-dit", steps=1, batch_size=2, pretrain=[dict(steps=1, lr=1e-4)])
    seen = []
    real = train_mod.sample_timesteps
    monkeypatch.setattr(train_mod, "sample_timesteps", lambda n, s, g, T=1000: seen.append(s) or real(n, s, g, T))
    out = train_mod.train("shapes-dit", out=tmp_path / "d.safetensors", progress=False, save_every=0,
                          timesteps="logit_normal")
    # the pretraining stage keeps the recipe's uniform draws; the override is the final stage's
    assert seen == ["uniform", "logit_normal"]
    assert weights.read_metadata(out)["recipe"]["timesteps"] == "logit_normal"
    assert "timesteps" not in weights.read_metadata(tmp_path / "d-stage0.safetensors")["recipe"]
    with pytest.raises(ValueError, match="timestep sampling must be one of"):
        train_mod.train("shapes-dit", out=tmp_path / "e.safetensors", progress=False, save_every=0, timesteps="x")
