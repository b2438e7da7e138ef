"""``vision-eff bench zoo`` (= ``vision-eff zoo eval``): quality of the built-in models.

For each diffusion model: class accuracy and FD of images from diffusers' default 50-step
DPM-Solver++ with classifier-free guidance, beside the real-vs-real FD floor at the same
sample count; for the classifier: accuracy on the held-out split. Writes the table into the
gallery page (section ``zoo``) with a sample grid per model.
"""
from __future__ import annotations

import argparse

import torch

from ..gallery import GALLERY, image_grid, markdown_table, provenance, update_section
from . import ZOO, diffusion_models, model_info


def main(argv: list[str] | None = None) -> int:
    from ..main_job import balanced_labels, class_grid, generate, reference_configuration
    from ..metrics import Evaluator
    from . import data

    p = argparse.ArgumentParser(prog="vision-eff bench zoo", description=__doc__.split("\n\n")[1])
    p.add_argument("--samples", type=int, default=256, help="generated images per model (class-balanced)")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0], help="guidance scales to evaluate")
    p.add_argument("--models", nargs="+", default=diffusion_models(packaged=True),
                   choices=diffusion_models())
    p.add_argument("--seed", type=int, default=1, help="noise seed (the demo uses 0)")
    p.add_argument("--no-gallery", action="store_true")
    args = p.parse_args(argv)
    if args.samples < 16:
        p.error("--samples must be >= 16")
    from . import load_pipeline

    ev = Evaluator()
    x, y = data.eval_split(32)
    rows = [{"model": "shapes-classifier", "setting": "held-out split", "n": len(y),
             "accuracy": ev.accuracy(x, y), "FD": float("nan"), "FD floor": float("nan"),
             "train s": model_info("shapes-classifier").get("train_seconds", "")}]
    floor = ev.fd_floor(args.samples)
    labels = balanced_labels(args.samples)
    grids = []
    for name in args.models:
        pipe = load_pipeline(name)
        for g in args.guidance:
            imgs, secs = generate(pipe, reference_configuration(), labels, args.seed, g, desc=f"{name} cfg={g}")
            rows.append({"model": name, "setting": f"DPM-Solver++ 50 steps, guidance {g}", "n": args.samples,
                         "accuracy": ev.accuracy(imgs, labels), "FD": ev.fd(imgs), "FD floor": floor,
                         "train s": model_info(name).get("train_seconds", ""), "sample s": round(secs, 1)})
            print(rows[-1])
        grids.append((name, class_grid(imgs, labels, list(range(8)), 8)))
    table = markdown_table(rows, ["model", "setting", "n", "accuracy", "FD", "FD floor", "train s", "sample s"])
    print(table)
    if not args.no_gallery:
        parts = [f"## Built-in models\n\n{table}\n\nFD: classifier features, against the 2048-image held-out split; "
                 f"FD floor: real training images vs the same split at the same n. Made by {provenance()}.\n"]
        for name, g in grids:
            image_grid(g, 8, scale=3).save(GALLERY / f"zoo-{name}.png")
            parts.append(f"![{name}](zoo-{name}.png)  \n{name}: one row per class (circle, square, triangle, star, "
                         f"ring, cross, crescent, heart), last guidance scale above.\n")
        update_section("zoo", "\n".join(parts))
    return 0
