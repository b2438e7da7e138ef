"""Tiny random-weight diffusers denoisers (and their call arguments) shared by the cache and token tests."""
from __future__ import annotations

import torch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sd_unet(channels: int = 3):
    """SD1.x/2.x's layout in miniature: attention at the first two levels (16x16 and 8x8 for 16x16 inputs)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16, 16), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=8,
    ).eval()


def dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
                                 num_layers=3, sample_size=16, patch_size=2, num_embeds_ada_norm=8,
                                 norm_num_groups=4).eval()


def pipelines(kind: str, scheduler=None):
    """The zoo's pipeline around a tiny random model, at 16x16 pixels."""
    from vision_eff.zoo import default_scheduler
    from vision_eff.zoo.models import LabelEncoder
    from vision_eff.zoo.pipeline import ShapesDiTPipeline, ShapesUNetPipeline

    if kind == "unet":
        torch.manual_seed(1)
        pipe = ShapesUNetPipeline(sd_unet(), LabelEncoder(dim=16).eval(), scheduler or default_scheduler("shapes-unet"))
    else:
        pipe = ShapesDiTPipeline(dit(), scheduler or default_scheduler("shapes-dit"))
    pipe.sample_size = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_unet():
    """SDXL's layout in miniature: no attention at the first level, attention at the second and third."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
    ).eval()


def unet_inputs(batch: int = 2, size: int = 16, seed: int = 0) -> dict:
    g = _gen(seed)
    return dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(batch, 3, 16, generator=g))


def pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=16,
        patch_size=2, cross_attention_dim=16, caption_channels=16, norm_num_groups=4,
        use_additional_conditions=False).eval()


def pixart_inputs(batch: int = 2, seed: int = 0) -> dict:
    g = _gen(seed)
    return dict(hidden_states=torch.randn(batch, 4, 16, 16, generator=g), timestep=torch.tensor([500] * batch),
                encoder_hidden_states=torch.randn(batch, 3, 16, generator=g),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,)).eval()


def sd3_inputs(batch: int = 2, seed: int = 0) -> dict:
    g = _gen(seed)
    return dict(hidden_states=torch.randn(batch, 4, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 3, 16, generator=g),
                pooled_projections=torch.randn(batch, 8, generator=g), timestep=torch.tensor([500] * batch))


def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()


def flux_inputs(batch: int = 2, side: int = 8, seed: int = 0) -> dict:
    g = _gen(seed)
    n = side * side
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1] = torch.arange(side).repeat_interleave(side)
    img_ids[:, 2] = torch.arange(side).repeat(side)
    return dict(hidden_states=torch.randn(batch, n, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 3, 16, generator=g),
                pooled_projections=torch.randn(batch, 8, generator=g), timestep=torch.tensor([0.5] * batch),
                img_ids=img_ids, txt_ids=torch.zeros(3, 3))


def subset(kwargs: dict, rows: slice) -> dict:
    """The same inputs for a sub-batch (per-sample tensors sliced; shared ones kept)."""
    batch = next(v.shape[0] for k, v in kwargs.items() if k in ("sample", "hidden_states"))
    out = {}
    for k, v in kwargs.items():
        if torch.is_tensor(v) and v.dim() and v.shape[0] == batch and k not in ("img_ids", "txt_ids"):
            out[k] = v[rows]
        else:
            out[k] = v
    return out


def output(model, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


ALL = {
    "sdxl-unet": (sdxl_unet, unet_inputs),
    "pixart": (pixart, pixart_inputs),
    "sd3": (sd3, sd3_inputs),
    "flux": (flux, flux_inputs),
}
