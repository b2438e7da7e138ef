"""``vision-eff bench vit``: token merging / pruning / cheaper mixers on timm ViTs (CPU or GPU).

1. The built-in ViT (``shapes-vit``, trained): accuracy on the 2048 held-out images, throughput,
   FLOPs, top-1 agreement and KL against the unpatched model, versus r, pruning, and the pooling mixer.
2. Standard timm architectures with random weights (pretrained=False): throughput at several batch
   sizes against unpatched timm (fused attention on), agreement and KL on random images.

Writes a Markdown table (machine, versions, commit, exact command) and a merge-map picture.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn import functional as F

import vision_eff as ve

from .._timing import add_allocator_option, interleaved_rounds, set_allocator
from ..tokens.timm import merge_schedule

__all__ = ["main", "time_forward", "time_interleaved", "flops_per_image", "agreement"]

TIMM_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "deit3_base_patch16_224", "eva02_base_patch14_224")


def time_forward(model: torch.nn.Module, x: torch.Tensor, iters: int, warmup: int = 1) -> float:
    """Median seconds of one forward (inference mode) after ``warmup`` calls."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(max(1, iters)):
            if x.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_interleaved(model: torch.nn.Module, x: torch.Tensor, configs: dict, iters: int) -> dict:
    """Unpatched and patched forwards timed in alternation, so machine drift hits all of them alike.

    ``configs`` maps a key to a technique config, a list of them, or a plain callable (timed as it is).
    Each config is applied once, to its own copy of ``model`` (same weights), and stays applied while the
    rounds run: a patched model is timed as it is deployed, not in the first forward after every ``apply``
    (that one pays for new tensor shapes in the allocator and the matrix-multiply caches: 1-2% on ViT-B).
    ``model`` itself is never patched.
    Each round times the unpatched model and every config once, in an order that reverses every
    other round; one untimed warm-up round comes first. Returns, per key (``None`` = unpatched), the
    median seconds, and per config key also the median of the per-round speed-ups (paired ratios).
    """
    copies, handles = {None: model}, []
    try:
        for key, cfg in configs.items():
            if callable(cfg):  # a plain forward (e.g. :func:`slice_bound`), timed as it is
                copies[key] = cfg
                continue
            copies[key] = copy.deepcopy(model)
            handles.append(ve.apply(copies[key], *(cfg if isinstance(cfg, (list, tuple)) else [cfg])))
        out = interleaved_rounds(lambda key: time_forward(copies[key], x, 1, warmup=0), [None, *configs],
                                 max(1, iters), baseline=None)
    finally:
        for h in handles:
            h.remove()
    for v in out.values():
        del v["times"]
    return out


def slice_bound(model: torch.nn.Module, rs: list[int]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A timing reference for token merging: a copy of ``model`` run at the merged model's token counts with
    no matching, no merge and no hooks. Block ``i`` runs its attention on all its tokens and then keeps the
    first ``N - rs[i]`` for the MLP (as merging keeps ``N - r``); the outputs mean nothing. None for models
    other than a timm VisionTransformer of pre-norm ``Block``s."""
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer) or any(type(b) is not Block for b in model.blocks):
        return None
    ref = copy.deepcopy(model).eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = ref.norm_pre(ref.patch_drop(ref._pos_embed(ref.patch_embed(x))))
        for blk, r in zip(ref.blocks, rs):
            x = x + blk.ls1(blk.attn(blk.norm1(x)))
            x = x[:, : x.shape[1] - r]
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return ref.forward_head(ref.norm(x))

    return forward


class _SDPAFlops(torch.overrides.TorchFunctionMode):
    """Counts ``F.scaled_dot_product_attention`` FLOPs (torch's flop counter misses the CPU kernels)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            # q k^T and (attention) v: two matmuls of 2 FLOPs per multiply-add
            self.flops += 4 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
        return func(*args, **kwargs)


def flops_per_image(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward per image: torch's flop counter (matmuls, convolutions) + SDPA counted by shape."""
    from torch.utils.flop_counter import FlopCounterMode

    counter, sdpa = FlopCounterMode(display=False), _SDPAFlops()
    with counter, sdpa, torch.inference_mode():
        model(x)
    return (counter.get_total_flops() + sdpa.flops) / x.shape[0]


def agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || other)) between two sets of logits."""
    agree = (ref_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()
    kl = F.kl_div(logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1), log_target=True,
                  reduction="batchmean").item()
    return agree, kl


def _environment() -> list[str]:
    import timm

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit = "none (no commit yet)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu}, {torch.get_num_threads()} threads"
    return [f"- device: {dev}", f"- torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}",
            f"- commit: {commit}", f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _builtin_settings(depth: int, mixer_weights: Path | None) -> list[tuple[str, Callable[[], list]]]:
    from .mixer import MixerSwap

    s: list[tuple[str, Callable[[], list]]] = [("unpatched", lambda: [])]
    for r in (16, 24, 32, 40):
        s.append((f"TokenMerge(r={r})", lambda r=r: [ve.TokenMerge(r=r)]))
    for k in (0.25, 0.15):
        s.append((f"TokenMerge(keep={k}, decreasing)", lambda k=k: [ve.TokenMerge(keep=k, schedule="decreasing")]))
    for k in (0.7, 0.5):
        s.append((f"TokenPrune(keep={k})", lambda k=k: [ve.TokenPrune(keep=k)]))
    s.append(("MixerSwap(blocks=(0,1)) no recovery", lambda: [MixerSwap(blocks=(0, 1))]))
    if mixer_weights is not None:
        s.append(("MixerSwap(blocks=(0,1)) recovered", lambda: [MixerSwap(blocks=(0, 1), weights=str(mixer_weights))]))
    return s


def bench_builtin(args, lines: list[str]) -> None:
    from ..zoo import data
    from ..zoo.weights import WeightsError, weights_path
    from .builtin import IMAGE_SIZE, build_vit, load_vit, predict

    try:
        model = load_vit()
        note = "trained weights"
    except WeightsError as exc:
        if not args.smoke:
            lines += ["## Built-in ViT", "", f"skipped: {exc}", ""]
            print(f"[bench vit] built-in ViT skipped: {exc}", file=sys.stderr)
            return
        model, note = build_vit(depth=2, embed_dim=48, num_heads=3).eval(), "random weights (smoke run)"
    count = 64 if args.smoke else data.EVAL_SIZE
    x, y = data.eval_split(IMAGE_SIZE, count)
    xb = x[: args.builtin_batch]
    mixer_path = weights_path("shapes-vit-poolmixer")
    settings = _builtin_settings(len(model.blocks), mixer_path if mixer_path.exists() and not args.smoke else None)
    ref_logits, measured, failed = None, {}, {}
    for name, make in settings:
        techniques = make()
        try:
            handle = ve.apply(model, *techniques) if techniques else None
        except (ve.UnsupportedModelError, ValueError) as exc:
            failed[name] = exc
            continue
        try:
            logits = predict(model, x, batch_size=256)
            fl = flops_per_image(model, x[:1])
        finally:
            if handle is not None:
                handle.remove()
        acc = (logits.argmax(1) == y).float().mean().item()
        if ref_logits is None:
            ref_logits, base_acc = logits, acc
        measured[name] = (acc, fl, *agreement(ref_logits, logits), techniques)
        print(f"[bench vit] built-in {name}: acc {100 * acc:.2f}", flush=True)
    # the setting without techniques is the unpatched model, timed as time_interleaved's baseline (key None)
    timed = time_interleaved(model, xb, {n: m[-1] for n, m in measured.items() if m[-1]}, args.iters)
    rows = []
    for name, _ in settings:
        if name in failed:
            rows.append([name, f"n/a ({failed[name]})", "", "", "", "", "", ""])
            continue
        acc, fl, agree, kl, techniques = measured[name]
        t = timed[name if techniques else None]
        rows.append([name, f"{100 * acc:.2f}", f"{100 * (acc - base_acc):+.2f}", f"{xb.shape[0] / t['seconds']:.1f}",
                     f"{t.get('speedup', 1.0):.2f}x", f"{fl / 1e9:.3f}", f"{100 * agree:.2f}", f"{kl:.4f}"])
        print(f"[bench vit] built-in {name}: speed {t.get('speedup', 1.0):.2f}x", flush=True)
    n_tok = model.patch_embed.num_patches + model.num_prefix_tokens
    lines += [f"## Built-in ViT (shapes-vit, {IMAGE_SIZE}x{IMAGE_SIZE}, {n_tok} tokens, depth {len(model.blocks)}, "
              f"width {model.embed_dim})", "",
              f"{note}; accuracy on {count} held-out images; throughput at batch {xb.shape[0]}, every setting "
              f"timed in alternation, each on its own copy of the model patched once ({args.iters} rounds after a "
              f"warm-up round; img/s from the median time, "
              f"speed-up = median of the per-round ratios to the unpatched model); FLOPs per image from torch's flop counter; agreement and KL against the "
              "unpatched model's predictions.", ""]
    lines += _table(["setting", "top-1 %", "delta", "img/s", "speed-up", "GFLOPs/img", "top-1 agree %", "KL"], rows)
    lines.append("")
    if args.gallery:
        folder = Path(args.gallery)
        _merge_gallery(model, x[:8], folder)
    if args.gallery and not args.smoke:  # a smoke run's numbers mean nothing: keep them off the gallery page
        from ..gallery import GALLERY, provenance, update_section

        rel = os.path.relpath(folder / "merge_maps.png", GALLERY)
        table = "\n".join(lines[lines.index(next(l for l in lines if l.startswith("## Built-in ViT"))) + 3:])
        update_section("vit", "## Token merging on the built-in ViT\n\n"
                       f"![merge maps]({rel})\n\nTop row: held-out images; below: every patch coloured with the mean "
                       "colour of the token it was merged into, after the last block, for `TokenMerge(r=16)` and "
                       f"`TokenMerge(r=32)`.\n\n{table.strip()}\n\n{provenance()}\n")


def _merge_gallery(model, images: torch.Tensor, folder: Path) -> None:
    """Each image next to its merge map (every patch coloured with its merged token's mean colour)."""
    from PIL import Image

    from ..zoo.data import to_uint8

    rows = [to_uint8(images)]
    ph = images.shape[-1] // model.patch_embed.grid_size[0]
    g = model.patch_embed.grid_size
    p = model.num_prefix_tokens
    for r in (16, 32):
        handle = ve.apply(model, ve.TokenMerge(r=r))
        with torch.inference_mode():
            model(images)
        inv = handle.parts[0].state["tokens"].last_inv
        handle.remove()
        patches = images.unfold(2, ph, ph).unfold(3, ph, ph).mean((-1, -2)).flatten(2).transpose(1, 2)  # [B, HW, 3]
        groups = inv[:, p:] - 0
        out = torch.zeros(images.shape[0], groups.max().item() + 1, 3).scatter_add(
            1, groups.unsqueeze(-1).expand(-1, -1, 3), patches)
        count = torch.zeros(images.shape[0], out.shape[1], 1).scatter_add(
            1, groups.unsqueeze(-1), torch.ones_like(patches[..., :1]))
        col = (out / count.clamp_min(1)).gather(1, groups.unsqueeze(-1).expand(-1, -1, 3))
        col = col.transpose(1, 2).reshape(-1, 3, g[0], g[1])
        col = F.interpolate(col, scale_factor=ph, mode="nearest")
        rows.append(to_uint8(col))
    grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0).numpy()
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(folder / "merge_maps.png")


def op_profile(model: torch.nn.Module, x: torch.Tensor, iters: int = 3) -> dict[str, tuple[float, float]]:
    """Per aten op, ``(self seconds per forward, FLOPs per forward)`` over ``iters`` forwards after two warm-ups
    (torch's profiler; FLOPs only for the ops it counts, such as addmm). A first profiled forward is discarded:
    the first one under the profiler after a patch runs several times slower."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x), model(x)
        for n in (1, iters):
            with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                for _ in range(n):
                    model(x)
    return {e.key: (e.self_cpu_time_total / 1e6 / iters, (e.flops or 0) / iters) for e in prof.key_averages()}


def kernel_cost(model: torch.nn.Module, x: torch.Tensor, iters: int = 3) -> tuple[float, float]:
    """``(system seconds, minor page faults)`` of this process per forward, over ``iters`` forwards after two
    warm-ups, without the profiler (``getrusage``; POSIX only). Memory the allocator hands back to the system
    and takes again costs a page fault per page on first touch, which the op profile books to whichever op
    writes the fresh buffer first."""
    import resource

    with torch.inference_mode():
        model(x), model(x)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(iters):
            model(x)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (r1.ru_stime - r0.ru_stime) / iters, (r1.ru_minflt - r0.ru_minflt) / iters


def _profile_rows(name: str, b: int, model, x, rs: list[int], supported, top: int = 6) -> list[list[Any]]:
    """Rows of the op profile: the unpatched model and TokenMerge(r) side by side (blank cells where r does not
    apply), the ``top`` ops of each setting, with GFLOP/s where torch counts the op's FLOPs; then two rows from
    :func:`kernel_cost`: system time (ms) and minor page faults (count, in the ms column) per forward."""
    prof = {0: op_profile(model, x)}
    cost = {0: kernel_cost(model, x)}
    for r in rs:
        prof[r], cost[r] = {}, None
        if r in supported:
            with ve.patched(model, ve.TokenMerge(r=r)):
                prof[r] = op_profile(model, x)
                cost[r] = kernel_cost(model, x)
    ops = []
    for p in prof.values():
        ops += [k for k, _ in sorted(p.items(), key=lambda kv: -kv[1][0])[:top] if k not in ops]
    def cells(p: dict, op: str | None) -> list[str]:  # op None: the total over all ops
        if not p:
            return ["", ""]
        secs, fl = p.get(op, (0.0, 0.0)) if op else (sum(s for s, _ in p.values()), 0.0)
        return [f"{1e3 * secs:.1f}", f"{fl / secs / 1e9:.0f}" if fl and secs else ""]

    rows = [[name, b, op or "total (all ops)"] + [c for p in prof.values() for c in cells(p, op)]
            for op in [*ops, None]]
    for label, i, scale, fmt in (("system (kernel) time, no profiler", 0, 1e3, ".1f"),
                                 ("minor page faults (count), no profiler", 1, 1, ".0f")):
        rows.append([name, b, label] + [c for k in cost.values()
                                        for c in ([f"{scale * k[i]:{fmt}}", ""] if k else ["", ""])])
    return rows


def bench_timm(args, lines: list[str]) -> None:
    import timm

    batches = [int(b) for b in args.batches.split(",")]
    rs = [int(r) for r in args.r.split(",")]
    rows, prof_rows = [], []
    for name in args.models.split(","):
        kw = dict(pretrained=False)
        if args.smoke:
            kw.update(img_size=64, depth=2, embed_dim=64, num_heads=2)
        torch.manual_seed(0)
        model = timm.create_model(name, **kw).eval()
        size = model.patch_embed.img_size
        gen = torch.Generator().manual_seed(0)
        xa = torch.randn(8, 3, *size, generator=gen)
        with torch.inference_mode():
            ref = model(xa)
        flops = {0: flops_per_image(model, xa[:1])}
        supported, why = {}, {}  # r -> (agreement, KL) where TokenMerge(r) applies, else the reason it does not
        for r in rs:
            try:
                with ve.patched(model, ve.TokenMerge(r=r)):
                    flops[r] = flops_per_image(model, xa[:1])
                    with torch.inference_mode():
                        supported[r] = agreement(ref, model(xa))
            except ve.UnsupportedModelError as exc:
                why[r] = exc
        configs: dict = {r: ve.TokenMerge(r=r) for r in supported}
        if args.slice_bound:  # one reference copy per r, shared by every batch size
            n = model.patch_embed.num_patches + model.num_prefix_tokens
            for r in supported:
                ref_fwd = slice_bound(model, merge_schedule(ve.TokenMerge(r=r), len(model.blocks), n,
                                                            model.num_prefix_tokens))
                if ref_fwd is not None:
                    configs[("slice", r)] = ref_fwd
        for b in batches:
            x = torch.randn(b, 3, *size, generator=gen)
            timed = time_interleaved(model, x, configs, args.iters)
            row = [name, b, f"{flops[0] / 1e9:.2f}", f"{b / timed[None]['seconds']:.2f}"]
            for r in rs:
                if r in why:
                    row += ["", f"n/a ({why[r]})", ""] + ([""] if args.slice_bound else [])
                    continue
                agree, kl = supported[r]
                t = timed[r]
                row += [f"{flops[r] / 1e9:.2f}", f"{b / t['seconds']:.2f} ({t['speedup']:.2f}x)",
                        f"{100 * agree:.0f} / {kl:.4f}"]
                if args.slice_bound:
                    sl = timed.get(("slice", r))
                    row.append("n/a (timm VisionTransformer blocks only)" if sl is None else
                               f"{b / sl['seconds']:.2f} ({sl['speedup']:.2f}x)")
            rows.append(row)
            print(f"[bench vit] {name} batch {b}: " + " | ".join(map(str, row[2:])), flush=True)
            if args.profile:
                prof_rows += _profile_rows(name, b, model, x, rs, supported)
    header = ["model", "batch", "GFLOPs/img", "unpatched img/s"]
    for r in rs:
        header += [f"r={r} GFLOPs/img", f"r={r} img/s (speed-up)", f"r={r} agree % / KL"]
        if args.slice_bound:
            header.append(f"r={r} slice bound img/s (speed-up)")
    lines += ["## timm architectures, random weights (pretrained=False)", "",
              f"Unpatched timm with fused attention (SDPA) against TokenMerge(r), each on its own copy of the model "
              f"patched once, timed in alternation: {args.iters} "
              f"rounds after a warm-up round, each timing every setting once (order reversed every other round); "
              f"img/s from the median time, speed-up = median of the per-round ratios; "
              "agreement and KL on 8 random images (random weights: a structure check, not accuracy)."
              + (" Slice bound: the model run at the merged model's token counts by keeping each block's first "
                 "N - r tokens, with no matching, merge or hooks (a timing reference; its outputs mean nothing)."
                 if args.slice_bound else ""), ""]
    lines += _table(header, rows)
    lines.append("")
    if prof_rows:
        header = ["model", "batch", "op", "unpatched ms", "unpatched GFLOP/s"]
        for r in rs:
            header += [f"r={r} ms", f"r={r} GFLOP/s"]
        lines += ["### Where the time goes", "",
                  "torch's profiler, self time per forward (mean of 3 after 2 warm-ups), the heaviest ops of each "
                  "setting; GFLOP/s where the profiler counts the op's FLOPs. The last two rows come from getrusage "
                  "without the profiler (mean of 3 forwards after 2 warm-ups): the process's system time and its "
                  "minor page faults per forward, the count in the ms column. Freed memory that the allocator "
                  "gives back to the system faults in again page by page when it is next written, and the "
                  "profiler books that to whichever op writes first.", ""]
        lines += _table(header, prof_rows)
        lines.append("")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vision-eff bench vit", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(TIMM_MODELS), help="timm model names (comma-separated)")
    p.add_argument("--batches", default="1,8,64", help="batch sizes for the timm models")
    p.add_argument("--r", default="16", help="TokenMerge r values for the timm models (comma-separated)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per measurement (median)")
    p.add_argument("--builtin-batch", type=int, default=64, help="batch size for the built-in ViT's throughput")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-builtin", action="store_true")
    p.add_argument("--skip-timm", action="store_true")
    p.add_argument("--slice-bound", action="store_true",
                   help="also time each r's token counts without merging (keep the first N - r tokens per block): "
                        "what merging costs beyond the smaller matrix products")
    p.add_argument("--profile", action="store_true",
                   help="timm models: also profile each batch per aten op (time and GFLOP/s, unpatched beside merged)")
    p.add_argument("--smoke", action="store_true", help="tiny models and sizes: checks the command, numbers mean nothing")
    add_allocator_option(p)
    p.add_argument("--out", default="notes/results/vit.md", help="Markdown table to write")
    p.add_argument("--gallery", default="gallery/vit", help="folder for the merge-map picture ('' for none)")
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error("--iters must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..gallery import command_line

    command = command_line("vision-eff bench vit", argv).strip()
    lines = ["# vision-eff bench vit", "", *_environment(),
             f"- allocator: {set_allocator(args.system_allocator)}",
             f"- command: `{command}`", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_builtin:
        bench_builtin(args, lines)
        out.write_text("\n".join(lines) + "\n")  # partial results survive an interrupted run
    if not args.skip_timm:
        bench_timm(args, lines)
    out.write_text("\n".join(lines) + "\n")
    print(f"[bench vit] wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
