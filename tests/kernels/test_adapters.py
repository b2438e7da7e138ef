"""FastAttention on tiny random-weight diffusers and timm models.

Every attention call must really reach our dispatcher (a recording backend wrapping the exact
PyTorch path counts them); outputs must satisfy the tolerance rule against the float64 model
(error <= 2x the unpatched float32 model's error); remove() must restore bit-exact outputs and
the modules' original attributes.
"""
from __future__ import annotations

import copy

import pytest
import torch

import vision_eff as ve
from vision_eff.kernels import BACKENDS, Backend, FastAttention
from vision_eff.kernels.adapters import attention_modules

torch.set_num_threads(1)


@pytest.fixture
def recording():
    calls = []
    ref = BACKENDS["reference"]

    def run(c):
        calls.append(tuple(c.q.shape))
        return ref.run(c)

    BACKENDS["recording"] = Backend("recording", lambda: None, ref.supports, run, lambda c: 1000)
    yield calls
    del BACKENDS["recording"]


def _unet():
    from diffusers import UNet2DConditionModel

    from vision_eff.zoo.models import UNET_CONFIG

    torch.manual_seed(0)
    model = UNet2DConditionModel(**{**UNET_CONFIG, "sample_size": 8}).eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 4, 64, generator=g)
    return model, lambda m, dt: m(x.to(dt), 10, encoder_hidden_states=ctx.to(dt)).sample


def _dit():
    from diffusers import DiTTransformer2DModel

    from vision_eff.zoo.models import DIT_CONFIG

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**{**DIT_CONFIG, "num_layers": 2, "sample_size": 8}).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, lambda m, dt: m(x.to(dt), timestep=torch.tensor([3, 700]), class_labels=torch.tensor([1, 2])).sample


def _flux():
    """A transformer whose processors go through diffusers' attention dispatcher."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)).eval()
    g = torch.Generator().manual_seed(1)
    hs, ehs = torch.randn(1, 16, 4, generator=g), torch.randn(1, 5, 32, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    ids = torch.stack(grid, -1).reshape(16, 3)
    return model, lambda m, dt: m(hidden_states=hs.to(dt), encoder_hidden_states=ehs.to(dt),
                                  pooled_projections=pooled.to(dt), timestep=torch.tensor([0.5], dtype=dt),
                                  img_ids=ids.to(dt), txt_ids=torch.zeros(5, 3, dtype=dt)).sample


def _vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    model.blocks[1].attn.fused_attn = False  # the adapter must switch timm to its SDPA branch, and back
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, lambda m, dt: m(x.to(dt))


MODELS = {"unet": _unet, "dit": _dit, "flux-dispatcher": _flux, "timm-vit": _vit}


def _snapshot(model):
    """Everything the adapter may touch: instance dicts of attention modules and their processors."""
    snap = {}
    for name, m in attention_modules(model):
        snap[name] = dict(m.__dict__)
        proc = getattr(m, "processor", None)
        if proc is not None:
            snap[name + ".processor"] = dict(getattr(proc, "__dict__", {}))
    return snap


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_attention_matches_sdpa_within_tolerance_and_removes_bit_exactly(name, recording):
    model, run = MODELS[name]()
    with torch.no_grad():
        base = run(model, torch.float32)
        want = run(copy.deepcopy(model).double(), torch.float64)
    before = _snapshot(model)

    handle = ve.apply(model, FastAttention(backend="recording"))
    with torch.no_grad():
        ours = run(model, torch.float32)
    n_modules = len(list(attention_modules(model)))
    assert n_modules > 0 and len(recording) >= n_modules, f"only {len(recording)} calls reached our dispatcher"
    err_sdpa = (base.double() - want).abs().max().item()
    err_ours = (ours.double() - want).abs().max().item()
    eps = torch.finfo(torch.float32).eps * want.abs().max().item()
    assert err_ours <= 2 * err_sdpa + eps, f"{name}: {err_ours:.3g} vs unpatched {err_sdpa:.3g}"

    handle.remove()
    with torch.no_grad():
        after = run(model, torch.float32)
    assert torch.equal(after, base)
    assert _snapshot(model) == before


def test_applying_twice_replaces_and_context_manager_restores(recording):
    model, run = _dit()
    with torch.no_grad():
        base = run(model, torch.float32)
    ve.apply(model, FastAttention(backend="recording"))
    with ve.patched(model, FastAttention(backend="reference")):
        blk = model.transformer_blocks[0].attn1
        # one wrapper only: the second application replaced the first
        assert blk.forward.__wrapped__.__self__ is blk
    with torch.no_grad():
        assert torch.equal(run(model, torch.float32), base)
    assert "forward" not in model.transformer_blocks[0].attn1.__dict__


def test_supports_gives_reasons():
    assert "no diffusers or timm attention" in FastAttention().supports(torch.nn.Linear(2, 2))
    assert "unknown backend" in FastAttention(backend="nope").supports(torch.nn.Linear(2, 2))
    if not torch.cuda.is_available():
        model, _ = _dit()
        assert "unavailable here" in FastAttention(backend="triton").supports(model)
        with pytest.raises(ve.UnsupportedModelError, match="triton"):
            ve.apply(model, FastAttention(backend="triton"))


def test_non_sdpa_processor_is_refused_with_the_fix():
    from diffusers.models.attention_processor import AttnProcessor

    model, _ = _dit()
    model.transformer_blocks[0].attn1.set_processor(AttnProcessor())
    assert "AttnProcessor2_0" in FastAttention().supports(model)


def test_processor_for_diffusers_set_attn_processor(recording):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from vision_eff.kernels.adapters import FastAttnProcessor

    model, run = _unet()
    with torch.no_grad():
        base = run(model, torch.float32)
        model.set_attn_processor(FastAttnProcessor(backend="recording"))
        ours = run(model, torch.float32)
        model.set_attn_processor(AttnProcessor2_0())
    assert len(recording) >= len(list(attention_modules(model)))
    assert torch.allclose(ours, base, atol=1e-5)


def test_patched_model_compiles_fullgraph_through_the_custom_op():
    """TorchFunctionMode redirection and the custom op are both traceable: no graph break."""
    torch._dynamo.reset()
    model, run = _dit()
    with torch.no_grad():
        handle = ve.apply(model, FastAttention(backend="reference"))
        eager = run(model, torch.float32)
        compiled = run(torch.compile(model, fullgraph=True, backend="eager"), torch.float32)
        handle.remove()
    assert torch.allclose(compiled, eager, atol=1e-5)
