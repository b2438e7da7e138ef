"""Study: the built-in DiT distilled from the built-in UNet (or trained further with REPA), quality against steps.

Evaluates weights files of ``shapes-dit`` (checkpoints that ``vision-eff zoo train shapes-dit
--teacher shapes-unet --keep-checkpoints`` wrote; see ``recipes/shapes-dit-from-unet.sh``), or of
``shapes-pixart`` with ``--model shapes-pixart`` (``recipes/shapes-pixart.sh``), or of ``shapes-sana`` with
``--model shapes-sana``, or of the DiT in
``shapes-vae``'s latent space with ``--model shapes-latent-dit`` (``recipes/shapes-latent-dit.sh``), or of the UNet
with ``--model shapes-unet`` (``recipes/shapes-unet-one-hour.sh``: then the packaged UNet is the only reference), beside the packaged
DiT (and the packaged PixArt once there is one) and the teacher, in one run, with the evaluator the zoo's quality bar uses:
diffusers' default 50-step DPM-Solver++, classifier-free guidance, class-balanced labels, the
same noise for every row; class accuracy and FD against the held-out split, and the real-vs-real
FD floor at the same sample count.

    python distill/dit_from_unet.py --checkpoints /tmp/kd/shapes-dit.step*.safetensors \
        --out distill/results/shapes-dit-from-unet.md --gallery
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

MODELS = ("shapes-dit", "shapes-dit-rope", "shapes-pixart", "shapes-sana", "shapes-latent-dit", "shapes-unet")


def _steps(meta: dict) -> tuple[int, int, int, float]:
    """(steps on the data alone, steps distilled from a teacher, steps with REPA alignment, training
    seconds), over the whole history."""
    plain = kd = repa = 0
    secs = 0.0
    for rec in [*(meta.get("history") or []), meta]:
        steps = int(rec.get("steps_done") or 0)
        recipe = rec.get("recipe") or {}
        if recipe.get("teacher"):
            kd += steps
        elif recipe.get("repa"):
            repa += steps
        else:
            plain += steps
        secs += float(rec.get("train_seconds") or 0.0)
    return plain, kd, repa, secs


def _start(meta: dict) -> str:
    """How the run that started the weights' history was set up: its initialisation and label dropout."""
    first = ([*(meta.get("history") or []), meta])[0].get("recipe") or {}
    return f"{first.get('init', 'diffusers')} init, {'shared' if first.get('shared_label_dropout') else 'per-block'} dropout"


def main(argv: list[str] | None = None) -> int:
    from vision_eff.gallery import GALLERY, command_line, labelled_panels, markdown_table, provenance, update_section
    from vision_eff.main_job import balanced_labels, class_grid, generate, reference_configuration
    from vision_eff.metrics import Evaluator
    from vision_eff.zoo import entry, load_pipeline, model_info
    from vision_eff.zoo.weights import read_metadata, weights_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-dit", choices=MODELS, help="the model the checkpoints are of")
    p.add_argument("--checkpoints", nargs="+", type=Path, required=True,
                   help="weights files of --model (a file whose metadata names another of these models is scored as that one)")
    p.add_argument("--samples", type=int, default=64, help="generated images per row (class-balanced)")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0],
                   help="classifier-free guidance scale(s); with several, every weights file is measured at each")
    p.add_argument("--skip-references", action="store_true",
                   help="leave out the teacher and packaged-DiT rows (the packaged --model row stays; for "
                        "shapes-unet it is the teacher row, so it goes too)")
    p.add_argument("--seed", type=int, default=1, help="noise seed (as `vision-eff bench zoo`)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the table here (Markdown)")
    p.add_argument("--title", default="shapes-dit distilled from shapes-unet", help="the table file's heading")
    p.add_argument("--gallery", action="store_true",
                   help="also put the images side by side (teacher, packaged DiT, last checkpoint of each folder) "
                        "in the gallery page")
    p.add_argument("--gallery-name", default=None, metavar="NAME",
                   help="with --gallery: the page section and image file name (default: distill-MODEL), so that "
                        "one study does not replace another's picture")
    args = p.parse_args(argv)
    if args.gallery_name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", args.gallery_name):
        p.error(f"--gallery-name {args.gallery_name!r}: use lower-case letters, digits and dashes (e.g. distill-dit-batch)")
    missing = [str(c) for c in args.checkpoints if not c.is_file()]
    if missing:
        p.error(f"no weights file at {', '.join(missing)}")
    if args.samples < 16:
        p.error("--samples must be >= 16")
    if any(g < 1.0 for g in args.guidance):
        p.error("--guidance must be >= 1 (1 is no guidance)")
    if args.threads:
        torch.set_num_threads(args.threads)

    ev = Evaluator()
    labels = balanced_labels(args.samples)
    floor = ev.fd_floor(args.samples)
    runs = []
    if not args.skip_references:
        runs.append(("teacher: shapes-unet (packaged)", "shapes-unet", None, model_info("shapes-unet")))
        if args.model not in ("shapes-dit", "shapes-unet"):
            runs.append(("shapes-dit (packaged)", "shapes-dit", None, model_info("shapes-dit")))
    # the packaged --model row, the peer of its checkpoints (for shapes-unet that is the teacher row)
    if args.model != "shapes-unet" and weights_path(args.model).exists():
        runs.append((f"{args.model} (packaged)", args.model, None, model_info(args.model)))
    for c in args.checkpoints:  # in the order given, each as the model its metadata names
        meta = read_metadata(c)
        if meta.get("model", args.model) not in MODELS:
            p.error(f"{c} holds weights of {meta['model']!r}; this study scores {', '.join(MODELS)}")
        runs.append((str(c), meta.get("model", args.model), c, meta))
    sweep = len(args.guidance) > 1
    rows, panels = [], []  # panel k is of runs[k // len(args.guidance)]
    per = min(8, args.samples // 8)  # images per class in the gallery grids
    for what, name, path, meta in runs:
        pipe = load_pipeline(name, weights=path)  # once per weights file, for every guidance scale
        student = path is not None or name != "shapes-unet"
        plain, kd, repa, train_s = _steps(meta) if student else ("", "", "", None)  # the teacher's: README
        label = what if path is None else f"`{path.parent.name}/{path.name}`"
        short = {"shapes-unet": "UNet", "shapes-dit": "DiT", "shapes-dit-rope": "DiT-RoPE", "shapes-pixart": "PixArt", "shapes-sana": "Sana",
                 "shapes-latent-dit": "latent DiT"}[name]
        caption = ("teacher (UNet)" if name == "shapes-unet" else f"{short} (packaged)" if path is None
                   else f"{short}, {plain + kd + repa} steps, {kd} distilled ({path.parent.name})")
        for guidance in args.guidance:
            imgs, secs = generate(pipe, reference_configuration(), labels, args.seed, guidance, desc=Path(what).name)
            rows.append({"weights": label, "start": _start(meta) if entry(name).kind == "dit" else "",  # (DiT options)
                         "steps (no teacher)": plain, "steps distilled": kd, "steps with REPA": repa, "train min": "" if train_s is None else round(train_s / 60),
                         "batch": (meta.get("recipe") or {}).get("batch_size", "") if student else "",
                         **({"guidance": guidance} if sweep else {}), "accuracy": ev.accuracy(imgs, labels),
                         "FD": ev.fd(imgs), "FD floor": floor, "sample s": round(secs, 1)})
            print(rows[-1], flush=True)
            title = caption + (f", guidance {guidance:g}" if sweep else "")
            panels.append((f"{title}: {rows[-1]['accuracy']:.0%}", class_grid(imgs, labels, list(range(8)), per)))
    table = markdown_table(rows, list(rows[0]))
    print(table)
    made_by = provenance(command_line("python distill/dit_from_unet.py", argv))
    if args.gallery:  # teacher, packaged DiT, then the last checkpoint of each run (folder)
        shown_runs = [runs[k // len(args.guidance)] for k in range(len(panels))]
        packaged = [k for k, (_w, _n, path, _m) in enumerate(shown_runs) if path is None]
        last = {Path(what).parent: k for k, (what, _n, path, _m) in enumerate(shown_runs) if path is not None}
        shown = [panels[k] for k in packaged] + [panels[k] for k in last.values()]
        section = args.gallery_name or f"distill-{args.model}"
        image = f"{section}.png"
        labelled_panels(shown, per, scale=2).save(GALLERY / image)
        table_at = f" Table: `{args.out}`." if args.out is not None else ""
        update_section(section, f"## {args.title}\n\n"
                       f"![{args.model}]({image})  \nOne row per class (circle, square, triangle, star, "
                       f"ring, cross, crescent, heart); class accuracy over all {args.samples} images in each caption. "
                       f"Made by {made_by}.{table_at}\n")
    if args.out is not None:
        text = (f"# {args.title}\n\n"
                f"Made by {made_by}.\n\n"
                f"n={args.samples} class-balanced images per row, diffusers' DPM-Solver++ 2M, 50 steps, guidance "
                f"{', '.join(f'{g:g}' for g in args.guidance)}, noise seed {args.seed} (the same noise for every row); accuracy: the evaluator's "
                f"class for the label asked for; FD: evaluator features against the held-out split; FD floor: real "
                f"images against the same split at the same n. Steps and minutes count every stage in the weights' "
                f"history; batch: the last stage's batch size. Packaged weights: as committed.\n\n"
                f"{table}\n")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
