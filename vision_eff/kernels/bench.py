"""``vision-eff bench attention``: our kernels against PyTorch's SDPA backends, FlexAttention and
xformers on the shapes of SD1.5, SDXL, DiT/PixArt, Flux and ViT-B with token merging (GPU only).

Times are medians of ``triton.testing.do_bench`` (warm-up included) over several input sets;
TFLOP/s counts 4*B*H*Nq*Nk*D per forward and 2.5x that per backward. Each row also reports our
error against float64 (on the first query rows) next to SDPA's in the same dtype. The fused
token-matching kernel is timed against the unfused PyTorch code, and a profile gives the share of a
UNet / DiT step spent in attention. Writes a Markdown table to ``cuda/results/``.

``--dry-run`` runs the whole table machinery on CPU at toy sizes with a wall-clock timer (to check
the script, not to measure anything); its numbers are meaningless and it writes to ``--out`` only.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .api import attention, match_tokens

RESULTS_DIR = Path(__file__).resolve().parents[2] / "cuda" / "results"


@dataclass(frozen=True)
class Shape:
    model: str
    b: int
    h: int
    n: int
    d: int


SHAPES = [
    Shape("SD1.5 64x64", 2, 8, 4096, 40), Shape("SD1.5 32x32", 2, 8, 1024, 80), Shape("SD1.5 16x16", 2, 8, 256, 160),
    Shape("SDXL 64x64", 2, 10, 4096, 64), Shape("SDXL 32x32", 2, 20, 1024, 64),
    Shape("DiT/PixArt 1024px", 2, 16, 4096, 72),
    Shape("Flux 1024px", 1, 24, 4608, 128),
    Shape("ViT-B", 256, 12, 197, 64), Shape("ViT-B ToMe r~50%", 256, 12, 100, 64),
]
DRY_SHAPES = [Shape("toy odd D", 1, 2, 64, 40), Shape("toy D64", 1, 2, 48, 64)]
MATCH_SHAPES = [("SD1.5 ToMe 64x64", 2, 3072, 1024, 320), ("SDXL ToMe 32x32", 2, 768, 256, 640),
                ("ViT-B ToMe", 256, 99, 98, 64)]
DRY_MATCH = [("toy", 1, 40, 24, 32)]


def flops(s: Shape, backward: bool) -> float:
    f = 4.0 * s.b * s.h * s.n * s.n * s.d
    return f * 3.5 if backward else f


# --- methods: name -> (make(q, k, v, bias) -> callable | None) ------------------------------------
def _sdpa(kernel_name: str) -> Callable:
    def make(q, k, v, bias):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, kernel_name)
        mask = None if bias is None else bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])

        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        try:
            run()
        except RuntimeError:  # this SDPA backend cannot serve the call (e.g. flash with a mask)
            return None
        return run

    return make


def _ours(backend: str) -> Callable:
    def make(q, k, v, bias):
        return lambda: attention(q, k, v, bias=bias, backend=backend)

    return make


def _flex(q, k, v, bias):
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention, dynamic=False)
    if bias is None:
        return lambda: compiled(q, k, v)
    per_key = bias.reshape(bias.shape[0], bias.shape[-1]).to(torch.float32)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + per_key[b, kv_idx]

    return lambda: compiled(q, k, v, score_mod=score_mod)


def _xformers(q, k, v, bias):
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    full = None if bias is None else bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return lambda: xops.memory_efficient_attention(qt, kt, vt, attn_bias=full).transpose(1, 2)


def methods(dry: bool) -> dict[str, Callable]:
    if dry:
        return {"ours (reference op)": _ours("reference"), "SDPA (auto)": lambda q, k, v, b: (
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=None if b is None else b.to(q.dtype)))}
    return {"ours (triton)": _ours("triton"), "SDPA flash": _sdpa("FLASH_ATTENTION"),
            "SDPA mem-efficient": _sdpa("EFFICIENT_ATTENTION"), "SDPA cuDNN": _sdpa("CUDNN_ATTENTION"),
            "SDPA math": _sdpa("MATH"), "FlexAttention": _flex, "xformers": _xformers}


# --- timing -----------------------------------------------------------------------------------------
def _time_ms(fn: Callable, dry: bool) -> float:
    if dry:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _with_backward(fn: Callable, leaves: list[torch.Tensor]) -> Callable:
    def run():
        out = fn()
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run


def _inputs(s: Shape, dtype, device, seed: int, biased: bool, grad: bool):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(s.b, s.h, s.n, s.d, generator=g, device=device, dtype=dtype).requires_grad_(grad)
               for _ in range(3))
    bias = torch.rand(s.b, 1, 1, s.n, generator=g, device=device).mul(3).add(1).log() if biased else None
    return q, k, v, bias


def _error_vs_float64(fn_out: torch.Tensor, q, k, v, bias, rows: int = 128) -> float:
    """Max error of the first ``rows`` query rows against float64 maths (rows are independent)."""
    qd, kd, vd = q[:, :, :rows].double(), k.double(), v.double()
    s = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.double()
    ref = torch.softmax(s, -1) @ vd
    return (fn_out[:, :, :rows].double() - ref).abs().max().item()


def bench_attention(shapes, dtype, device, dry: bool, sets: int, passes: list[str]) -> list[dict]:
    rows = []
    for s in shapes:
        for biased in (False, True):
            for pass_ in passes:
                backward = pass_ == "fwd+bwd"
                row = {"shape": s, "bias": "per-key" if biased else "none", "pass": pass_, "ms": {}, "err": {}}
                for name, make in methods(dry).items():
                    times = []
                    for seed in range(sets):
                        q, k, v, bias = _inputs(s, dtype, device, seed, biased, backward)
                        try:
                            fn = make(q, k, v, bias)
                            if fn is not None:
                                with torch.no_grad():
                                    first = fn()  # also the warm-up / compile
                        except Exception as e:  # noqa: BLE001 -- a method that cannot run is reported, not fatal
                            fn, row["err"][name] = None, f"error: {type(e).__name__}"
                        if fn is None:
                            break
                        if seed == 0 and not backward:
                            row["err"][name] = _error_vs_float64(first, q, k, v, bias)
                        times.append(_time_ms(_with_backward(fn, [q, k, v]) if backward else fn, dry))
                    if times:
                        row["ms"][name] = statistics.median(times)
                rows.append(row)
                print(_row_line(row), flush=True)
    return rows


def _row_line(row) -> str:
    s = row["shape"]
    best = min(row["ms"].items(), key=lambda kv: kv[1]) if row["ms"] else ("-", float("nan"))
    return f"{s.model:20s} bias={row['bias']:7s} {row['pass']:8s} best={best[0]} {best[1]:.3f} ms"


def bench_matching(shapes, dtype, device, dry: bool) -> list[dict]:
    def unfused(a, b):
        an = a / a.norm(dim=-1, keepdim=True)
        bn = b / b.norm(dim=-1, keepdim=True)
        return (an @ bn.transpose(-1, -2)).max(dim=-1)

    out = []
    for name, bsz, na, nb, c in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(bsz, na, c, generator=g, device=device, dtype=dtype)
        b = torch.randn(bsz, nb, c, generator=g, device=device, dtype=dtype)
        row = {"name": name, "shape": (bsz, na, nb, c), "ms": {"unfused PyTorch": _time_ms(lambda: unfused(a, b), dry)}}
        for backend in (("reference",) if dry else ("triton", "cuda")):
            try:
                match_tokens(a, b, backend=backend)
            except Exception as e:  # noqa: BLE001
                row["ms"][f"ours ({backend})"] = f"n/a: {e}"[:60]
                continue
            row["ms"][f"ours ({backend})"] = _time_ms(lambda: match_tokens(a, b, backend=backend), dry)
        out.append(row)
    return out


def attention_share(device, dtype, dry: bool) -> list[str]:
    """Share of one denoiser step's GPU time spent in attention kernels (SD1.5-like UNet, DiT-XL-like)."""
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile

    if dry:
        unet = UNet2DConditionModel(block_out_channels=(32, 64),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    layers_per_block=1, attention_head_dim=4, norm_num_groups=8, sample_size=16)
        dit = DiTTransformer2DModel(num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=8)
        res, ctx = 16, 32
    else:  # diffusers' defaults are SD1.5's UNet; DiT-XL/2 at 1024px latents (N=4096)
        unet = UNet2DConditionModel(cross_attention_dim=768)
        dit = DiTTransformer2DModel(sample_size=128)
        res, ctx = 64, 768
    lines = []
    for label, model, call in (
        ("UNet (SD1.5 config, 64x64 latent, B=2)" if not dry else "UNet (toy)", unet,
         lambda m: m(torch.randn(2, 4, res, res, device=device, dtype=dtype), 10,
                     encoder_hidden_states=torch.randn(2, 77, ctx, device=device, dtype=dtype))),
        ("DiT (XL/2 config, N=4096, B=2)" if not dry else "DiT (toy)", dit,
         lambda m: m(torch.randn(2, m.config.in_channels, m.config.sample_size, m.config.sample_size, device=device,
                                 dtype=dtype), timestep=torch.tensor([10, 10], device=device),
                     class_labels=torch.tensor([1, 2], device=device))),
    ):
        model = model.to(device=device, dtype=dtype).eval()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.no_grad():
            call(model)
            with profile(activities=activities) as prof:
                call(model)
        events = prof.key_averages()
        if device.type == "cuda":  # kernel rows only (op rows would count the same time twice)
            attr = "self_device_time_total"
            events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        else:
            attr = "self_cpu_time_total"
        total = sum(getattr(e, attr) for e in events)
        keys = ("attention", "flash", "fmha", "sdpa", "scaled_dot_product")
        attn = sum(getattr(e, attr) for e in events if any(k in e.key.lower() for k in keys))
        lines.append(f"| {label} | {100 * attn / max(total, 1e-9):.1f}% |")
        del model
    return lines


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=RESULTS_DIR.parent.parent, timeout=10).stdout.strip() or "uncommitted"
    except Exception:  # noqa: BLE001
        return "unknown"


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _err(x) -> str:
    return f"{x:.2e}" if isinstance(x, float) else str(x)


def render(rows, match_rows, share_lines, device_name: str, dtype, argv: list[str], dry: bool) -> str:
    import importlib.metadata as md

    versions = []
    for pkg in ("torch", "triton", "diffusers", "xformers"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    names = list(dict.fromkeys(n for r in rows for n in r["ms"]))
    lines = [
        "# Attention kernels" + (" (DRY RUN: toy sizes on CPU, numbers meaningless)" if dry else ""),
        "",
        f"- device: {device_name}",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- commit: {_commit()}",
        f"- versions: {', '.join(versions)}; python {platform.python_version()}",
        f"- command: `vision-eff bench attention {' '.join(argv)}`",
        f"- dtype: {str(dtype).replace('torch.', '')}; times are medians of triton.testing.do_bench over input sets; "
        "TFLOP/s in parentheses; err = max |out - float64| on the first 128 query rows (forward rows only)",
        "",
        "## Attention (ms, TFLOP/s)",
        "",
        "| shape | B,H,N,D | bias | pass | " + " | ".join(names) + " | ours vs best SDPA | ours err | best SDPA err |",
        "|" + "---|" * (7 + len(names)),
    ]
    for r in rows:
        s = r["shape"]
        cells = []
        for n in names:
            ms = r["ms"].get(n)
            cells.append("n/a" if ms is None else f"{ms:.3f} ({flops(s, r['pass'] == 'fwd+bwd') / ms / 1e9:.0f})")
        ours = next((v for k, v in r["err"].items() if k.startswith("ours")), "")
        sdpa = [v for k, v in r["err"].items() if k.startswith("SDPA") and isinstance(v, float)]
        ours_ms = next((v for k, v in r["ms"].items() if k.startswith("ours")), None)
        sdpa_ms = [v for k, v in r["ms"].items() if k.startswith("SDPA")]
        speed = f"{min(sdpa_ms) / ours_ms:.2f}x" if ours_ms and sdpa_ms else ""
        lines.append(f"| {s.model} | {s.b},{s.h},{s.n},{s.d} | {r['bias']} | {r['pass']} | " + " | ".join(cells)
                     + f" | {speed} | {_err(ours)} | {_err(min(sdpa)) if sdpa else ''} |")
    lines += ["", "## Fused token matching (ms)", "", "| shape | B,Na,Nb,C | method | ms |", "|---|---|---|---|"]
    for m in match_rows:
        for name, ms in m["ms"].items():
            lines.append(f"| {m['name']} | {','.join(map(str, m['shape']))} | {name} | {_fmt(ms)} |")
    lines += ["", "## Share of one denoiser step in attention kernels (profiler)", "", "| model | attention share |",
              "|---|---|", *share_lines, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="vision-eff bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--sets", type=int, default=3, help="input sets per measurement (median over them)")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    p.add_argument("--only", default="", help="substring filter on the shape names")
    p.add_argument("--no-profile", action="store_true", help="skip the UNet/DiT attention-share profile")
    p.add_argument("--out", type=Path, default=None, help="Markdown output (default cuda/results/attention_<gpu>.md)")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on CPU to check the script (no real numbers)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.dry_run:
        if args.out is None:
            p.error("--dry-run writes only where --out says (its numbers are meaningless)")
        device, name, dtype = torch.device("cpu"), f"CPU ({platform.processor() or platform.machine()})", torch.float32
        shapes, mshapes = DRY_SHAPES, DRY_MATCH
    else:
        if not torch.cuda.is_available():
            print("vision-eff bench attention needs a CUDA GPU (none is visible here), so no numbers were "
                  "produced. Run it on a GPU machine, or use --dry-run --out FILE to check the script on CPU.",
                  file=sys.stderr)
            return 2
        device, name = torch.device("cuda"), torch.cuda.get_device_name()
        shapes, mshapes = SHAPES, MATCH_SHAPES
    shapes = [s for s in shapes if args.only in s.model]
    passes = [x.strip() for x in args.passes.split(",") if x.strip()]
    bad = set(passes) - {"fwd", "fwd+bwd"}
    if bad:
        p.error(f"unknown passes {sorted(bad)}; use fwd and/or fwd+bwd")
    rows = bench_attention(shapes, dtype, device, args.dry_run, args.sets, passes)
    match_rows = bench_matching(mshapes, dtype, device, args.dry_run)
    share = [] if args.no_profile else attention_share(device, dtype, args.dry_run)
    text = render(rows, match_rows, share, name, dtype, argv, args.dry_run)
    out = args.out or RESULTS_DIR / f"attention_{name.replace(' ', '_').replace('/', '_')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0
