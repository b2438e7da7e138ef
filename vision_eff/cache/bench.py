"""``vision-eff bench diffusion``: token merging + step caching on the built-in UNet and DiT, beside the peers.

Part 1 (built-in trained models): for every setting, wall time to generate ``--n`` class-balanced images
(classifier-free guidance, DPM-Solver++ 2M, ``--steps`` steps, the same noise for every setting),
the evaluator's FD and class accuracy, and PSNR/SSIM to the unaccelerated images. Peers in the same run:
tomesd and DeepCache on the UNet, diffusers' FirstBlockCache and TaylorSeer on the DiT (each skipped,
with the reason in the table, when it is not installed or fails).

Part 2 (``--big``): per-call speed of SD1.5- and SDXL-configured UNets and a PixArt-alpha-configured
transformer with random weights at 512 px latent shapes (64x64 latents, batch 1): the plain call,
token merging, and the full / cached calls of step caching (a step-cache row's time is the mean per
step of one full and ``interval - 1`` cached calls).

Writes ``notes/results/diffusion.md`` (tables, machine, versions, commit, command) and
``gallery/diffusion/{unet,dit}.png`` (the first images of every setting side by side).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

import vision_eff as ve

from .._timing import SYSTEM_ALLOCATOR, add_allocator_option, interleaved_rounds, set_allocator

RESULTS = Path(__file__).resolve().parents[2] / "notes" / "results" / "diffusion.md"
GALLERY_DIR = Path(__file__).resolve().parents[2] / "gallery" / "diffusion"

Setting = tuple[str, str, Callable[..., Callable[[], None]]]  # (name, who, apply(pipe, args) -> undo)
CHUNKED_REFERENCE = "ChunkedFeedForward 4096 rows (same outputs)"  # the reference's outputs, faster
CHUNKED_SUFFIX = " + ChunkedFeedForward"


# ----------------------------------------------------------------------------------------- settings
def _ours(*techniques) -> Callable[..., Callable[[], None]]:
    def apply(pipe, args=None):
        return ve.apply(pipe, *techniques).remove
    return apply


CALIBRATION_IMAGES = 4


def _calibrated(num_full: int, *others, order: int = 1, probe: int = 1) -> Callable[..., Callable[[], None]]:
    """StepCache on a non-uniform schedule calibrated from one uncached run on other noise (seed + 1),
    with the run's own step count and guidance; the calibration is not in the timed run."""
    found: dict[tuple, tuple[int, ...]] = {}  # calibrated once per run settings (--rounds re-applies it)

    def apply(pipe, args):
        from ..zoo import NUM_CLASSES
        from .calibrate import calibrate_full_steps

        key = (id(pipe), args.steps, args.guidance, args.seed)
        if key not in found:
            labels = torch.arange(CALIBRATION_IMAGES) % NUM_CLASSES
            noise = torch.randn(CALIBRATION_IMAGES, *pipe.latent_shape,
                                generator=torch.Generator().manual_seed(args.seed + 1))
            found[key] = calibrate_full_steps(pipe, num_full, probe=probe, run=lambda: pipe(
                class_labels=labels, num_inference_steps=args.steps, guidance_scale=args.guidance, latents=noise,
                output_type="latent"))
            print(f"  calibrated full steps: {found[key]}", flush=True)
        return ve.apply(pipe, ve.StepCache(full_steps=found[key], order=order, probe=probe), *others).remove
    return apply


def _tomesd(ratio: float, max_downsample: int = 1):
    def apply(pipe, args=None):
        import tomesd

        tomesd.apply_patch(pipe, ratio=ratio, max_downsample=max_downsample)
        return lambda: tomesd.remove_patch(pipe)
    return apply


def _deepcache(interval: int, branch: int = 0, tome: float | None = None):
    def apply(pipe, args=None):
        from DeepCache import DeepCacheSDHelper

        undo_tome = _tomesd(tome)(pipe) if tome else (lambda: None)
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        # DeepCache reads the step with timestep.item(): hand it one timestep (the batch shares it)
        wrapped = pipe.unet.forward
        pipe.unet.forward = lambda x, t, *a, **k: wrapped(x, t[:1] if torch.is_tensor(t) and t.ndim else t, *a, **k)

        def undo():
            del pipe.unet.forward
            helper.disable()
            undo_tome()
        return undo
    return apply


def _plus(apply_first: Callable[..., Callable[[], None]], *techniques) -> Callable[..., Callable[[], None]]:
    """A setting (ours or a peer's) with more of our techniques applied on top (e.g. ChunkedFeedForward)."""
    def apply(pipe, args=None):
        undo_first = apply_first(pipe, args)
        try:
            handle = ve.apply(pipe, *techniques)
        except Exception:
            undo_first()
            raise

        def undo():
            handle.remove()
            undo_first()
        return undo
    return apply


def _diffusers_hook(kind: str, **config):
    def apply(pipe, args=None):
        from diffusers.hooks import (FirstBlockCacheConfig, TaylorSeerCacheConfig, apply_first_block_cache,
                                     apply_taylorseer_cache)

        original = pipe.transformer
        twin = copy.deepcopy(original)  # diffusers' hooks are removed with their registry; a twin is simpler
        if kind == "fbc":
            apply_first_block_cache(twin, FirstBlockCacheConfig(**config))
        else:
            apply_taylorseer_cache(twin, TaylorSeerCacheConfig(**config))
        pipe.transformer = twin
        # what a diffusers pipeline does for a CacheMixin model: a named cache context around each denoiser
        # call, and fresh hook state for every run (DiTTransformer2DModel has no CacheMixin)
        from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

        call, set_timesteps = pipe._denoise, pipe.scheduler.set_timesteps

        def denoise(*a, **k):
            _set_cache_context(twin, CacheContext("cond_uncond"))
            try:
                return call(*a, **k)
            finally:
                _set_cache_context(twin, None)

        def new_run(*a, **k):
            HookRegistry.check_if_exists_or_initialize(twin).reset_stateful_hooks(recurse=True)
            return set_timesteps(*a, **k)

        pipe._denoise, pipe.scheduler.set_timesteps = denoise, new_run

        def undo():
            del pipe._denoise
            del pipe.scheduler.set_timesteps
            pipe.transformer = original
        return undo
    return apply


def unet_settings() -> list[Setting]:
    TM, SC = ve.TokenMerge, ve.StepCache
    CFF = ve.ChunkedFeedForward(rows=4096)
    return [
        ("TokenMerge 0.5 (merge)", "ours", _ours(TM(ratio=0.5))),
        ("TokenMerge 0.5 (merge, 32x32 level only)", "ours", _ours(TM(ratio=0.5, min_tokens=1024))),
        ("TokenMerge 0.5 (merge, 32x32 level only, 4x4 cells)", "ours", _ours(TM(ratio=0.5, min_tokens=1024, sx=4, sy=4))),
        ("TokenMerge 0.5 (merge + mlp, 32x32 level only, 4x4 cells)", "ours",
         _ours(TM(ratio=0.5, min_tokens=1024, sx=4, sy=4, mlp=True))),
        ("TokenMerge 0.75 (downsample 2x2)", "ours", _ours(TM(ratio=0.75, method="downsample"))),
        ("StepCache interval 3", "ours", _ours(SC(interval=3))),
        ("StepCache interval 5", "ours", _ours(SC(interval=5))),
        ("StepCache 5 + TokenMerge 0.5 (merge, 32x32 only)", "ours", _ours(SC(interval=5), TM(ratio=0.5, min_tokens=1024))),
        ("StepCache 4, order 1", "ours", _ours(SC(interval=4, order=1))),
        ("StepCache 5, order 1", "ours", _ours(SC(interval=5, order=1))),
        ("StepCache 6, order 1", "ours", _ours(SC(interval=6, order=1))),
        ("StepCache 5, order 1 + TokenMerge 0.3 (merge, 32x32 only)", "ours",
         _ours(SC(interval=5, order=1), TM(ratio=0.3, min_tokens=1024))),
        ("StepCache calibrated 10 full steps, order 1", "ours", _calibrated(10)),
        ("StepCache calibrated 8 full steps, order 1", "ours", _calibrated(8)),
        ("StepCache calibrated 7 full steps, order 1", "ours", _calibrated(7)),
        ("StepCache calibrated 8 full steps, order 1 + TokenMerge 0.5 (downsample, 32x32 only)", "ours",
         _calibrated(8, TM(ratio=0.5, method="downsample", min_tokens=1024))),
        # the matching cost grows with the number of destination cells: 4x4 cells make it 4x cheaper than
        # ToMe-SD's 2x2, which is what lets merging pay on this narrow (32-channel) 32x32 level on a CPU
        ("StepCache calibrated 10 full steps, order 1 + TokenMerge 0.3 (merge, 32x32 only)", "ours",
         _calibrated(10, TM(ratio=0.3, min_tokens=1024))),
        ("StepCache calibrated 10 full steps, order 1 + TokenMerge 0.3 (merge, 32x32 only, 4x4 cells)", "ours",
         _calibrated(10, TM(ratio=0.3, min_tokens=1024, sx=4, sy=4))),
        ("StepCache calibrated 10 full steps, order 1 + TokenMerge 0.2 (merge, 32x32 only, 4x4 cells)", "ours",
         _calibrated(10, TM(ratio=0.2, min_tokens=1024, sx=4, sy=4))),
        ("StepCache calibrated 9 full steps, order 1 + TokenMerge 0.2 (merge, 32x32 only, 4x4 cells)", "ours",
         _calibrated(9, TM(ratio=0.2, min_tokens=1024, sx=4, sy=4))),
        # mlp=True: the 32x32 level's feed-forward (GEGLU, 4x wide) also runs on the merged tokens
        ("StepCache calibrated 10 full steps, order 1 + TokenMerge 0.2 (merge + mlp, 32x32 only, 4x4 cells)", "ours",
         _calibrated(10, TM(ratio=0.2, min_tokens=1024, sx=4, sy=4, mlp=True))),
        ("StepCache calibrated 10 full steps, order 1 + TokenMerge 0.3 (merge + mlp, 32x32 only, 4x4 cells)", "ours",
         _calibrated(10, TM(ratio=0.3, min_tokens=1024, sx=4, sy=4, mlp=True))),
        # ChunkedFeedForward computes the same function (the first row's PSNR is inf): it speeds the reference
        # itself up, so the merging + caching rows with it are compared with that row as well as with the reference
        (CHUNKED_REFERENCE, "ours", _ours(CFF)),
        ("StepCache calibrated 10 full steps, order 1 + TokenMerge 0.2 (merge, 32x32 only, 4x4 cells)" + CHUNKED_SUFFIX,
         "ours", _plus(_calibrated(10, TM(ratio=0.2, min_tokens=1024, sx=4, sy=4)), CFF)),
        ("StepCache calibrated 10 full steps, order 1 + TokenMerge 0.3 (merge, 32x32 only, 4x4 cells)" + CHUNKED_SUFFIX,
         "ours", _plus(_calibrated(10, TM(ratio=0.3, min_tokens=1024, sx=4, sy=4)), CFF)),
        ("DeepCache interval 4" + CHUNKED_SUFFIX, "DeepCache 0.1.1 + ours", _plus(_deepcache(4), CFF)),
        ("tomesd 0.5", "tomesd 0.1.3", _tomesd(0.5)),
        ("DeepCache interval 3", "DeepCache 0.1.1", _deepcache(3)),
        ("DeepCache interval 5", "DeepCache 0.1.1", _deepcache(5)),
        ("DeepCache 5 + tomesd 0.5", "both", _deepcache(5, tome=0.5)),
        # the peers' frontier near 30 dB, where our merging + caching rows sit
        ("DeepCache interval 4", "DeepCache 0.1.1", _deepcache(4)),
        ("DeepCache 3 + tomesd 0.5", "both", _deepcache(3, tome=0.5)),
        ("DeepCache 4 + tomesd 0.3", "both", _deepcache(4, tome=0.3)),
    ]


def dit_settings() -> list[Setting]:
    TM, SC = ve.TokenMerge, ve.StepCache
    return [
        ("TokenMerge 0.5 (merge)", "ours", _ours(TM(ratio=0.5))),
        ("TokenMerge 0.75 (downsample 2x2)", "ours", _ours(TM(ratio=0.75, method="downsample"))),
        ("StepCache interval 2", "ours", _ours(SC(interval=2))),
        ("StepCache interval 3", "ours", _ours(SC(interval=3))),
        ("StepCache interval 3, order 1", "ours", _ours(SC(interval=3, order=1))),
        ("StepCache adaptive 0.2 (max 4), order 1", "ours", _ours(SC(interval=4, threshold=0.2, order=1))),
        ("StepCache 3, probe 0, order 1", "ours", _ours(SC(interval=3, probe=0, order=1))),
        ("StepCache 4, probe 0, order 1", "ours", _ours(SC(interval=4, probe=0, order=1))),
        ("StepCache 3, order 1 + TokenMerge 0.5 (merge)", "ours", _ours(SC(interval=3, order=1), TM(ratio=0.5))),
        ("StepCache calibrated 12 full steps, probe 0, order 1", "ours", _calibrated(12, probe=0)),
        ("StepCache calibrated 10 full steps, probe 0, order 1", "ours", _calibrated(10, probe=0)),
        ("FirstBlockCache 0.1", "diffusers", _diffusers_hook("fbc", threshold=0.1)),
        ("FirstBlockCache 0.2", "diffusers", _diffusers_hook("fbc", threshold=0.2)),
        ("TaylorSeer interval 3, order 1", "diffusers",
         _diffusers_hook("taylor", cache_interval=3, max_order=1, disable_cache_before_step=1,
                         cache_identifiers=[r"transformer_blocks\.\d+"], taylor_factors_dtype=torch.float32)),
    ]


# ------------------------------------------------------------------------------------------ part 1
def _generate(pipe, labels, noise, steps, guidance, batch) -> tuple[torch.Tensor, float]:
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(labels), batch):
        out.append(pipe.decode_latents(pipe(class_labels=labels[i:i + batch], num_inference_steps=steps,
                                            guidance_scale=guidance, latents=noise[i:i + batch],
                                            output_type="latent").images))
    return torch.cat(out), time.perf_counter() - t0


def _flops(pipe, labels, noise, steps, guidance) -> float:
    """FLOPs of generating the first image (aten-level count: convolutions, matmuls, attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # the math SDPA backend, so that attention is counted (the fused CPU kernels are not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _generate(pipe, labels[:1], noise[:1], steps, guidance, 1)
    return float(counter.get_total_flops())


def _quality(evaluator, imgs, labels) -> dict:
    if evaluator is None:
        return {}
    return dict(fd=evaluator.fd(imgs), accuracy=evaluator.accuracy(imgs, labels))


def _paired_timing(pipe, applies: dict[str, Callable], labels, noise, args) -> dict:
    """The reference (key None) and every setting timed ``args.rounds`` times in alternation on the first
    batch (set-up such as calibration is not timed); returns :func:`interleaved_rounds`' result."""
    b = min(args.batch, len(labels))

    def one(key) -> float:
        undo = (lambda: None) if key is None else applies[key](pipe, args)
        try:
            return _generate(pipe, labels[:b], noise[:b], args.steps, args.guidance, b)[1]
        finally:
            undo()

    return interleaved_rounds(one, [None, *applies], args.rounds, baseline=None, warmup=False)


def _paired_over_chunked(rows: list[dict], paired: dict) -> None:
    """``paired_over_chunked``: a ``... + ChunkedFeedForward`` row's paired speed-up over the chunked reference
    (same outputs as the reference, so the speed-up that merging / caching add on that faster base), per round."""
    base = paired.get(CHUNKED_REFERENCE)
    if base is None:
        return
    for row in rows:
        if row["setting"].endswith(CHUNKED_SUFFIX) and row["setting"] in paired:
            ratios = [b / t for b, t in zip(base["times"], paired[row["setting"]]["times"])]
            row["paired_over_chunked"] = statistics.median(ratios)


def bench_model(name: str, settings: list[Setting], args, evaluator) -> tuple[list[dict], list]:
    from ..metrics import psnr, ssim
    from ..zoo import NUM_CLASSES, load_pipeline

    pipe = load_pipeline(name)
    labels = torch.arange(args.n) % NUM_CLASSES
    noise = torch.randn(args.n, *pipe.latent_shape, generator=torch.Generator().manual_seed(args.seed))
    _generate(pipe, labels[:2], noise[:2], 2, args.guidance, args.batch)  # warm-up
    ref, t_ref = _generate(pipe, labels, noise, args.steps, args.guidance, args.batch)
    f_ref = _flops(pipe, labels, noise, args.steps, args.guidance)
    rows = [dict(setting=f"reference (DPM-Solver++ 2M, {args.steps} steps)", who="diffusers", time_s=t_ref,
                 speedup=1.0, gflops=f_ref / 1e9, flop_speedup=1.0, psnr=float("inf"), ssim=1.0,
                 **_quality(evaluator, ref, labels))]
    panels = [("1. reference", ref[:args.show])]  # numbered as the rows of the table
    print(f"[{name}] reference: {rows[0]}", flush=True)
    ran: dict[str, Callable] = {}
    for title, who, apply in settings:
        if args.only and not any(s in title for s in args.only):
            continue
        try:
            undo = apply(pipe, args)
        except Exception as exc:  # a peer that is missing or does not run on this model
            rows.append(dict(setting=title, who=who, note=f"not run: {type(exc).__name__}: {str(exc)[:80]}"))
            print(f"[{name}] {title}: not run ({exc})", flush=True)
            continue
        try:
            imgs, t = _generate(pipe, labels, noise, args.steps, args.guidance, args.batch)
            flops = _flops(pipe, labels, noise, args.steps, args.guidance)
        except Exception as exc:
            rows.append(dict(setting=title, who=who, note=f"failed: {type(exc).__name__}: {str(exc)[:80]}"))
            print(f"[{name}] {title}: failed ({exc})", flush=True)
            continue
        finally:
            undo()
        row = dict(setting=title, who=who, time_s=t, speedup=t_ref / t, gflops=flops / 1e9, flop_speedup=f_ref / flops,
                   psnr=psnr(imgs, ref).mean().item(), ssim=ssim(imgs, ref).mean().item(), **_quality(evaluator, imgs, labels))
        rows.append(row)
        ran[title] = apply
        panels.append((f"{len(rows)}. {title[:30]}", imgs[:args.show]))
        print(f"[{name}] {title}: {row}", flush=True)
    if args.rounds and ran:
        paired = _paired_timing(pipe, ran, labels, noise, args)
        rows[0]["paired_speedup"] = 1.0
        for row in rows[1:]:
            if row["setting"] in paired:  # not the rows of settings that did not run
                row["paired_speedup"] = paired[row["setting"]]["speedup"]
        _paired_over_chunked(rows, paired)
        print(f"[{name}] paired speed-ups: {[(r['setting'], r.get('paired_speedup')) for r in rows]}", flush=True)
    # the unpatched pipeline must be exactly the reference again after all the removes
    check, _ = _generate(pipe, labels[:args.batch], noise[:args.batch], args.steps, args.guidance, args.batch)
    rows.append(dict(setting="(reference again, after every remove())", who="-",
                     note="bit-exact" if torch.equal(check, ref[:args.batch]) else "DIFFERS"))
    return rows, panels


# ------------------------------------------------------------------------------------------ part 2
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SDXL = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
            block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
PIXART = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              sample_size=64, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
              norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=False)


def _big(name: str):
    g = torch.Generator().manual_seed(0)
    if name == "pixart":
        from diffusers import PixArtTransformer2DModel

        model = PixArtTransformer2DModel(**PIXART)
        kw = dict(hidden_states=torch.randn(1, 4, 64, 64, generator=g), encoder_hidden_states=torch.randn(1, 120, 4096, generator=g),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    else:
        from diffusers import UNet2DConditionModel

        cfg = SD15 if name == "sd15" else SDXL
        model = UNet2DConditionModel(**cfg)
        kw = dict(sample=torch.randn(1, 4, 64, 64, generator=g),
                  encoder_hidden_states=torch.randn(1, 77, cfg["cross_attention_dim"], generator=g))
        if name == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    return model.eval().requires_grad_(False), kw


@torch.no_grad()
def _call(model, kw, t: float) -> float:
    rest = {k: v for k, v in kw.items() if k != "hidden_states" and k != "sample"}
    x = kw["sample"] if "sample" in kw else kw["hidden_states"]
    t0 = time.perf_counter()
    model(x, timestep=torch.tensor([t]), return_dict=False, **rest)  # input positional: tomesd's hook reads args[0]
    return time.perf_counter() - t0


def _merged_levels(model, kw, merges: list) -> str:
    """Which self-attention layers merging changes, by token grid, measured: each ``attn1`` layer's output
    in the merged model against the same layer run unpatched on the same inputs (so a change upstream does
    not count), e.g. "merging changes self-attention at 32x32: 4/4, 16x16: 6/6"."""
    import math

    layers = [m for n, m in model.named_modules() if n.endswith("attn1")]
    calls: list[tuple[torch.nn.Module, tuple, dict, torch.Tensor]] = []

    def hook(mod, args, kwargs, out):
        calls.append((mod, args, dict(kwargs), out[0] if isinstance(out, tuple) else out))

    with ve.patched(model, *merges):
        hooks = [m.register_forward_hook(hook, with_kwargs=True) for m in layers]
        try:
            with torch.no_grad():
                model(**kw, timestep=torch.tensor([500.0]), return_dict=False)
        finally:
            for hk in hooks:
                hk.remove()
    levels: dict[int, list[bool]] = {}
    with torch.no_grad():
        for mod, args, kwargs, out in calls:
            ref = mod(*args, **kwargs)
            ref = ref[0] if isinstance(ref, tuple) else ref
            n = (kwargs.get("hidden_states", args[0] if args else None)).shape[1]
            levels.setdefault(n, []).append(not torch.equal(out, ref))
    parts = []
    for n in sorted(levels, reverse=True):
        side = math.isqrt(n)
        parts.append(f"{f'{side}x{side}' if side * side == n else f'{n} tokens'}: {sum(levels[n])}/{len(levels[n])}")
    return "merging changes self-attention at " + ", ".join(parts)


def bench_big(names: list[str], calls: int) -> list[dict]:
    """Per-call time of big random-weight models (bare model: the clock counts calls, timesteps go down)."""
    rows = []
    for name in names:
        model, kw = _big(name)
        _call(model, kw, 999)  # warm-up
        plain = sum(_call(model, kw, 900 - i) for i in range(calls)) / calls
        rows.append(dict(model=name, setting="plain", per_step_s=plain, speedup=1.0))
        print(f"[big {name}] plain {plain:.2f}s", flush=True)
        configs = [("TokenMerge 0.5 (merge)", [ve.TokenMerge(ratio=0.5)]),
                   ("TokenMerge 0.5 (merge, 4x4 cells)", [ve.TokenMerge(ratio=0.5, sx=4, sy=4)]),
                   ("TokenMerge 0.5 (downsample)", [ve.TokenMerge(ratio=0.5, method="downsample")]),
                   ("StepCache interval 3", [ve.StepCache(interval=3, warmup=0)]),
                   ("StepCache 3 + TokenMerge 0.5 (downsample)",
                    [ve.StepCache(interval=3, warmup=0), ve.TokenMerge(ratio=0.5, method="downsample")])]
        for title, techniques in configs:
            note = ""
            if any(isinstance(t, ve.TokenMerge) for t in techniques):
                merges = [t for t in techniques if isinstance(t, ve.TokenMerge)]
                note = _merged_levels(model, kw, merges)
            with ve.patched(model, *techniques) as h:
                if any(isinstance(t, ve.StepCache) for t in techniques):
                    # `calls` rounds of one full and two cached calls (interval 3), timesteps going down
                    full = cached = 0.0
                    for r in range(calls):
                        full += _call(model, kw, 800 - 3 * r)
                        cached += _call(model, kw, 799 - 3 * r) + _call(model, kw, 798 - 3 * r)
                    full, cached = full / calls, cached / (2 * calls)
                    per = (full + 2 * cached) / 3
                    note = f"full {full:.2f}s, cached {cached:.2f}s" + ("; " + note if note else "")
                else:
                    per = sum(_call(model, kw, 700 - i) for i in range(calls)) / calls
            rows.append(dict(model=name, setting=title, per_step_s=per, speedup=plain / per, note=note))
            print(f"[big {name}] {title}: {per:.2f}s x{plain / per:.2f} {note}", flush=True)
        if name != "pixart":
            try:
                import tomesd

                tomesd.apply_patch(model, ratio=0.5)  # a bare diffusers UNet (tomesd takes a ModelMixin)
                try:
                    per = sum(_call(model, kw, 600 - i) for i in range(calls)) / calls
                finally:
                    tomesd.remove_patch(model)
                rows.append(dict(model=name, setting="tomesd 0.5", per_step_s=per, speedup=plain / per))
                print(f"[big {name}] tomesd: {per:.2f}s x{plain / per:.2f}", flush=True)
            except Exception as exc:
                rows.append(dict(model=name, setting="tomesd 0.5", note=f"not run: {type(exc).__name__}: {str(exc)[:60]}"))
        del model
    return rows


# ------------------------------------------------------------------------------------------- report
def _write(args, parts: dict[str, list[dict]], big: list[dict]) -> None:
    from ..gallery import command_line, markdown_table, provenance

    cols = ["setting", "who", "time_s", "speedup", *(["paired_speedup"] if args.rounds else []),
            *(["paired_over_chunked"] if any("paired_over_chunked" in r for rows in parts.values() for r in rows) else []), "gflops", "flop_speedup", "psnr", "ssim", "fd", "accuracy", "note"]
    text = ["# Token merging and step caching on diffusion models (`vision-eff bench diffusion`)", "",
            provenance(command_line("vision-eff bench diffusion", args.argv)), "",
            f"Allocator: {getattr(args, 'allocator', SYSTEM_ALLOCATOR)}.", ""]
    if parts:
        text += [f"n={args.n} class-balanced images per setting, guidance {args.guidance}, {args.steps} steps of "
            "DPM-Solver++ 2M, batch " f"{args.batch} (x2 with guidance), the same noise for every setting. "
            "PSNR/SSIM: to the reference images from the same noise. FD: evaluator features vs the held-out "
            "split (same n for every row, so rows compare; the real-vs-real floor at this n is given below). "
            "gflops / flop_speedup: FLOPs counted by torch's FlopCounterMode for one image (x2 with guidance), a "
            "load-independent measure of the work saved; time_s / speedup: wall clock on this machine."
            + (f" paired_speedup: the reference and every setting timed again in alternation on one batch, "
               f"{args.rounds} rounds (order reversed every other round), median of the per-round ratios."
               if args.rounds else "")
            + (" paired_over_chunked: the same per-round ratios taken over the ChunkedFeedForward row instead of the"
               " reference (that row has the reference's outputs, faster), for the rows that add ChunkedFeedForward."
               if any("paired_over_chunked" in r for rows in parts.values() for r in rows) else ""), ""]
    for name, rows in parts.items():
        text += [f"## {name}", "", markdown_table(rows, cols, floatfmt=".3g"), ""]
    if "fd_floor" in args.__dict__ and args.fd_floor is not None:
        text += [f"FD floor (real training images vs the held-out split, n={args.n}): {args.fd_floor:.3g}", ""]
    if big:
        text += ["## Random-weight models at 512 px latent shapes (64x64 latents, batch 1, per denoiser call)", "",
                 f"Mean of {args.big_calls} timed call(s) per row after a warm-up; a step-cache row is the mean per "
                 "step of one full and interval - 1 cached calls. Random weights: speed only.", "",
                 markdown_table(big, ["model", "setting", "per_step_s", "speedup", "note"], floatfmt=".3g"), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vision-eff bench diffusion", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256, help="images per setting (default 256)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--batch", type=int, default=64, help="images per pipeline call (default 64)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=["shapes-unet", "shapes-dit"], choices=["shapes-unet", "shapes-dit"])
    p.add_argument("--only", nargs="*", default=None, help="run only settings whose name contains one of these")
    p.add_argument("--big", nargs="*", default=None, choices=["sd15", "sdxl", "pixart"],
                   help="also time random-weight SD1.5 / SDXL UNets and a PixArt transformer at 64x64 latents")
    p.add_argument("--big-calls", type=int, default=1, help="timed calls per big-model setting (default 1)")
    p.add_argument("--skip-builtin", action="store_true", help="only the big random-weight models")
    p.add_argument("--no-eval", action="store_true", help="skip FD / accuracy (speed, FLOPs and PSNR/SSIM only)")
    p.add_argument("--rounds", type=int, default=0,
                   help="also time the reference and every setting this many times in alternation on one batch "
                        "and report the median paired speed-up (robust to machine drift; default 0: off)")
    p.add_argument("--show", type=int, default=16, help="images per setting in the gallery grid")
    add_allocator_option(p)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--gallery", default=str(GALLERY_DIR))
    args = p.parse_args(argv)
    args.argv = list(argv or [])
    if args.rounds < 0:
        p.error("--rounds must be >= 0")
    for k in ("n", "steps", "batch", "big_calls"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    args.allocator = set_allocator(args.system_allocator)
    parts, big, args.fd_floor = {}, [], None
    if not args.skip_builtin:
        from ..metrics import Evaluator
        from ..zoo.weights import weights_path

        missing = [m for m in args.models if not weights_path(m).exists()]
        if missing:
            print(f"vision-eff bench diffusion: error: no trained weights for {', '.join(missing)} "
                  f"(train them with `vision-eff zoo train NAME`)")
            return 2
        evaluator = None
        if weights_path("shapes-classifier").exists() and not args.no_eval:
            evaluator = Evaluator()
            args.fd_floor = evaluator.fd_floor(args.n)
        else:
            print("FD and accuracy left out (--no-eval or no shapes-classifier weights); PSNR/SSIM and speed still run")
        from ..gallery import labelled_panels

        for name in args.models:
            rows, panels = bench_model(name, unet_settings() if name == "shapes-unet" else dit_settings(), args, evaluator)
            parts[name] = rows
            gdir = Path(args.gallery)
            gdir.mkdir(parents=True, exist_ok=True)
            labelled_panels(panels, nrow=4, scale=2, per_row=6).save(gdir / f"{name.split('-')[1]}.png")
    if args.big:
        big = bench_big(args.big, args.big_calls)
    _write(args, parts, big)
    return 0
