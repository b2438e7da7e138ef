import numpy as np
import pytest
import scipy.linalg
import torch

from vision_eff import metrics
from vision_eff.zoo import data


def test_frechet_distance_matches_scipy_sqrtm_in_float64():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.3 + 0.5
    mu1, c1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, c2 = b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean)
    assert metrics.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-8)
    assert metrics.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-8)


def test_psnr_exact():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[0] += 0.125  # exact in float32: mse 1/64 -> 10*log10(4*64)
    b[1, :, :4] += 0.25  # half the pixels off by 1/4: mse 1/32
    got = metrics.psnr(b, a)
    assert got[0].item() == pytest.approx(10 * np.log10(4 * 64), rel=1e-12)
    assert got[1].item() == pytest.approx(10 * np.log10(4 * 32), rel=1e-12)


def _ssim_naive(x, y, window=11, sigma=1.5):
    """Direct per-window float64 SSIM (independent loop implementation)."""
    x, y = (x.double() + 1) / 2, (y.double() + 1) / 2
    g = np.exp(-((np.arange(window) - (window - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for c in range(3):
        X, Y = x[c].numpy(), y[c].numpy()
        for i in range(X.shape[0] - window + 1):
            for j in range(X.shape[1] - window + 1):
                px, py = X[i:i + window, j:j + window], Y[i:i + window, j:j + window]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
                cxy = (w * px * py).sum() - mx * my
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_naive_window_loop():
    x, _ = data.batch("eval", 0, 2, 32)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    got = metrics.ssim(x, y)
    assert got[0].item() == pytest.approx(_ssim_naive(x[0], y[0]), rel=1e-9)
    assert metrics.ssim(x, x).sub(1).abs().max() < 1e-12


def test_metric_input_errors():
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        metrics.psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        metrics.psnr(torch.full((1, 3, 8, 8), float("nan")), torch.zeros(1, 3, 8, 8))


@pytest.fixture(scope="module")
def evaluator():
    return metrics.Evaluator()


def test_classifier_accuracy_on_held_out_split(evaluator):
    x, y = data.eval_split(32)
    assert evaluator.accuracy(x, y) >= 0.98


def test_fd_real_vs_real_near_floor_and_noise_far_above(evaluator):
    n = 512
    floor = evaluator.fd_floor(n)
    other_real = evaluator.fd_floor(n, seed_offset=1)  # a second, disjoint real set
    noise = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred_real, _ = data.batch("train", 20_000_000, n, 32)
    blurred_real = torch.nn.functional.avg_pool2d(blurred_real, 4)
    blurred_real = torch.nn.functional.interpolate(blurred_real, scale_factor=4, mode="nearest")
    assert abs(other_real - floor) < 0.5 * floor + 1e-6
    assert evaluator.fd(noise) > 20 * floor
    assert evaluator.fd(blurred_real) > 3 * floor  # FD sees degradation, not only garbage
