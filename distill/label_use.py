"""Study: how much does a built-in diffusion model use its class label?

For held-out images x0 noised to x_t at a few timesteps (the same noise for every model), the model's
estimate of x0 is scored three times: with the true label, with a wrong label (a random other class)
and with the null label that classifier-free guidance uses. A model that draws the class it is asked
for has a clearly larger error with the wrong label; a model whose three errors are equal ignores the
label, and guidance (which amplifies the difference between the conditional and the null prediction)
has nothing to amplify.

    python distill/label_use.py --weights runs/dit-scratch/*/shapes-dit.safetensors \
        --out distill/results/label-use.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

MODELS = ("shapes-dit", "shapes-dit-rope", "shapes-pixart", "shapes-sana")


def x0_errors(pipe, x0: torch.Tensor, labels: torch.Tensor, t: int, noise: torch.Tensor,
              alphas_cumprod: torch.Tensor, others: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean squared error of the model's x0 estimate at timestep ``t`` for each labelling."""
    from vision_eff.zoo.train import convert_prediction

    a = alphas_cumprod[t].view(1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    tt = torch.full((x0.shape[0],), t)
    kind = pipe.scheduler.config.prediction_type
    out = {}
    with torch.no_grad():
        for what, lab in {"true": labels, **others}.items():
            pred = pipe._denoise(xt, tt, lab).float()
            out[what] = (convert_prediction(pred, xt, a, kind, "sample") - x0).square().mean().item()
    return out


def main(argv: list[str] | None = None) -> int:
    from diffusers import DDPMScheduler

    from vision_eff.gallery import command_line, markdown_table, provenance
    from vision_eff.zoo import data, load_pipeline
    from vision_eff.zoo.models import NUM_CLASSES, SCHEDULE_CONFIG
    from vision_eff.zoo.weights import read_metadata, weights_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-dit", choices=MODELS, help="the model the --weights files are of")
    p.add_argument("--weights", nargs="*", type=Path, default=[],
                   help="further weights files of --model (a file whose metadata names another of these models is "
                        "scored as that one)")
    p.add_argument("--images", type=int, default=256, help="held-out images")
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 200, 350, 500, 800])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the table here (Markdown)")
    args = p.parse_args(argv)
    missing = [str(w) for w in args.weights if not w.is_file()]
    if missing:
        p.error(f"no weights file at {', '.join(missing)}")
    if any(not 0 <= t < SCHEDULE_CONFIG["num_train_timesteps"] for t in args.timesteps):
        p.error(f"--timesteps must be in [0, {SCHEDULE_CONFIG['num_train_timesteps']})")
    if args.threads:
        torch.set_num_threads(args.threads)
    x0, labels = data.eval_split(32, args.images)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen)
    wrong = (labels + 1 + torch.randint(0, NUM_CLASSES - 1, labels.shape, generator=gen)) % NUM_CLASSES
    others = {"wrong": wrong, "null": torch.full_like(labels, NUM_CLASSES)}
    alphas = DDPMScheduler(**SCHEDULE_CONFIG).alphas_cumprod.float()
    rows = []
    models = [("shapes-unet (packaged)", "shapes-unet", None), ("shapes-dit (packaged)", "shapes-dit", None)]
    if args.model != "shapes-dit" and weights_path(args.model).exists():
        models.append((f"{args.model} (packaged)", args.model, None))
    for w in args.weights:
        name = read_metadata(w).get("model", args.model)
        if name not in MODELS:
            p.error(f"{w} holds weights of {name!r}; this study scores {', '.join(MODELS)}")
        models.append((f"`{w.parent.name}/{w.name}`", name, w))
    for what, name, path in models:
        pipe = load_pipeline(name, weights=path)
        for t in args.timesteps:
            e = x0_errors(pipe, x0, labels, t, noise, alphas, others)
            rows.append({"model": what, "t": t, "x0 MSE true label": e["true"], "wrong label": e["wrong"],
                         "null label": e["null"], "wrong / true": e["wrong"] / e["true"]})
            print(rows[-1], flush=True)
    table = markdown_table(rows, list(rows[0]), floatfmt=".4g")
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# How much each built-in diffusion model uses its class label\n\n"
            f"Made by {provenance(command_line('python distill/label_use.py', argv))}.\n\n"
            f"{args.images} held-out images (32x32), noised to each timestep with the same noise "
            f"for every model; the model's x0 estimate scored with the true label, a random other class and the null "
            f"(guidance) label. `wrong / true` near 1 means the model ignores its label.\n\n{table}\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
