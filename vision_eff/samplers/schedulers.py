"""Drop-in diffusers schedulers around the solvers in ``functional.py``.

    pipe.scheduler = PCMultistepScheduler.from_config(pipe.scheduler.config)            # no tuning
    pipe.scheduler = PCMultistepScheduler.from_config(pipe.scheduler.config, schedule="unet6.json")

:class:`ODESchedulerBase` holds all of diffusers' bookkeeping (config, ``set_timesteps`` with
``num_inference_steps`` / ``timesteps`` / ``sigmas``, ``scale_model_input``, ``add_noise``, step and
begin index, prediction types, flow matching, low-precision samples); a concrete scheduler only names
its update rule (a :class:`~vision_eff.samplers.functional.Solver`). Timesteps are floats that map
exactly to the sigmas the solver uses (diffusers rounds them, so its model sees a slightly different
noise level than its solver assumes).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .functional import FittedSolver, Solver, SolverState, check_sigmas
from .schedules import SPACINGS, NoiseSchedule, check_schedule_matches, read_schedule_file, spacing

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


class ODESchedulerBase(SchedulerMixin, ConfigMixin):
    """Diffusers bookkeeping shared by our samplers; subclasses set ``corrector`` (the update rule).

    Schedule options: ``spacing="jump"`` (default: one call at sigma_max, then ``num_inference_steps - 1``
    calls uniform in log-SNR from ``20 * sigma_data`` down to ``0.2 * sigma_data``, then the final step
    to 0) or "polylog" / "karras" / "logsnr" / "time" from sigma_max to sigma_min. ``schedule`` is a
    schedule file from ``optimize_schedule`` (its optimized sigmas replace the spacing at the NFEs it has,
    and where it has fitted per-step coefficients for that NFE they replace the update rule, unless
    ``fitted_coefficients=False``; they apply to a whole run from the first step, so img2img from a later
    step falls back to the plain rule).
    """

    order = 1
    corrector: bool = True
    _compatibles: list[str] = []

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        spacing: str = "jump",
        sigma_data: float = 0.5,
        rho: float = 7.0,
        predictor_order: int = 3,
        final_step: str = "eps",
        final_order: int = 2,
        final_sigma: str = "zero",
        schedule: str | dict | None = None,
        fitted_coefficients: bool = True,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {', '.join(PREDICTION_TYPES)}")
        if use_flow_sigmas != (prediction_type == "flow_prediction"):
            raise ValueError("flow-matching models need use_flow_sigmas=True together with prediction_type='flow_prediction' "
                             "(from_config does this for a FlowMatch scheduler's config)")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing {spacing!r} is not supported; use one of {', '.join(SPACINGS)}")
        if final_sigma not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.solver = Solver(order=predictor_order, corrector=self.corrector, final=final_step, final_order=final_order)
        if use_flow_sigmas:
            self.noise = NoiseSchedule.flow_matching(num_train_timesteps)
        else:
            self.noise = NoiseSchedule.ddpm(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if schedule is not None:
            doc = read_schedule_file(str(schedule) if isinstance(schedule, Path) else schedule)
            check_schedule_matches(doc, self.noise, prediction_type)
            if not isinstance(schedule, dict):  # keep the schedule itself in the config: save_pretrained is self-contained
                self.register_to_config(schedule=doc)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._sig: list[float] = []
        self._step_index = None
        self._begin_index = None
        self._state = SolverState()

    # -- config compatibility -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As diffusers' ``from_config``; a FlowMatch scheduler's config turns on flow matching."""
        if config is not None and not isinstance(config, (str, Path)):
            config = dict(config)
            flow_match = str(config.get("_class_name", "")).startswith("FlowMatch") or (
                "shift" in config and "beta_schedule" not in config)
            if flow_match and "use_flow_sigmas" not in config:
                shift = config.pop("shift", 1.0)
                config.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # -- index bookkeeping (diffusers' conventions) ----------------------------------------------------
    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at ``timesteps[begin_index]`` (img2img); pipelines call this before the loop."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        ts = self.timesteps if schedule_timesteps is None else schedule_timesteps
        t = torch.as_tensor(timestep, dtype=torch.float64, device="cpu")
        return int((ts.double().cpu() - t).abs().argmin())

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    # -- schedule ---------------------------------------------------------------------------------
    def _default_sigmas(self, n: int) -> list[float]:
        cfg, ns = self.config, self.noise
        sched = cfg.schedule
        if sched is not None:
            if str(n) in sched["sigmas"]:
                return list(sched["sigmas"][str(n)])
            logger.warning("schedule file for %r has no schedule for %d steps (it has %s); using spacing %r",
                           sched["model"], n, ", ".join(sched["sigmas"]), cfg.spacing)
        shift = cfg.flow_shift if cfg.use_flow_sigmas else 1.0  # a flow shift multiplies sigma_ve
        return spacing(cfg.spacing, n, min(ns.sigma_min * shift, ns.sigma_max / 2), ns.sigma_max, ns, rho=cfg.rho,
                       sigma_data=cfg.sigma_data * shift).tolist()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None, mu=None):
        """Set the model calls: exactly one of ``num_inference_steps``, ``timesteps`` (model timesteps, strictly
        decreasing) or ``sigmas`` (the call noise levels: flow-matching s in (0, 1] for flow models, else
        sigma_vp / alpha_vp; a trailing 0 is taken as the terminal). ``mu`` (dynamic shifting) sets flow_shift."""
        given = [v is not None for v in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas to set_timesteps")
        ns = self.noise
        if mu is not None:
            if not self.config.use_flow_sigmas:
                raise ValueError("mu (dynamic shifting) only applies to flow-matching models")
            self.register_to_config(flow_shift=float(math.exp(mu)))
        terminal = 0.0 if self.config.final_sigma == "zero" else ns.sigma_min
        if num_inference_steps is not None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps (NFE) must be an integer >= 1, got {num_inference_steps!r}")
            s = self._default_sigmas(int(num_inference_steps))
            if terminal > 0 and s[-2] > terminal:
                s[-1] = terminal
        else:
            vals = np.asarray(timesteps if timesteps is not None else sigmas, dtype=np.float64).reshape(-1)
            if vals.size == 0:
                raise ValueError("custom timesteps / sigmas must be non-empty")
            if np.any(np.diff(vals) >= 0):
                kind = "timesteps" if timesteps is not None else "sigmas"
                raise ValueError(f"custom {kind} must be strictly decreasing without duplicates, got {vals.tolist()}")
            if timesteps is not None:
                if vals[0] > ns.num_train_timesteps or vals[-1] < 0:
                    raise ValueError(f"custom timesteps must lie in [0, {ns.num_train_timesteps}], got {vals.tolist()}")
                call = ns.t_to_sigma(vals)
                s = call.tolist() + [terminal]
            else:
                if self.config.use_flow_sigmas:
                    if vals[0] > 1 or vals[-1] < 0:
                        raise ValueError(f"flow-matching sigmas must lie in [0, 1], got {vals.tolist()}")
                    vals = np.where(vals >= 1, ns.sigma_max / (1 + ns.sigma_max), vals)
                    vals = vals / (1 - vals)
                s = vals.tolist() if vals[-1] == 0 else vals.tolist() + [terminal]
            if s[-2] <= s[-1]:
                s = s[:-1]
        s = check_sigmas(s)
        cfg = self.config
        order, sched = cfg.predictor_order, cfg.schedule
        key = str(num_inference_steps) if num_inference_steps is not None and sched is not None else None
        if key in (sched or {}).get("orders", {}):
            order = int(sched["orders"][key])  # the order the schedule was optimized with
        self._plain_solver = Solver(order=order, corrector=self.corrector, final=cfg.final_step, final_order=cfg.final_order)
        self.solver = self._plain_solver
        coefs = (sched or {}).get("coefficients", {}).get(key) if cfg.fitted_coefficients else None
        if coefs is not None and s == [float(v) for v in sched["sigmas"][key]]:
            self.solver = FittedSolver.from_rows(coefs)
        self._sig = s
        self.sigmas = torch.tensor(s, dtype=torch.float32)
        t = ns.sigma_to_t(np.asarray(s[:-1]))
        self.timesteps = torch.from_numpy(t).to(device=device, dtype=torch.float32)
        self.num_inference_steps = len(s) - 1
        self._step_index = None
        self._begin_index = None
        self._state = SolverState()

    # -- conversions ------------------------------------------------------------------------------
    def _alpha(self, sigma: float) -> float:
        return self.noise.alpha(sigma)

    def _to_denoised(self, out: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        a = self._alpha(sigma)
        st = sigma * a  # the noise std in the model's own sample space
        p = self.config.prediction_type
        if p == "epsilon":
            return (x - st * out) / a
        if p == "v_prediction":
            return a * x - st * out
        if p == "flow_prediction":
            return x - st * out
        return out

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **kwargs):
        """Advance ``sample`` from the current timestep to the next one given the model's output there."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise IndexError(f"step called {i + 1} times but the schedule has {self.num_inference_steps} steps; "
                             "call set_timesteps again to sample anew")
        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x, out = sample.to(work), model_output.to(work)
        sigma, sigma_next = self._sig[i], self._sig[i + 1]
        denoised = self._to_denoised(out, x, sigma)
        if isinstance(self.solver, FittedSolver) and self._state.calls != i:
            logger.warning("fitted coefficients apply from the first step; starting at step %d uses the plain solver", i)
            self.solver = self._plain_solver
        x_ve = self.solver.step(self._state, x / self._alpha(sigma), sigma, sigma_next, denoised)
        prev = (x_ve * self._alpha(sigma_next)).to(sample.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """alpha_t * x0 + sigma_t * noise at (possibly fractional) model timesteps, one per sample or shared."""
        t = torch.as_tensor(timesteps).reshape(-1).double().cpu().numpy()
        sig = self.noise.t_to_sigma(t)
        a = np.array([self._alpha(float(v)) for v in sig])
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        at = torch.as_tensor(a, dtype=original_samples.dtype, device=original_samples.device).reshape(shape)
        st = torch.as_tensor(a * sig, dtype=original_samples.dtype, device=original_samples.device).reshape(shape)
        return at * original_samples + st * noise

    def __len__(self):
        return self.config.num_train_timesteps


class PCMultistepScheduler(ODESchedulerBase):
    """Exponential predictor-corrector multistep (order ``predictor_order`` predictor, one higher corrector,
    reusing each model call: UniPC's structure with exact coefficients). Our default sampler."""

    corrector = True


class ExpMultistepScheduler(ODESchedulerBase):
    """Exponential Adams-Bashforth multistep on the data prediction (DPM-Solver++ kM with exact
    coefficients for any step sizes; ``predictor_order=1`` is DDIM)."""

    corrector = False


SCHEDULERS = {"pc": PCMultistepScheduler, "multistep": ExpMultistepScheduler}
