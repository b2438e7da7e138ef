"""distill/label_use.py: the x0 errors it reports, against an oracle denoiser."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

from vision_eff.zoo.models import NUM_CLASSES


def _study():
    path = Path(__file__).resolve().parents[1] / "distill" / "label_use.py"
    spec = importlib.util.spec_from_file_location("label_use", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Oracle:
    """Knows x0 and the noise: predicts them exactly for the true labels, and x0 + 0.1 for any other."""

    def __init__(self, x0, noise, labels, a, kind):
        self.x0, self.noise, self.labels, self.a = x0, noise, labels, a
        self.scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type=kind))

    def _denoise(self, xt, t, labels):
        x0 = self.x0 + 0.1 * (labels != self.labels).view(-1, 1, 1, 1)
        sa, sb = self.a.sqrt(), (1 - self.a).sqrt()
        eps = (xt - sa * x0) / sb
        return {"epsilon": eps, "v_prediction": sa * eps - sb * x0, "sample": x0}[self.scheduler.config.prediction_type]


def test_x0_errors_are_zero_for_the_oracle_and_the_squared_offset_otherwise():
    study = _study()
    torch.manual_seed(0)
    x0, noise = torch.rand(6, 3, 8, 8) * 2 - 1, torch.randn(6, 3, 8, 8)
    labels = torch.arange(6) % NUM_CLASSES
    alphas = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64).float()
    others = {"wrong": (labels + 1) % NUM_CLASSES, "half": torch.where(labels % 2 == 0, labels, labels + 1)}
    for kind in ("epsilon", "v_prediction", "sample"):
        pipe = _Oracle(x0, noise, labels, alphas[300].view(1, 1, 1, 1), kind)
        e = study.x0_errors(pipe, x0, labels, 300, noise, alphas, others)
        assert e["true"] < 1e-9
        assert abs(e["wrong"] - 0.01) < 1e-6  # every image off by 0.1 everywhere
        assert abs(e["half"] - 0.005) < 1e-6  # half of them
