"""The evaluator: class accuracy, Frechet distance (FD) in the built-in classifier's feature space,
and PSNR/SSIM between an accelerated output and the reference output from the same noise.

Images are float tensors [N, 3, H, W] in [-1, 1] (the zoo's convention; a pipeline gives them
with ``output_type="latent"``). Pass ``[0, 1]`` images through ``from_unit()`` first.

FD protocol (what the README's numbers mean): features are the classifier's 128-d pooled
activations, statistics in float64. The reference set is the fixed held-out evaluation split
(2048 images). ``Evaluator.fd_floor(n)`` is the FD of ``n`` *real* training images against that
same reference: the noise floor for a generated set of size ``n`` (FD has a positive bias
that shrinks with n, so only numbers at the same n are comparable).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .zoo import data


def from_unit(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return images * 2 - 1


def _check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} must be a [N, 3, H, W] tensor in [-1, 1], got {shape}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or inf values")
    return images.float()


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1-mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2}), in float64.

    tr((C1 C2)^{1/2}) is computed as the sum of square roots of the eigenvalues of
    C1^{1/2} C2 C1^{1/2} (symmetric PSD), which avoids the complex sqrtm of a non-symmetric matrix.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    w1, v1 = np.linalg.eigh(cov1)
    s1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = s1 @ cov2 @ s1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(ev, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().cpu().numpy()
    if f.shape[0] < 2:
        raise ValueError("FD needs at least 2 images")
    return f.mean(0), np.cov(f, rowvar=False)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB between images in [-1, 1] (peak-to-peak range 2)."""
    a, b = _check_images(a, "a"), _check_images(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-20))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian window 11/1.5, K1=0.01, K2=0.03) on [0, 1] scale."""
    a, b = _check_images(a, "a"), _check_images(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    x, y = (a.double() + 1) / 2, (b.double() + 1) / 2
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(3, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=3)  # 'valid' windows, as in the reference implementation

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


@lru_cache(maxsize=2)
def _classifier(device: str):
    from .zoo import load_model

    return load_model("shapes-classifier", device=device)["classifier"]


class Evaluator:
    """Class accuracy and FD with the built-in classifier (weights: shapes-classifier)."""

    reference_size = data.EVAL_SIZE

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 256):
        self.device = str(device)
        self.model = _classifier(self.device)
        self.batch_size = batch_size
        self._ref: tuple[np.ndarray, np.ndarray] | None = None

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        images = _check_images(images)
        out = [self.model.features(images[i:i + self.batch_size].to(self.device)).cpu()
               for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        images = _check_images(images)
        return torch.cat([self.model(images[i:i + self.batch_size].to(self.device)).argmax(1).cpu()
                          for i in range(0, images.shape[0], self.batch_size)])

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        labels = torch.as_tensor(labels)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        return (self.predict(images) == labels.cpu()).float().mean().item()

    def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self._ref is None:
            x, _ = data.eval_split(32)
            self._ref = feature_stats(self.features(x))
        return self._ref

    def fd(self, images: torch.Tensor, other: torch.Tensor | None = None) -> float:
        """FD of ``images`` against ``other`` (default: the held-out evaluation split)."""
        mu1, c1 = feature_stats(self.features(images))
        mu2, c2 = feature_stats(self.features(other)) if other is not None else self.reference_stats()
        return frechet_distance(mu1, c1, mu2, c2)

    def fd_floor(self, n: int, seed_offset: int = 0) -> float:
        """FD of n real (training-split) images against the evaluation split: the noise floor at size n."""
        x, _ = data.batch("train", 10_000_000 + seed_offset * n, n, 32)
        return self.fd(x)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None) -> dict:
        """Accuracy and FD of a generated set, plus PSNR/SSIM to a reference set from the same noise."""
        out = {"n": int(images.shape[0]), "accuracy": self.accuracy(images, labels), "fd": self.fd(images)}
        if reference is not None:
            out["psnr"] = psnr(images, reference).mean().item()
            out["ssim"] = ssim(images, reference).mean().item()
        return out
