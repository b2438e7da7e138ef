"""Diffusers pipelines for the built-in class-conditional diffusion models.

``ShapesUNetPipeline`` (``pipe.unet`` + ``pipe.label_encoder``, cross-attention on label
tokens, like Stable Diffusion's text conditioning), ``ShapesDiTPipeline``
(``pipe.transformer`` with adaLN label conditioning, like diffusers' DiT) and
``ShapesPixArtPipeline`` (``pipe.transformer`` + ``pipe.label_encoder``: adaLN-single for the
timestep, cross-attention on label tokens, like PixArt-alpha's text conditioning) and
``ShapesLatentDiTPipeline`` (a DiT on the latents of ``pipe.vae``, decoded at the end, like
latent diffusion). All run any
diffusers scheduler: the loop only uses ``set_timesteps``, ``scale_model_input``,
``init_noise_sigma`` and ``step``. Classifier-free guidance runs the unconditional and the
conditional halves in one batch, unconditional first (the Stable Diffusion convention that
tomesd, DeepCache and our caches rely on).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .data import CLASSES, NUM_CLASSES

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def as_labels(class_labels: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Validate class labels: ints in [0, NUM_CLASSES)."""
    if isinstance(class_labels, int):
        class_labels = [class_labels]
    labels = torch.as_tensor(class_labels)
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError("class_labels must be an int or a non-empty 1-D sequence of ints")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be integers, got dtype {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.numel():
        raise ValueError(
            f"class label {int(bad[0])} is out of range: use 0..{NUM_CLASSES - 1} "
            f"({', '.join(f'{i}={c}' for i, c in enumerate(CLASSES))})"
        )
    return labels.long()


class _ShapesPipeline(DiffusionPipeline):
    """Shared sampling loop; subclasses say how the denoiser is called."""

    sample_size = 32  # of the images
    latent_space = False  # True: the denoiser works on an autoencoder's latents (``pipe.vae``)

    @property
    def denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample in the space the model denoises (what ``latents=`` takes)."""
        cfg = self.denoiser.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from what ``output_type="latent"`` gives (pixel models: that already)."""
        return latents.float().clamp(-1, 1)

    def _label_tokens(self, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The cross-attention context of the label-token models (UNet, PixArt)."""
        return self.label_encoder(labels).to(dtype)

    def _step_kwargs(self, generator) -> dict[str, Any]:
        params = inspect.signature(self.scheduler.step).parameters
        return {"generator": generator} if "generator" in params else {}

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
    ):
        """Generate images of the given classes.

        ``output_type``: "pil" (list of PIL images), "np" ([B,H,W,3] in [0,1]), "pt" ([B,3,H,W] in [0,1])
        or "latent" (the model's own space: [B,3,H,W] images in [-1,1] for the pixel models, the scaled
        autoencoder latents for a latent model; ``decode_latents`` turns either into images).
        ``callback_on_step_end(pipe, i, t, {"latents": x})`` runs after each step (diffusers' convention).
        """
        labels = as_labels(class_labels).to(self.device)
        if timesteps is None and sigmas is None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        batch = labels.shape[0]
        dtype = next(self.denoiser.parameters()).dtype
        shape = (batch, *self.latent_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        set_kwargs = {}
        if timesteps is not None:
            set_kwargs["timesteps"] = timesteps
        elif sigmas is not None:
            set_kwargs["sigmas"] = sigmas
        else:
            set_kwargs["num_inference_steps"] = num_inference_steps
        self.scheduler.set_timesteps(device=self.device, **set_kwargs)
        x = latents.to(self.device, dtype) * self.scheduler.init_noise_sigma
        use_cfg = guidance_scale > 1.0
        model_labels = torch.cat([torch.full_like(labels, NUM_CLASSES), labels]) if use_cfg else labels
        step_kwargs = self._step_kwargs(generator)
        ts = self.scheduler.timesteps
        self._num_timesteps = len(ts)
        for i, t in enumerate(self.progress_bar(ts)):
            x_in = torch.cat([x, x]) if use_cfg else x
            x_in = self.scheduler.scale_model_input(x_in, t)
            t_batch = t.to(self.device).expand(x_in.shape[0])
            out = self._denoise(x_in.to(dtype), t_batch, model_labels)
            if use_cfg:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                ret = callback_on_step_end(self, i, t, {"latents": x}) or {}
                x = ret.get("latents", x)
        if output_type == "latent":
            image = x.float() if self.latent_space else self.decode_latents(x)
        else:
            image = (self.decode_latents(x) + 1) / 2
            if output_type in ("np", "pil"):
                image = image.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


class ShapesUNetPipeline(_ShapesPipeline):
    """Stable Diffusion in miniature: a UNet2DConditionModel cross-attending to label tokens."""

    model_cpu_offload_seq = "label_encoder->unet"

    def __init__(self, unet, label_encoder, scheduler):
        super().__init__()
        self.register_modules(unet=unet, label_encoder=label_encoder, scheduler=scheduler)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def _denoise(self, x, t, labels):
        ctx = self._label_tokens(labels, x.dtype)
        class_labels = labels if self.unet.config.num_class_embeds else None
        return self.unet(x, t, encoder_hidden_states=ctx, class_labels=class_labels).sample


class ShapesDiTPipeline(_ShapesPipeline):
    """A class-conditional DiT (diffusers DiTTransformer2DModel, patch 2) on pixels."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def _denoise(self, x, t, labels):
        return self.transformer(x, t, class_labels=labels).sample


class ShapesPixArtPipeline(_ShapesPipeline):
    """PixArt-alpha in miniature: a PixArtTransformer2DModel (patch 2) cross-attending to label tokens."""

    model_cpu_offload_seq = "label_encoder->transformer"

    def __init__(self, transformer, label_encoder, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, label_encoder=label_encoder, scheduler=scheduler)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def _denoise(self, x, t, labels):
        return self.transformer(x, encoder_hidden_states=self._label_tokens(labels, x.dtype), timestep=t).sample


class ShapesSanaPipeline(ShapesPixArtPipeline):
    """Sana in miniature: a SanaTransformer2DModel (patch 2) cross-attending to label tokens, with the label
    also embedded beside the timestep (through the model's ``guidance`` input: ``models.sana_label_scalar``)."""

    def _denoise(self, x, t, labels):
        from .models import sana_label_scalar

        return self.transformer(x, encoder_hidden_states=self._label_tokens(labels, x.dtype), timestep=t,
                                guidance=sana_label_scalar(labels).to(x.device)).sample


class ShapesLatentDiTPipeline(ShapesDiTPipeline):
    """Latent diffusion in miniature: a class-conditional DiT on an AutoencoderKL's scaled latents."""

    model_cpu_offload_seq = "transformer->vae"
    latent_space = True

    def __init__(self, transformer, vae, scheduler):
        _ShapesPipeline.__init__(self)  # ShapesDiTPipeline's would register the modules without the VAE
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents).sample.float().clamp(-1, 1)
