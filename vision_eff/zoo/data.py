"""Built-in data: procedurally generated, class-conditional RGB shapes.

Each image is one filled shape of a class drawn on a background. Everything that is
not the class is random: the shape's colour, size, position and rotation, and a
background that is either a two-colour linear gradient or a low-contrast texture
(stripes, checkerboard or smooth noise). The foreground colour is kept at a
distance from the background so the class is always visible.

Rendering is a vectorised signed-distance / implicit-function rasteriser in torch,
supersampled 4x per axis and box-filtered (anti-aliased), so a batch of 256 images at
32x32 takes a few milliseconds. Images are float tensors in [-1, 1], shape [N, 3, S, S].

Determinism: sample ``i`` of a split lives in chunk ``i // CHUNK`` whose random draws
come from a ``torch.Generator`` seeded with ``split_seed * 1_000_003 + chunk``; the same
(split, index, size) always gives the same image, on any machine, and the parameters do
not depend on the resolution (a 64x64 image is the same scene as its 32x32 twin).
The training stream and the held-out evaluation split use disjoint seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CLASSES = ("circle", "square", "triangle", "star", "ring", "cross", "crescent", "heart")
NUM_CLASSES = len(CLASSES)
SIZES = (32, 64)
CHUNK = 256
SUPERSAMPLE = 4
SPLIT_SEEDS = {"train": 1, "eval": 7919}
EVAL_SIZE = 2048  # fixed held-out evaluation split


@dataclass(frozen=True)
class SceneParams:
    labels: torch.Tensor  # [N] long
    center: torch.Tensor  # [N, 2] in [-1, 1] image coordinates
    radius: torch.Tensor  # [N] shape radius (half the image is 1.0)
    angle: torch.Tensor  # [N] rotation in radians
    fg: torch.Tensor  # [N, 3] in [0, 1]
    bg_a: torch.Tensor  # [N, 3]
    bg_b: torch.Tensor  # [N, 3]
    bg_kind: torch.Tensor  # [N] 0 gradient, 1 stripes, 2 checker, 3 smooth noise
    bg_angle: torch.Tensor  # [N]
    bg_freq: torch.Tensor  # [N]
    noise_seed: torch.Tensor  # [N, 4, 4] coarse noise for kind 3


def _draw_params(n: int, gen: torch.Generator, labels: torch.Tensor | None = None) -> SceneParams:
    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    drawn_labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    radius = u(n, lo=0.42, hi=0.72)
    margin = 1.0 - radius * 0.9
    center = (u(n, 2, lo=-1, hi=1)) * margin[:, None]
    angle = u(n, lo=0, hi=2 * math.pi)
    bg_a = u(n, 3)
    bg_b = (bg_a + u(n, 3, lo=-0.35, hi=0.35)).clamp(0, 1)
    # foreground: far from the background's mean colour (rejection by resampling a few times)
    fg = u(n, 3)
    bg_mean = (bg_a + bg_b) / 2
    for _ in range(8):
        bad = (fg - bg_mean).norm(dim=1) < 0.55
        fg = torch.where(bad[:, None], u(n, 3), fg)
    bad = (fg - bg_mean).norm(dim=1) < 0.55
    fg = torch.where(bad[:, None], 1.0 - bg_mean.round(), fg)  # the opposite corner of the cube
    bg_kind = torch.randint(0, 4, (n,), generator=gen)
    bg_angle = u(n, lo=0, hi=math.pi)
    bg_freq = u(n, lo=2.0, hi=5.0)
    noise_seed = u(n, 4, 4)
    return SceneParams(
        labels=drawn_labels if labels is None else labels.to(torch.long),
        center=center, radius=radius, angle=angle, fg=fg, bg_a=bg_a, bg_b=bg_b,
        bg_kind=bg_kind, bg_angle=bg_angle, bg_freq=bg_freq, noise_seed=noise_seed,
    )


def _box(p: torch.Tensor, hx: float | torch.Tensor, hy: float | torch.Tensor) -> torch.Tensor:
    dx = p[..., 0].abs() - hx
    dy = p[..., 1].abs() - hy
    outside = torch.stack([dx.clamp(min=0), dy.clamp(min=0)], -1).norm(dim=-1)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _polygon_inside(p: torch.Tensor, k: int) -> torch.Tensor:
    """Signed 'distance' of a regular k-gon of circumradius 1 (max over edge half-planes)."""
    ang = torch.atan2(p[..., 1], p[..., 0])
    sector = 2 * math.pi / k
    a = torch.remainder(ang + math.pi / 2, sector) - sector / 2
    r = p.norm(dim=-1)
    return r * torch.cos(a) - math.cos(math.pi / k)


def _shape_sdf(label: int, p: torch.Tensor) -> torch.Tensor:
    """Negative inside. ``p`` is in the shape's local frame, unit radius."""
    r = p.norm(dim=-1)
    if label == 0:  # circle
        return r - 0.85
    if label == 1:  # square
        return _box(p, 0.7, 0.7)
    if label == 2:  # triangle
        return _polygon_inside(p, 3) * 1.0 + 0.0
    if label == 3:  # five-pointed star: radius modulated between inner and outer
        ang = torch.atan2(p[..., 1], p[..., 0]) + math.pi / 2
        sector = 2 * math.pi / 5
        a = (torch.remainder(ang, sector) - sector / 2).abs() / (sector / 2)  # 0 at tip, 1 at notch
        rad = 1.0 - 0.58 * a
        return r - rad
    if label == 4:  # ring
        return (r - 0.68).abs() - 0.22
    if label == 5:  # plus-shaped cross
        return torch.minimum(_box(p, 0.9, 0.27), _box(p, 0.27, 0.9))
    if label == 6:  # crescent: disk minus an offset disk
        d1 = r - 0.9
        d2 = (p - p.new_tensor([0.45, 0.0])).norm(dim=-1) - 0.72
        return torch.maximum(d1, -d2)
    if label == 7:  # heart (implicit curve, scaled to unit radius)
        x = p[..., 0] * 1.25
        y = -p[..., 1] * 1.25 + 0.25
        f = (x * x + y * y - 1) ** 3 - x * x * y ** 3
        return f
    raise ValueError(f"unknown class {label}")


def _background(params: SceneParams, grid: torch.Tensor) -> torch.Tensor:
    n = params.labels.shape[0]
    x, y = grid[..., 0], grid[..., 1]  # [S, S]
    ca, sa = torch.cos(params.bg_angle), torch.sin(params.bg_angle)
    t_lin = (x[None] * ca[:, None, None] + y[None] * sa[:, None, None])  # [N, S, S] in ~[-1.4, 1.4]
    grad = (t_lin / 2.0 + 0.5).clamp(0, 1)
    freq = params.bg_freq[:, None, None]
    stripes = 0.5 + 0.5 * torch.sin(t_lin * freq * math.pi)
    checker = ((torch.floor((x[None] + 1) * freq) + torch.floor((y[None] + 1) * freq)) % 2).float()
    coarse = params.noise_seed[:, None]  # [N, 1, 4, 4]
    smooth = torch.nn.functional.interpolate(coarse, size=x.shape, mode="bicubic", align_corners=True)[:, 0]
    smooth = smooth.clamp(0, 1)
    kind = params.bg_kind[:, None, None]
    t = torch.where(kind == 0, grad, torch.where(kind == 1, stripes, torch.where(kind == 2, checker, smooth)))
    t = t[:, None]  # [N, 1, S, S]
    return params.bg_a[:, :, None, None] * (1 - t) + params.bg_b[:, :, None, None] * t


def render(params: SceneParams, size: int) -> torch.Tensor:
    """Render scenes to [N, 3, size, size] in [-1, 1]."""
    if size < 8:
        raise ValueError(f"image size must be at least 8, got {size}")
    s = size * SUPERSAMPLE
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    grid = torch.stack([xx, -yy], -1)  # y up
    n = params.labels.shape[0]
    cover = torch.empty(n, s, s)
    ca, sa = torch.cos(params.angle), torch.sin(params.angle)
    for label in range(NUM_CLASSES):
        idx = (params.labels == label).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        d = grid[None] - params.center[idx][:, None, None, :]
        c, si = ca[idx][:, None, None], sa[idx][:, None, None]
        local = torch.stack([c * d[..., 0] + si * d[..., 1], -si * d[..., 0] + c * d[..., 1]], -1)
        local = local / params.radius[idx][:, None, None, None]
        cover[idx] = (_shape_sdf(label, local) < 0).float()
    bg = _background(params, grid)
    shade = 0.85 + 0.15 * (grid[None, ..., 1] - params.center[:, None, None, 1] + 1) / 2  # soft top light
    fg = params.fg[:, :, None, None] * shade[:, None]
    img = bg * (1 - cover[:, None]) + fg.clamp(0, 1) * cover[:, None]
    img = torch.nn.functional.avg_pool2d(img, SUPERSAMPLE)
    return img * 2 - 1


def _chunk_generator(split: str, chunk: int) -> torch.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLIT_SEEDS)}")
    return torch.Generator().manual_seed(SPLIT_SEEDS[split] * 1_000_003 + chunk)


def chunk(split: str, index: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of chunk ``index`` (``CHUNK`` samples) of a split."""
    params = _draw_params(CHUNK, _chunk_generator(split, index))
    return render(params, size), params.labels


def batch(split: str, start: int, count: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``start .. start+count-1`` of a split (deterministic by index)."""
    if size not in SIZES:
        raise ValueError(f"built-in data comes at sizes {SIZES}, got {size}")
    images, labels = [], []
    first, last = start // CHUNK, (start + count - 1) // CHUNK
    for c in range(first, last + 1):
        x, y = chunk(split, c, size)
        lo = max(start - c * CHUNK, 0)
        hi = min(start + count - c * CHUNK, CHUNK)
        images.append(x[lo:hi])
        labels.append(y[lo:hi])
    return torch.cat(images), torch.cat(labels)


def eval_split(size: int = 32, count: int = EVAL_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed held-out evaluation split (never used for training)."""
    if count > EVAL_SIZE:
        raise ValueError(f"the evaluation split has {EVAL_SIZE} images, asked for {count}")
    return batch("eval", 0, count, size)


def render_labels(labels: torch.Tensor, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random scenes of the given classes (for class-balanced grids and reference sets)."""
    params = _draw_params(len(labels), torch.Generator().manual_seed(seed), labels=labels)
    return render(params, size)


class ShapesDataset(torch.utils.data.Dataset):
    """Map-style view of a split: ``ds[i] -> (image [3,S,S] in [-1,1], label)``."""

    def __init__(self, split: str = "train", size: int = 32, length: int | None = None):
        if split not in SPLIT_SEEDS:
            raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLIT_SEEDS)}")
        if size not in SIZES:
            raise ValueError(f"built-in data comes at sizes {SIZES}, got {size}")
        self.split, self.size = split, size
        self.length = length if length is not None else (EVAL_SIZE if split == "eval" else 1 << 20)
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        c = i // CHUNK
        if self._cache is None or self._cache[0] != c:
            self._cache = (c, *chunk(self.split, c, self.size))
        return self._cache[1][i % CHUNK], int(self._cache[2][i % CHUNK])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [N, S, S, 3] (what gets saved)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
