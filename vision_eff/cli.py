"""The ``vision-eff`` command.

    vision-eff generate            the main job: a labelled grid from the built-in UNet with the fastest
                                   configuration, compared with diffusers' 50-step default (same noise)
    vision-eff bench NAME ...      benchmarks (samplers, attention, vit, diffusion, zoo)
    vision-eff zoo list|train|eval the built-in models
    vision-eff samplers ...        sampler tools (schedule optimization)

Bad input gets one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ._timing import add_allocator_option, set_allocator

# `vision-eff bench NAME args...` -> module.main(args)
BENCHES = {
    "samplers": ("vision_eff.samplers.bench", "fast ODE samplers vs diffusers' schedulers (oracle + built-in models)"),
    "attention": ("vision_eff.kernels.bench", "attention kernels vs SDPA backends (GPU)"),
    "vit": ("vision_eff.vit.bench", "token merging / pruning on timm ViTs"),
    "diffusion": ("vision_eff.cache.bench", "token merging + step caching on the built-in UNet and DiT"),
    "zoo": ("vision_eff.zoo.evaluate", "quality of the built-in models (accuracy, FD vs the real-vs-real floor)"),
}
# `vision-eff NAME args...` -> module.main(args), for tool groups owned by a sub-package
GROUPS = {
    "samplers": ("vision_eff.samplers.cli", "sampler tools: `vision-eff samplers optimize --help`"),
}


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `vision-eff generate: error: ... (see --help)`, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


def _add_generate(sub) -> None:
    from .zoo import ZOO, diffusion_models

    p = sub.add_parser("generate", help="the main job: generate a labelled grid and compare with diffusers' default",
                       description="Generate a class-labelled grid with a built-in model using the fastest "
                                   "configuration vision-eff has, write it into gallery/, and print wall time, FD "
                                   "and class accuracy beside diffusers' default (50-step DPM-Solver++, same noise).")
    diffusion = diffusion_models()
    p.add_argument("--model", default="shapes-unet", choices=diffusion, help="built-in model (default: shapes-unet)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=None,
                   help="sampler steps for the fast configuration (default: the preset's)")
    p.add_argument("--cache-interval", type=_positive_int("--cache-interval"), default=None,
                   help="StepCache: compute the deep branch every N steps in the fast configuration "
                        "(1 = no caching; default: the preset's)")
    p.add_argument("--labels", type=int, nargs="+", default=None, metavar="L",
                   help="class labels for the grid (default: every class); 0..7")
    p.add_argument("--per-class", type=_positive_int("--per-class"), default=8, help="grid columns per class")
    p.add_argument("--eval-samples", type=_positive_int("--eval-samples"), default=128,
                   help="images per configuration for FD/accuracy (class-balanced)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: gallery/)")
    p.add_argument("--no-compare", action="store_true", help="skip the diffusers-default reference run")
    add_allocator_option(p)


def _add_zoo(sub) -> None:
    from .zoo import ZOO, diffusion_models
    from .zoo.train import PRECISIONS, TEACHER_LABELS, TIMESTEP_SAMPLINGS

    p = sub.add_parser("zoo", help="list, train or evaluate the built-in models",
                       description="The built-in models: list them, retrain them from scratch, or evaluate them.")
    zsub = p.add_subparsers(dest="zoo_cmd", required=True, metavar="{list,train,eval}")
    zsub.add_parser("list", help="list built-in models and their training records")
    t = zsub.add_parser("train", help="train a built-in model from scratch (writes safetensors weights)",
                        description="Train a built-in model. Seed, steps, batch, data and wall time go into the "
                                    "weights' metadata. Use `accelerate launch -m vision_eff.cli zoo train ...` "
                                    "for several processes / GPUs.")
    t.add_argument("name", choices=list(ZOO))
    t.add_argument("--steps", type=_positive_int("--steps"), default=None, help="optimizer steps (default: recipe)")
    t.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--out", default=None, help="weights path (default: the packaged weights file)")
    t.add_argument("--init-from", default=None, metavar="WEIGHTS",
                   help="continue from these weights (skips the recipe's pretraining stages; the run reads "
                        "fresh data after what those weights saw, and the metadata keeps their history)")
    t.add_argument("--save-every", type=_positive_int("--save-every"), default=None, metavar="N",
                   help="write the weights so far every N steps (diffusion models; default: 250)")
    t.add_argument("--keep-checkpoints", action="store_true",
                   help="also keep each of those as OUT.stepN.safetensors (diffusion models)")
    t.add_argument("--teacher", default=None, choices=diffusion_models(),
                   help="distill from this trained built-in diffusion model: its prediction at each noisy "
                        "sample replaces the noisy regression target (labels are dropped for both alike)")
    t.add_argument("--teacher-labels", default=None, choices=TEACHER_LABELS,
                   help="with --teacher: 'one' (default) distills each noisy image under its own label; 'all' "
                        "under every label and the null one (the batch size counts noisy images, each giving "
                        "9 rows), so the student learns what the label changes")
    t.add_argument("--repa", action="store_true",
                   help="shapes-dit: add REPA representation alignment (an early block's tokens pulled towards "
                        "the trained shapes-vit's patch features of the clean image; needs shapes-vit)")
    t.add_argument("--shared-label-dropout", action="store_true",
                   help="shapes-dit: drop each sample's label once for every block (diffusers' DiT drops "
                        "it per block, so guidance's all-null input is almost never trained)")
    t.add_argument("--dit-init", action="store_true",
                   help="shapes-dit from scratch: the DiT paper's initialisation (zero adaLN modulation and "
                        "final layer, so every block starts as the identity) instead of diffusers' default")
    t.add_argument("--mask-ratio", type=float, default=None, metavar="R",
                   help="a DiT: add MDT's masked-token loss (a share R in (0, 1) of the patch tokens dropped in the "
                        "first half of the blocks, predicted back by the rest), beside the plain loss")
    t.add_argument("--timesteps", default=None, choices=TIMESTEP_SAMPLINGS,
                   help="diffusion models: how training timesteps are drawn: uniform (the recipes' default) or "
                        "logit_normal (SD3's density, most weight on the middle of the schedule)")
    t.add_argument("--loss", default=None, metavar="LOSS",
                   help="diffusion models: 'mse' (plain regression on the prediction type) or 'min_snrG' "
                        "(Min-SNR-gamma weighting, e.g. min_snr5; it gives the noisiest timesteps almost no "
                        "weight); default: the recipe's")
    add_allocator_option(t)
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): the recipe's bf16 autocast only where the hardware has native bf16 "
                        "(a GPU, or a CPU with AVX512-BF16 / AMX), else fp32, since emulated bf16 is slower, "
                        "many times so without AVX-512; bf16 / fp32 force one. The weights' metadata records what ran")
    e = zsub.add_parser("eval", help="measure a built-in model's quality (same as `vision-eff bench zoo`)")
    e.add_argument("args", nargs=argparse.REMAINDER)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vision-eff", description="vision-eff: fast samplers, token merging, step caching and "
                     "attention kernels for diffusers and timm models, with built-in models to measure them on.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `vision-eff COMMAND --help` for each command's options.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _add_generate(sub)
    b = sub.add_parser("bench", help="run a benchmark (writes a results table)", add_help=False,
                       description="Benchmarks: " + "; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    b.add_argument("name", nargs="?", choices=[*BENCHES, "all"], help="which benchmark (`all` runs every one)")
    b.add_argument("args", nargs=argparse.REMAINDER)
    _add_zoo(sub)
    for name, (_, helptext) in GROUPS.items():
        g = sub.add_parser(name, help=helptext, add_help=False)
        g.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _load_main(module: str):
    try:
        return importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise UsageError(f"{module} is not part of this version of vision-eff") from None
        raise


def _bench(args) -> int:
    if args.name is None:
        print("usage: vision-eff bench {" + ",".join([*BENCHES, "all"]) + "} [options]\n")
        for k, (_, h) in BENCHES.items():
            print(f"  {k:10s} {h}")
        return 0
    names = [n for n in BENCHES if n != "attention"] if args.name == "all" else [args.name]
    rc = 0
    for n in names:
        rc = max(rc, int(_load_main(BENCHES[n][0])(list(args.args)) or 0))
    return rc


def _zoo(args) -> int:
    from .zoo import DIFFUSION_KINDS, ZOO, model_info

    if args.zoo_cmd == "list":
        for name, e in ZOO.items():
            info = model_info(name)
            trained = (f"trained {info.get('steps_done')} steps in {info.get('train_seconds')} s"
                       if info else "not trained (run `vision-eff zoo train " + name + "`)")
            print(f"{name:21s} {e.kind:10s} {trained}\n    {e.description}")
        return 0
    if args.zoo_cmd == "train":
        from .gallery import check_writable
        from .zoo import entry

        if args.out:
            check_writable(args.out)
        kind = entry(args.name).kind
        kwargs = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, out=args.out,
                      threads=args.threads)
        if args.precision != "auto":
            if kind not in (*DIFFUSION_KINDS, "vae", "vit"):
                raise UsageError(f"--precision is for the models whose recipe uses bf16 autocast, not {args.name}")
            kwargs["precision"] = args.precision
        if args.teacher is not None:
            if kind not in DIFFUSION_KINDS or args.teacher == args.name:
                raise UsageError(f"--teacher: only a built-in diffusion model can distill, and from another "
                                 f"one (got {args.name} from {args.teacher})")
            kwargs["teacher"] = args.teacher
        if args.teacher_labels is not None:
            if args.teacher is None:
                raise UsageError("--teacher-labels says how to distill from a teacher: it needs --teacher")
            kwargs["teacher_labels"] = args.teacher_labels
        if args.repa or args.shared_label_dropout or args.dit_init:
            if kind != "dit":
                raise UsageError(f"--repa / --shared-label-dropout / --dit-init are for shapes-dit, not {args.name}")
            from .zoo.repa import DEFAULT_REPA

            kwargs.update(repa=dict(DEFAULT_REPA) if args.repa else None, shared_label_dropout=args.shared_label_dropout or None,
                          init="dit" if args.dit_init else None)
        if args.loss is not None:
            if kind not in DIFFUSION_KINDS:
                raise UsageError(f"--loss is for the diffusion models, not {args.name}")
            from .zoo.train import min_snr_gamma

            min_snr_gamma(args.loss)  # a ValueError (one line, exit 2) before the allocator is set below
            kwargs["loss"] = args.loss
        if args.mask_ratio is not None:
            if kind != "dit":
                raise UsageError(f"--mask-ratio is for the DiTs, not {args.name}")
            if not 0.0 < args.mask_ratio < 1.0:
                raise UsageError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
            kwargs["mask_ratio"] = args.mask_ratio
        if args.timesteps is not None:
            if kind not in DIFFUSION_KINDS:
                raise UsageError(f"--timesteps is for the diffusion models, not {args.name}")
            kwargs["timesteps"] = args.timesteps
        if kind in DIFFUSION_KINDS:
            kwargs["keep_checkpoints"] = args.keep_checkpoints
            if args.save_every is not None:  # else train()'s default
                kwargs["save_every"] = args.save_every
        elif args.keep_checkpoints or args.save_every is not None:
            raise UsageError(f"--save-every / --keep-checkpoints are for the diffusion models, not {args.name}")
        if args.init_from is not None:
            if not Path(args.init_from).is_file():
                raise UsageError(f"--init-from: no weights file at {args.init_from}")
            if kind in ("vit", "vit-mixer", "classifier"):
                raise UsageError(f"--init-from is for the diffusion models, not {args.name}")
            if args.dit_init:
                raise UsageError("--dit-init initialises a model trained from scratch; with --init-from the "
                                 "weights replace it: drop one of the two")
            kwargs["init_from"] = args.init_from
        print(f"allocator: {set_allocator(args.system_allocator)}")  # after the checks above
        if kind == "vit":  # the ViT classifier has its own training loop
            from .vit.builtin import train_vit

            path = train_vit(**kwargs)
        elif kind == "vit-mixer":  # distilled from the trained shapes-vit
            from .vit.builtin import load_vit
            from .vit.mixer import MixerSwap
            from .vit.recover import recover_mixer

            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            recipe = {**entry(args.name).train, **{k: v for k, v in kwargs.items()
                                                    if k in ("steps", "batch_size", "lr", "seed") and v is not None}}
            path = recover_mixer(load_vit(), MixerSwap(blocks=(0, 1)), out=args.out, **recipe)
        else:
            from .zoo.train import train

            path = train(args.name, **kwargs)
        print(f"wrote {path}")
        return 0
    return int(_load_main(BENCHES["zoo"][0])(list(args.args)) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and argv[1:2] in (["-h"], ["--help"]):
        argv = ["bench"]  # the bench parser has no help of its own (its options are each benchmark's): list them
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed a one-line usage error (code 2) or help (0)
        return int(exc.code or 0)
    from .zoo.weights import WeightsError
    from ._patching import UnsupportedModelError

    try:
        if args.cmd == "generate":
            from .main_job import run

            return run(args)
        if args.cmd == "bench":
            return _bench(args)
        if args.cmd == "zoo":
            return _zoo(args)
        if args.cmd in GROUPS:
            return int(_load_main(GROUPS[args.cmd][0])(list(args.args)) or 0)
    except (UsageError, ValueError, KeyError, WeightsError, UnsupportedModelError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"vision-eff: error: {msg}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
