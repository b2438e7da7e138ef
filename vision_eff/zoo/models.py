"""Built-in model definitions: the zoo's configs and the small modules around diffusers models.

``ZOO`` maps a model name to a :class:`ZooEntry` (what the model is, how it is built,
how it is trained). Weights live in ``vision_eff/zoo/weights/NAME.safetensors`` and are
produced by ``vision-eff zoo train NAME``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .data import NUM_CLASSES


class LabelEncoder(ModelMixin, ConfigMixin):
    """Class label -> a short sequence of cross-attention tokens (the 'text encoder').

    Index ``NUM_CLASSES`` is the null label used for classifier-free guidance.
    """

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, tokens: int = 4, dim: int = 64):
        super().__init__()
        self.num_classes, self.tokens, self.dim = num_classes, tokens, dim
        self.embed = nn.Embedding(num_classes + 1, tokens * dim)
        nn.init.normal_(self.embed.weight, std=0.5)
        self.norm = nn.LayerNorm(dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        e = self.embed(labels).view(labels.shape[0], self.tokens, self.dim)
        return self.norm(e)


class ShapesClassifier(nn.Module):
    """The evaluator's classifier. ``features()`` is the space the Frechet distance uses."""

    feature_dim = 128

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
            )

        self.body = nn.Sequential(
            block(3, 32), nn.AvgPool2d(2),  # 16
            block(32, 64), nn.AvgPool2d(2),  # 8
            block(64, self.feature_dim),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 32:
            x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


UNET_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64,
    attention_head_dim=1,  # diffusers' legacy name: this is the number of heads (head dim = width)
    norm_num_groups=8,
)
# On top of cross-attention, the label (index NUM_CLASSES = null, for guidance) is also added to the
# timestep embedding, as in ADM: the fast-learning path that makes class conditioning work early.
UNET_CLASS_EMBEDS = NUM_CLASSES + 1

DIT_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3, num_layers=6,
    sample_size=32, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=32,
)


@torch.no_grad()
def init_dit_weights(transformer: nn.Module) -> nn.Module:
    """The initialisation of the DiT paper (Peebles & Xie 2023, sec. 3.2) on a diffusers DiT, in place.

    Diffusers builds ``DiTTransformer2DModel`` with PyTorch's default initialisation, which suits
    loading pretrained weights but not training: its "adaLN-zero" blocks do not start as the identity.
    Here every linear layer is Xavier-uniform with zero bias (the patch projection too, as a linear map
    of the flattened patch); the label tables and the timestep MLPs are N(0, 0.02); and the modulation
    layers that produce each block's shift, scale and gate, the final layer's modulation and the final
    projection are zero, so every block starts as the identity and the model's first output is zero.
    """
    for m in transformer.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = transformer.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in transformer.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        for lin in (emb.timestep_embedder.linear_1, emb.timestep_embedder.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for lin in (transformer.proj_out_1, transformer.proj_out_2):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    return transformer


# PixArt-alpha in miniature: adaLN-single timestep modulation shared by all blocks, and the label reaching
# every block through cross-attention on label tokens (as the UNet's does), not through adaLN alone.
PIXART_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3, num_layers=6,
    sample_size=32, patch_size=2, cross_attention_dim=128, caption_channels=64, norm_type="ada_norm_single",
    use_additional_conditions=False, interpolation_scale=1,
)

# Sana in miniature (Xie et al. 2025): linear attention, a Mix-FFN whose depthwise 3x3 convolution gives the
# transformer a convolution's locality, adaLN-single timestep modulation, and the label twice: as
# cross-attention tokens (as PixArt's) and as a scalar embedded beside the timestep (diffusers' guidance
# embedding, fed ``label * SANA_LABEL_SCALE``: the label-in-timestep path that makes the UNet learn its label).
SANA_CONFIG = dict(
    in_channels=3, out_channels=3, num_attention_heads=4, attention_head_dim=32, num_layers=6,
    num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128, caption_channels=64,
    mlp_ratio=2.5, sample_size=32, patch_size=2, interpolation_scale=1, guidance_embeds=True,
)
SANA_LABEL_SCALE = 100.0  # labels 0..8 (8: the null label) embedded like timesteps 0, 100, ..., 800


def sana_label_scalar(labels: torch.Tensor) -> torch.Tensor:
    """The scalar that carries a label into Sana's timestep embedding (its ``guidance`` input)."""
    return labels.float() * SANA_LABEL_SCALE


# Latent diffusion in miniature: a KL autoencoder (diffusers' AutoencoderKL) that maps 32x32x3 images to
# 16x16x4 latents, and a DiT on those latents (patch 2: 64 tokens of 4x4 pixels each).
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=16, sample_size=32, mid_block_add_attention=False,
)
LATENT_DIT_CONFIG = dict(DIT_CONFIG, in_channels=4, out_channels=4, sample_size=16)

# The noise schedule the diffusion models are trained with (DDPM, linear betas for pixels).
SCHEDULE_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "unet" | "dit" | "pixart" | "sana" | "vae" | "vit" | "vit-mixer" | "classifier"
    description: str
    prediction_type: str | None = None
    train: dict = field(default_factory=dict)  # default training recipe
    vae: str | None = None  # a diffusion model in the latent space of this built-in autoencoder
    rope: bool = False  # a DiT whose self-attention has 2D rotary position embedding (vision_eff.zoo.rope)


ZOO: dict[str, ZooEntry] = {
    "shapes-unet": ZooEntry(
        "shapes-unet", "unet",
        "class-conditional UNet2DConditionModel (SD in miniature: cross-attention on label tokens, "
        "self-attention at 32x32 and 16x16, label also in the timestep embedding), 32x32 RGB, v prediction "
        "(staged: epsilon pretraining, then v prediction, then Min-SNR-weighted v prediction)",
        prediction_type="v_prediction",
        # stages run in order, each initialised from the one before; the last is the recipe itself
        train=dict(steps=2200, batch_size=32, lr=5e-4, seed=0, label_dropout=0.1, ema=0.998, bf16=True,
                   loss="min_snr5",
                   pretrain=[dict(prediction_type="epsilon", steps=2400, lr=7e-4, batch_size=16, ema=0.995,
                                  class_embed=False, loss="mse"),
                             dict(prediction_type="v_prediction", steps=600, lr=3e-4, batch_size=16, ema=0.995,
                                  class_embed=False, loss="mse")]),
    ),
    "shapes-dit": ZooEntry(
        "shapes-dit", "dit",
        "class-conditional DiTTransformer2DModel (patch 2, 256 tokens, adaLN-zero), 32x32 RGB, v prediction",
        prediction_type="v_prediction",
        train=dict(steps=3200, batch_size=32, lr=6e-4, seed=0, label_dropout=0.1, ema=0.998, bf16=True,
                   loss="min_snr5",
                   pretrain=[dict(steps=2000, lr=1e-3, loss="mse")]),
    ),
    "shapes-dit-rope": ZooEntry(
        "shapes-dit-rope", "dit",
        "shapes-dit with 2D rotary position embedding in its self-attention (RoPE2DAttnProcessor, no extra "
        "weights: attention scores depend on the offset between tokens), 32x32 RGB, v prediction",
        prediction_type="v_prediction",
        train=dict(steps=16000, batch_size=16, lr=8e-4, seed=0, label_dropout=0.1, ema=0.998, bf16=True,
                   loss="min_snr5", shared_label_dropout=True),
        rope=True,
    ),
    "shapes-pixart": ZooEntry(
        "shapes-pixart", "pixart",
        "class-conditional PixArtTransformer2DModel (patch 2, 256 tokens, adaLN-single, cross-attention on "
        "label tokens), 32x32 RGB, v prediction",
        prediction_type="v_prediction",
        train=dict(steps=3600, batch_size=32, lr=1e-3, seed=0, label_dropout=0.1, ema=0.998, bf16=True,
                   loss="min_snr5"),
    ),
    "shapes-sana": ZooEntry(
        "shapes-sana", "sana",
        "class-conditional SanaTransformer2DModel (patch 2, 256 tokens, linear attention, Mix-FFN with a "
        "depthwise conv, cross-attention on label tokens, label also beside the timestep), 32x32 RGB, v prediction",
        prediction_type="v_prediction",
        train=dict(steps=10000, batch_size=16, lr=8e-4, seed=0, label_dropout=0.1, ema=0.998, bf16=True,
                   loss="min_snr5"),
    ),
    "shapes-vae": ZooEntry(
        "shapes-vae", "vae",
        "KL autoencoder (diffusers AutoencoderKL, widths 32/64, no attention): 32x32x3 images <-> 16x16x4 "
        "latents, L1 + L2 reconstruction with a light KL term; its latent scaling factor is in the weights",
        train=dict(steps=1500, batch_size=32, lr=1e-3, seed=0, kl_weight=1e-7, bf16=True),
    ),
    "shapes-latent-dit": ZooEntry(
        "shapes-latent-dit", "dit",
        "class-conditional DiTTransformer2DModel in shapes-vae's latent space (16x16x4 latents, patch 2, 64 "
        "tokens, adaLN-zero, labels dropped once per sample), v prediction; decoded by shapes-vae",
        prediction_type="v_prediction",
        train=dict(steps=10000, batch_size=32, lr=1e-3, seed=0, label_dropout=0.1, ema=0.998, bf16=True,
                   loss="mse", shared_label_dropout=True),
        vae="shapes-vae",
    ),
    "shapes-vit": ZooEntry(
        "shapes-vit", "vit",
        "timm VisionTransformer classifier for token merging: 64x64 input, stride-4 conv stem (256 patch tokens "
        "+ class), depth 6, width 128 (trained by vision_eff.vit.builtin.train_vit)",
    ),
    "shapes-vit-poolmixer": ZooEntry(
        "shapes-vit-poolmixer", "vit-mixer",
        "pooling token mixers for blocks 0 and 1 of shapes-vit (MixerSwap), recovered by distillation from "
        "its attention blocks and from its class probabilities through the frozen later blocks "
        "(trained by vision_eff.vit.recover.recover_mixer)",
        train=dict(steps=300, batch_size=64, lr=1e-3, seed=0, kd=1.0, temperature=2.0),
    ),
    "shapes-classifier": ZooEntry(
        "shapes-classifier", "classifier",
        "the evaluator: a 7-layer CNN classifier whose 128-d pooled features define FD",
        train=dict(steps=2000, batch_size=64, lr=2e-3, seed=0),
    ),
}


DIFFUSION_KINDS = ("unet", "dit", "pixart", "sana")


def diffusion_models(packaged: bool = False) -> list[str]:
    """The names of the built-in diffusion models (those with a pipeline); with ``packaged``, only those
    whose weights ship with the package (the others load after ``vision-eff zoo train NAME``)."""
    from .weights import weights_path

    return [n for n, e in ZOO.items() if e.kind in DIFFUSION_KINDS and (not packaged or weights_path(n).exists())]


def entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise KeyError(f"unknown model {name!r}; built-in models are: {', '.join(ZOO)}")
    return ZOO[name]


DIT_INITS = ("diffusers", "dit")


def build(name: str, class_embed: bool = True, init: str = "diffusers") -> dict[str, nn.Module]:
    """Fresh (untrained) modules of a zoo model, keyed by component name.

    ``class_embed=False`` builds the UNet without the label-in-timestep embedding (its early
    training stages); the embedding is zero-initialised, so adding it leaves the model unchanged.
    ``init="dit"`` gives the DiT the DiT paper's initialisation (:func:`init_dit_weights`) instead of
    diffusers' default one.
    """
    e = entry(name)
    if init not in DIT_INITS:
        raise ValueError(f"init must be one of {DIT_INITS}, got {init!r}")
    if init != "diffusers" and e.kind != "dit":
        raise ValueError(f"init={init!r} is for the DiT (shapes-dit), not {name!r}")
    if e.kind == "unet":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**UNET_CONFIG, num_class_embeds=UNET_CLASS_EMBEDS if class_embed else None)
        if class_embed:
            nn.init.zeros_(unet.class_embedding.weight)
        return {"unet": unet, "label_encoder": LabelEncoder(dim=UNET_CONFIG["cross_attention_dim"])}
    if e.kind == "pixart":
        from diffusers import PixArtTransformer2DModel

        return {"transformer": PixArtTransformer2DModel(**PIXART_CONFIG),
                "label_encoder": LabelEncoder(dim=PIXART_CONFIG["caption_channels"])}
    if e.kind == "sana":
        from diffusers import SanaTransformer2DModel

        return {"transformer": SanaTransformer2DModel(**SANA_CONFIG),
                "label_encoder": LabelEncoder(dim=SANA_CONFIG["caption_channels"])}
    if e.kind == "vae":
        from diffusers import AutoencoderKL

        return {"vae": AutoencoderKL(**VAE_CONFIG)}
    if e.kind == "dit":
        from diffusers import DiTTransformer2DModel

        config = LATENT_DIT_CONFIG if e.vae else DIT_CONFIG
        transformer = DiTTransformer2DModel(**config)
        if e.rope:
            from .rope import install_rope

            install_rope(transformer, grid=config["sample_size"] // config["patch_size"])
        return {"transformer": init_dit_weights(transformer) if init == "dit" else transformer}
    if e.kind == "vit":
        from ..vit.builtin import build_vit

        return {"vit": build_vit()}
    if e.kind == "vit-mixer":
        from ..vit.builtin import build_vit
        from ..vit.mixer import MixerSwap

        return {f"blocks.{i}": blk for i, blk in MixerSwap(blocks=(0, 1)).build_blocks(build_vit()).items()}
    return {"classifier": ShapesClassifier()}
