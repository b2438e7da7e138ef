"""The built-in zoo: procedurally generated data, small trained models, their pipelines.

    pipe = vision_eff.zoo.load_pipeline("shapes-unet")
    images = pipe(class_labels=[0, 3], num_inference_steps=20, generator=torch.manual_seed(0)).images
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .data import CLASSES, NUM_CLASSES, ShapesDataset
from .models import DIFFUSION_KINDS, SCHEDULE_CONFIG, ZOO, ZooEntry, build, diffusion_models, entry
from .weights import WeightsError, load_into, read_metadata, weights_path

__all__ = ["CLASSES", "DIFFUSION_KINDS", "NUM_CLASSES", "ShapesDataset", "ZOO", "ZooEntry", "diffusion_models", "WeightsError", "load_model",
           "load_pipeline", "default_scheduler", "model_info", "SCHEDULE_CONFIG"]


def model_info(name: str) -> dict:
    """The training record stored in a model's weights file (empty when not trained yet)."""
    path = weights_path(entry(name).name)
    return read_metadata(path) if path.exists() else {}


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               weights: str | Path | None = None) -> dict[str, nn.Module]:
    """A zoo model's trained components (eval mode), keyed by component name; offline, safetensors only.

    ``weights``: a weights file of this model other than the packaged one (e.g. a checkpoint that
    ``vision-eff zoo train NAME --out ... --keep-checkpoints`` wrote).
    """
    e = entry(name)
    modules = build(e.name)
    meta = load_into(modules, weights_path(e.name) if weights is None else weights, e.name)
    if e.kind == "vae":
        if "scaling_factor" not in meta:
            raise WeightsError(f"the {name!r} weights carry no latent scaling factor; retrain them with "
                               f"`vision-eff zoo train {name}`")
        modules["vae"].register_to_config(scaling_factor=float(meta["scaling_factor"]))
    for m in modules.values():
        m.to(device=device)
        if dtype != torch.float32:
            m.to(dtype=dtype)
        m.eval().requires_grad_(False)
    return modules


def default_scheduler(name: str):
    """diffusers' default DPM-Solver++ (2M) for a zoo model's noise schedule and prediction type."""
    from diffusers import DPMSolverMultistepScheduler

    e = entry(name)
    if e.prediction_type is None:
        raise ValueError(f"{name!r} is not a diffusion model")
    return DPMSolverMultistepScheduler(**SCHEDULE_CONFIG, prediction_type=e.prediction_type)


def load_pipeline(name: str, scheduler=None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  weights: str | Path | None = None):
    """A diffusers pipeline for a built-in diffusion model (``shapes-unet``, ``shapes-dit``, ``shapes-pixart``,
    ``shapes-sana``, ``shapes-latent-dit``: a DiT in ``shapes-vae``'s latent space, decoded by it).

    ``scheduler`` defaults to diffusers' DPM-Solver++ multistep; any diffusers scheduler built with
    ``Scheduler.from_config(pipe.scheduler.config)`` can be swapped in afterwards. ``weights``: as in
    :func:`load_model`.
    """
    from .pipeline import (ShapesDiTPipeline, ShapesLatentDiTPipeline, ShapesPixArtPipeline, ShapesSanaPipeline,
                           ShapesUNetPipeline)

    e = entry(name)
    if e.kind not in DIFFUSION_KINDS:
        raise ValueError(f"{name!r} is a {e.kind}, not a diffusion model; pipelines exist for "
                         f"{', '.join(diffusion_models())}")
    modules = load_model(name, device=device, dtype=dtype, weights=weights)
    scheduler = scheduler if scheduler is not None else default_scheduler(name)
    if e.kind == "unet":
        pipe = ShapesUNetPipeline(unet=modules["unet"], label_encoder=modules["label_encoder"], scheduler=scheduler)
    elif e.kind in ("pixart", "sana"):
        cls = ShapesPixArtPipeline if e.kind == "pixart" else ShapesSanaPipeline
        pipe = cls(transformer=modules["transformer"], label_encoder=modules["label_encoder"], scheduler=scheduler)
    elif e.vae:
        pipe = ShapesLatentDiTPipeline(transformer=modules["transformer"], vae=_matching_vae(e, weights, device, dtype),
                                       scheduler=scheduler)
    else:
        pipe = ShapesDiTPipeline(transformer=modules["transformer"], scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _matching_vae(e: ZooEntry, weights, device, dtype) -> nn.Module:
    """The autoencoder of a latent model, checked to be the one the model was trained on."""
    from ..samplers.schedules import model_fingerprint

    vae = load_model(e.vae, device=device, dtype=dtype)["vae"]
    trained_on = read_metadata(weights_path(e.name) if weights is None else weights).get("vae_fingerprint")
    # (the fingerprint hashes float32 values: in another dtype it is checked at float32 only)
    if dtype == torch.float32 and trained_on is not None and trained_on != model_fingerprint(vae):
        raise WeightsError(f"{e.name!r} was trained in the latent space of other {e.vae!r} weights than the "
                           f"packaged ones; retrain it with `vision-eff zoo train {e.name}`")
    return vae
