"""Pictures and the gallery page (``gallery/README.md``).

The page is made of named sections between ``<!-- BEGIN name -->`` / ``<!-- END name -->``
markers; each command that produces pictures rewrites only its own section, with the
numbers, the machine, the commit and the exact command that made it.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
GALLERY = REPO_ROOT / "gallery"
PAGE_HEADER = """# vision-eff gallery

Every picture and number here is written by a command in this repository; each section names its
command, the machine and the commit. Rerun the command to reproduce it.
"""


def git_commit(short: bool = True) -> str:
    try:
        args = ["git", "rev-parse", "--short" if short else "--verify", "HEAD"]
        out = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(prog: str, argv: Sequence[str] | None = None) -> str:
    """``prog`` and its arguments (``sys.argv[1:]`` by default), shell-quoted so the line can be rerun, after
    the allocator's environment variables that are set (GLIBC_TUNABLES, LD_PRELOAD, MALLOC_*): they move CPU
    timings (page faults, see ``vision_eff._timing.keep_freed_memory``)."""
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
           if k in ("GLIBC_TUNABLES", "LD_PRELOAD") or k.startswith("MALLOC_")]
    return " ".join([*env, prog, *(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))])


def provenance(command: str | None = None) -> str:
    """One Markdown line: command, machine, library versions, commit, date."""
    import diffusers

    cmd = command or command_line("vision-eff")
    cpu = f"{platform.machine()}, {torch.get_num_threads()} threads"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({cpu})"
    return (f"`{cmd}` on {dev}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
            f"commit {git_commit()}; {_dt.date.today().isoformat()}")


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2, scale: int = 1):
    """[N,3,H,W] in [-1,1] -> a PIL image with ``nrow`` images per row."""
    from PIL import Image

    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y:y + h, x:x + w] = images[i]
    img = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def labelled_panels(panels: Sequence[tuple[str, torch.Tensor]], nrow: int, scale: int = 3, per_row: int | None = None):
    """Grids with a caption above each (e.g. reference vs accelerated), ``per_row`` panels to a row
    (default: all in one row)."""
    from PIL import Image, ImageDraw

    if per_row is not None and per_row < 1:
        raise ValueError(f"per_row must be >= 1, got {per_row}")
    grids = [image_grid(x, nrow, scale=scale) for _, x in panels]
    per_row = per_row or len(grids)
    cap, gap = 18, 12
    cell_w, cell_h = max(g.width for g in grids), max(g.height for g in grids) + cap
    rows = -(-len(grids) // per_row)
    cols = min(per_row, len(grids))
    out = Image.new("RGB", (cols * cell_w + gap * (cols - 1), rows * cell_h + gap * (rows - 1)), "white")
    draw = ImageDraw.Draw(out)
    for k, ((title, _), g) in enumerate(zip(panels, grids)):
        x, y = (k % per_row) * (cell_w + gap), (k // per_row) * (cell_h + gap)
        draw.text((x + 4, y + 3), title, fill="black")
        out.paste(g, (x, y + cap))
    return out


def check_writable(path: str | Path) -> Path:
    """Fail early, with the fix, when an output path cannot be written."""
    path = Path(path)
    parent = path.parent if path.suffix else path
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / ".vision-eff-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"cannot write to {parent} ({exc.strerror or exc}); choose another --out") from None
    return path


def update_section(name: str, markdown: str, page: Path | None = None) -> Path:
    """Replace (or append) section ``name`` of the gallery page."""
    page = page or GALLERY / "README.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    text = page.read_text() if page.exists() else PAGE_HEADER
    block = f"<!-- BEGIN {name} -->\n{markdown.strip()}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    page.write_text(text)
    return page


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".3g") -> str:
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
