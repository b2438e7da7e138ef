"""Noise schedules and sampling-step spacings (sigma is always the variance-exploding sigma_vp / alpha_vp).

* :class:`NoiseSchedule` - the model's training schedule (diffusers' DDPM betas, or flow matching) and the
  continuous maps sigma <-> timestep the model is called with (log-sigma interpolation between the
  discrete training timesteps, as diffusers' ``_sigma_to_t``; timesteps are not rounded).
* ``spacing(name, n, sigma_min, sigma_max)`` - n + 1 decreasing sigmas ending at 0 (``SPACINGS``).
* schedule files: JSON written by ``optimize_schedule`` and read by our schedulers.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SCHEDULE_FILE_VERSION = 1


def ddpm_alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                        trained_betas=None) -> np.ndarray:
    """diffusers' training alphas_cumprod (float64) for the beta schedules it names."""
    n = num_train_timesteps
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; use 'linear', 'scaled_linear', "
                         "'squaredcos_cap_v2' or pass trained_betas")
    return np.cumprod(1.0 - betas)


@dataclass(frozen=True)
class NoiseSchedule:
    """sigma <-> model timestep, and VP / flow coefficients, for one trained model."""

    log_sigmas: tuple[float, ...] | None  # ascending, one per training timestep (None: flow matching)
    num_train_timesteps: int
    flow: bool = False

    @classmethod
    def ddpm(cls, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", trained_betas=None):
        ac = ddpm_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        return cls(tuple(np.log(np.sqrt((1 - ac) / ac)).tolist()), num_train_timesteps)

    @classmethod
    def flow_matching(cls, num_train_timesteps=1000):
        return cls(None, num_train_timesteps, flow=True)

    @property
    def sigma_min(self) -> float:
        return 1.0 / (self.num_train_timesteps - 1) if self.flow else math.exp(self.log_sigmas[0])

    @property
    def sigma_max(self) -> float:
        if self.flow:  # diffusers' flow sigmas stop at s = 1 - 1/T, where sigma_ve = (T - 1)
            return float(self.num_train_timesteps - 1)
        return math.exp(self.log_sigmas[-1])

    def sigma_to_t(self, sigma: np.ndarray) -> np.ndarray:
        sigma = np.asarray(sigma, dtype=np.float64)
        if self.flow:
            return sigma / (1 + sigma) * self.num_train_timesteps
        ls = np.asarray(self.log_sigmas)
        return np.interp(np.log(np.maximum(sigma, 1e-20)), ls, np.arange(len(ls), dtype=np.float64))

    def t_to_sigma(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        if self.flow:
            s = np.clip(t / self.num_train_timesteps, 0, 1 - 1e-6)
            return s / (1 - s)
        ls = np.asarray(self.log_sigmas)
        return np.exp(np.interp(t, np.arange(len(ls), dtype=np.float64), ls))

    def alpha(self, sigma: float) -> float:
        """Scale of the data in the model's sample: x_model = alpha * x_ve."""
        if math.isinf(sigma):
            return 0.0
        return 1.0 / (1.0 + sigma) if self.flow else 1.0 / math.sqrt(1.0 + sigma * sigma)

    def identity(self) -> dict:
        """What a schedule file must match to be loaded."""
        if self.flow:
            return {"kind": "flow", "num_train_timesteps": self.num_train_timesteps}
        h = hashlib.sha256(np.asarray(self.log_sigmas, dtype=np.float64).round(10).tobytes()).hexdigest()[:16]
        return {"kind": "ddpm", "num_train_timesteps": self.num_train_timesteps, "log_sigmas_sha": h}


def _karras(n, lo, hi, rho=7.0):
    r = np.linspace(0, 1, n)
    return (hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _loglinear(n, lo, hi):
    return np.exp(np.linspace(math.log(hi), math.log(lo), n))


def spacing(name: str, n: int, sigma_min: float, sigma_max: float, schedule: NoiseSchedule | None = None,
            rho: float = 7.0, sigma_data: float = 0.5) -> np.ndarray:
    """``n`` model-call sigmas from sigma_max down to sigma_min, followed by 0 (n + 1 values).

    "jump" (our default): one call at sigma_max, then n - 1 calls uniform in log-SNR from
    ``min(20 sigma_data, sigma_max)`` to ``max(0.2 sigma_data, sigma_min)``: the first step is a large
    DDIM jump through the region where the data still looks Gaussian, and the last call stays at a
    moderate noise level from which the final step integrates to 0. "karras" (EDM, exponent ``rho``), "logsnr" (uniform in log sigma = uniform logSNR, diffusers'
    use_lu_lambdas), "time" (uniform in the training timestep, needs ``schedule``), "polylog"
    (our default: the mean of karras rho=7 and logsnr spacings in log sigma, a compromise that stays
    fine at both ends).
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of model calls (NFE) must be an integer >= 1, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if n == 1:
        s = np.array([sigma_max])
    elif name == "jump":
        hi, lo = min(20 * sigma_data, sigma_max), max(0.2 * sigma_data, sigma_min)
        if hi <= lo or hi >= sigma_max:
            return spacing("logsnr", n, lo if lo < sigma_max else sigma_min, sigma_max)
        s = np.concatenate([[sigma_max], _loglinear(n - 1, lo, hi)])
    elif name == "karras":
        s = _karras(n, sigma_min, sigma_max, rho)
    elif name == "logsnr":
        s = _loglinear(n, sigma_min, sigma_max)
    elif name == "polylog":
        s = np.exp(0.5 * (np.log(_karras(n, sigma_min, sigma_max, rho)) + np.log(_loglinear(n, sigma_min, sigma_max))))
    elif name == "time":
        if schedule is None:
            raise ValueError("the 'time' spacing needs the model's noise schedule")
        t = np.linspace(schedule.sigma_to_t(sigma_max), schedule.sigma_to_t(sigma_min), n)
        s = schedule.t_to_sigma(t)
    else:
        raise ValueError(f"unknown spacing {name!r}; choose one of {', '.join(SPACINGS)}")
    return np.concatenate([s, [0.0]])


SPACINGS = ("jump", "polylog", "karras", "logsnr", "time")


def model_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a model's parameter names, shapes and values (which model a schedule was tuned for)."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        if p.is_floating_point() and p.numel():
            t = p.detach().double().flatten()
            h.update(np.float64([t.sum().item(), t.abs().sum().item(), t[: 16].sum().item()]).round(6).tobytes())
    return h.hexdigest()[:16]


def save_schedule_file(path: str | Path, *, model: str, fingerprint: str | None, noise: NoiseSchedule,
                       prediction_type: str, solver: dict, schedules: dict[int, list[float]], report: dict,
                       orders: dict[int, int] | None = None,
                       coefficients: dict[int, list[list[float]]] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": "vision-eff-schedule", "version": SCHEDULE_FILE_VERSION, "model": model,
           "fingerprint": fingerprint, "noise_schedule": noise.identity(), "prediction_type": prediction_type,
           "solver": solver, "sigmas": {str(k): [float(v) for v in s] for k, s in sorted(schedules.items())},
           "orders": {str(k): int(v) for k, v in sorted((orders or {}).items())}, "report": report}
    if coefficients:
        doc["coefficients"] = {str(k): [[float(v) for v in row] for row in c] for k, c in sorted(coefficients.items())}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def read_schedule_file(path: str | Path | dict) -> dict:
    """Parse and validate a schedule file (or an already loaded dict)."""
    doc = path if isinstance(path, dict) else None
    if doc is None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"schedule file {str(p)!r} not found; make one with "
                                    "`vision-eff samplers optimize MODEL --nfe N --out FILE`")
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(p)!r} is not a schedule file (invalid JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "vision-eff-schedule":
        raise ValueError(f"{path!r} is not a vision-eff schedule file (made by `vision-eff samplers optimize`)")
    if doc.get("version") != SCHEDULE_FILE_VERSION:
        raise ValueError(f"schedule file version {doc.get('version')} is not supported (expected {SCHEDULE_FILE_VERSION})")
    for n, rows in (doc.get("coefficients") or {}).items():
        if n not in doc.get("sigmas", {}) or len(rows) != len(doc["sigmas"][n]) - 1:
            raise ValueError(f"schedule file for {doc.get('model')!r}: the fitted coefficients for NFE {n} do not match its sigmas "
                             "(one row per step): the file is corrupt; optimize the schedule again")
    return doc


def check_schedule_matches(doc: dict, noise: NoiseSchedule, prediction_type: str, fingerprint: str | None = None) -> None:
    """Raise a clear error when a schedule file was made for another model."""
    ident = noise.identity()
    if doc["noise_schedule"] != ident:
        raise ValueError(f"schedule file for model {doc['model']!r} was optimized for noise schedule "
                         f"{doc['noise_schedule']}, but this scheduler has {ident}: optimize a schedule for this model "
                         "with `vision-eff samplers optimize`")
    if doc["prediction_type"] != prediction_type:
        raise ValueError(f"schedule file for model {doc['model']!r} was optimized for prediction_type "
                         f"{doc['prediction_type']!r}, but this scheduler uses {prediction_type!r}")
    if fingerprint is not None and doc.get("fingerprint") not in (None, fingerprint):
        raise ValueError(f"schedule file was optimized for model {doc['model']!r} (fingerprint {doc['fingerprint']}), "
                         f"not this model (fingerprint {fingerprint}): optimize a schedule for this model")
