"""The main job (``vision-eff generate``, what ``make demo`` runs).

Generates a class-labelled grid with a built-in model using the fastest configuration the
package has, writes it into ``gallery/``, and prints wall time, FD and class accuracy beside
diffusers' default (the same model with 50-step DPM-Solver++, from the same noise).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ._timing import set_allocator
from .gallery import GALLERY, check_writable, labelled_panels, markdown_table, provenance, update_section
from .zoo import CLASSES, NUM_CLASSES, load_pipeline
from .zoo.pipeline import as_labels

DEFAULT_GUIDANCE = 3.0
REFERENCE_STEPS = 50


@dataclass
class Configuration:
    """How to sample: a scheduler factory, a step count, and techniques to apply."""

    name: str
    steps: int
    make_scheduler: Callable[[Any], Any]  # pipe -> scheduler
    techniques: list = field(default_factory=list)
    note: str = ""


def reference_configuration() -> Configuration:
    from diffusers import DPMSolverMultistepScheduler

    return Configuration(
        "diffusers default (DPM-Solver++ 2M)", REFERENCE_STEPS,
        lambda pipe: DPMSolverMultistepScheduler.from_config(pipe.scheduler.config),
        note="diffusers' DPMSolverMultistepScheduler with its default settings",
    )


# Optimized step schedules for the built-in models (``vision-eff samplers optimize NAME --out ...``).
SCHEDULES = Path(__file__).parent / "zoo" / "schedules"
FAST_STEPS = 8
# StepCache pays at 25-50 steps (notes/results/diffusion.md); at 8 sampler steps every step matters, so
# the preset leaves it off (``vision-eff generate --cache-interval 2`` turns it on).
FAST_CACHE_INTERVAL = 1


def fast_configuration(model: str, steps: int | None = None, cache_interval: int | None = None) -> Configuration:
    """The fastest configuration vision-eff has for a built-in model (see README's feature table).

    Our predictor-corrector multistep sampler on the model's optimized step schedule (when
    ``vision_eff/zoo/schedules/MODEL.json`` has one for this step count, else its default spacing), with
    :class:`~vision_eff.StepCache` computing the deep branch every ``cache_interval`` steps (1 = off), and
    :class:`~vision_eff.ChunkedFeedForward` (same outputs, faster on a CPU; off on a GPU, where it only adds launches).
    """
    import torch

    from .cache import StepCache
    from .layers import ChunkedFeedForward
    from .samplers import PCMultistepScheduler
    from .samplers.schedules import read_schedule_file

    n = steps or FAST_STEPS
    interval = FAST_CACHE_INTERVAL if cache_interval is None else cache_interval
    path = SCHEDULES / f"{model}.json"
    optimized = path.exists() and str(n) in read_schedule_file(str(path)).get("sigmas", {})

    def make(pipe):
        if optimized:
            from .samplers.optimize import use_schedule

            return use_schedule(pipe, str(path))
        return PCMultistepScheduler.from_config(pipe.scheduler.config)

    techniques = [StepCache(interval=interval, warmup=2)] if interval > 1 else []
    cache_note = f" + StepCache (deep branch every {interval} steps after 2 full ones)" if techniques else ""
    if not torch.cuda.is_available():
        techniques.append(ChunkedFeedForward())
        cache_note += " + ChunkedFeedForward"
    return Configuration(
        f"vision-eff fast ({n} steps{', cache ' + str(interval) if interval > 1 else ''})", n, make, techniques,
        note=f"vision-eff PCMultistepScheduler on {'the optimized schedule ' + path.name if optimized else 'its default spacing'}"
             + cache_note,
    )


def balanced_labels(n: int, classes: list[int] | None = None) -> torch.Tensor:
    classes = classes if classes is not None else list(range(NUM_CLASSES))
    return torch.tensor([classes[i % len(classes)] for i in range(n)])


def generate(pipe, config: Configuration, labels: torch.Tensor, seed: int, guidance: float,
             batch_size: int = 64, desc: str | None = None) -> tuple[torch.Tensor, float]:
    """Images in [-1,1] for ``labels`` with ``config``; noise depends only on (seed, batch index).

    Returns the images and the wall time spent in the pipeline calls.
    """
    from ._patching import apply

    pipe.scheduler = config.make_scheduler(pipe)
    handle = apply(pipe, *config.techniques) if config.techniques else None
    batches = [labels[i:i + batch_size] for i in range(0, len(labels), batch_size)]
    bar = tqdm(total=len(batches) * config.steps, desc=desc or config.name, unit="step", leave=False)

    def tick(_pipe, _i, _t, kwargs):
        bar.update(1)
        return kwargs

    out, seconds = [], 0.0
    try:
        for b, lab in enumerate(batches):
            noise = torch.randn((len(lab), *pipe.latent_shape), generator=torch.Generator().manual_seed(seed * 100_003 + b))
            t0 = time.perf_counter()
            img = pipe.decode_latents(pipe(class_labels=lab, num_inference_steps=config.steps, guidance_scale=guidance,
                                           latents=noise, output_type="latent", callback_on_step_end=tick).images)
            seconds += time.perf_counter() - t0
            out.append(img)
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
    return torch.cat(out), seconds


def class_grid(images: torch.Tensor, labels: torch.Tensor, classes: list[int], per_class: int) -> torch.Tensor:
    """Rows of ``per_class`` images for each class (first occurrences in ``images``)."""
    rows = []
    for c in classes:
        idx = (labels == c).nonzero(as_tuple=True)[0][:per_class]
        rows.append(images[idx])
    return torch.cat(rows)


def run(args) -> int:
    from .metrics import Evaluator, psnr, ssim

    classes = sorted(set(as_labels(args.labels).tolist())) if args.labels else list(range(NUM_CLASSES))
    out_dir = check_writable(Path(args.out) if args.out else GALLERY)
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    n = max(args.eval_samples, args.per_class * len(classes))
    labels = balanced_labels(n, classes)
    allocator = set_allocator(getattr(args, "system_allocator", False))
    print(f"allocator: {allocator}")
    pipe = load_pipeline(args.model)
    fast = fast_configuration(args.model, args.steps, getattr(args, "cache_interval", None))
    configs = [fast] if args.no_compare else [reference_configuration(), fast]
    evaluator = Evaluator()
    results, images = [], {}
    for cfg in configs:
        imgs, secs = generate(pipe, cfg, labels, args.seed, guidance)
        images[cfg.name] = imgs
        results.append({"configuration": cfg.name, "model calls": cfg.steps * (2 if guidance > 1 else 1),
                        "wall s": secs, "accuracy": evaluator.accuracy(imgs, labels), "FD": evaluator.fd(imgs)})
    floor = evaluator.fd_floor(n)
    if not args.no_compare:
        ref, fst = images[configs[0].name], images[fast.name]
        results[1]["speed-up"] = results[0]["wall s"] / results[1]["wall s"]
        results[1]["PSNR dB"] = psnr(fst, ref).mean().item()
        results[1]["SSIM"] = ssim(fst, ref).mean().item()
        results[0]["speed-up"] = 1.0
    panels = [(f"{cfg.name}", class_grid(images[cfg.name], labels, classes, args.per_class)) for cfg in configs]
    grid_path = out_dir / f"{args.model}-generate.png"
    labelled_panels(panels, nrow=args.per_class).save(grid_path)
    cols = ["configuration", "model calls", "wall s", "speed-up", "accuracy", "FD", "PSNR dB", "SSIM"]
    table = markdown_table(results, [c for c in cols if any(c in r for r in results)])
    rows_note = ", ".join(f"row {i + 1}: {CLASSES[c]}" for i, c in enumerate(classes))
    section = (f"## Main job: {args.model}\n\n![{args.model} grid]({grid_path.name})\n\n{rows_note}.\n\n{table}\n\n"
               f"{n} images per configuration (class-balanced, guidance {guidance}); FD against the {evaluator.reference_size}-image "
               f"held-out split; real-vs-real FD floor at n={n}: **{floor:.3g}**. "
               f"Fast configuration: {fast.note}. PSNR/SSIM: fast vs diffusers default from the same noise. "
               f"Allocator, for both: {allocator}.\n\n"
               f"Made by {provenance()}.")
    if out_dir.resolve() == GALLERY.resolve():
        update_section(f"generate-{args.model}", section)
    else:
        (out_dir / f"{args.model}-generate.md").write_text(section + "\n")
    print(table)
    print(f"real-vs-real FD floor at n={n}: {floor:.3g}")
    print(f"grid: {grid_path}")
    return 0
