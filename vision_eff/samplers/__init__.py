"""Fast ODE samplers for diffusers pipelines, and per-model step-schedule optimization.

    from vision_eff.samplers import PCMultistepScheduler, optimize_schedule
    pipe.scheduler = PCMultistepScheduler.from_config(pipe.scheduler.config)
    optimize_schedule(pipe, nfe=6, out="unet6.json")
    pipe.scheduler = PCMultistepScheduler.from_config(pipe.scheduler.config, schedule="unet6.json")
"""
from .functional import SOLVERS, Solver, SolverState, sample
from .schedulers import SCHEDULERS, ExpMultistepScheduler, ODESchedulerBase, PCMultistepScheduler
from .schedules import NoiseSchedule, read_schedule_file, spacing

__all__ = ["SOLVERS", "Solver", "SolverState", "sample", "SCHEDULERS", "ODESchedulerBase", "PCMultistepScheduler",
           "ExpMultistepScheduler", "NoiseSchedule", "read_schedule_file", "spacing", "optimize_schedule",
           "use_schedule"]


def __getattr__(name):
    if name in ("optimize_schedule", "use_schedule"):
        from . import optimize

        return getattr(optimize, name)
    raise AttributeError(name)
