"""`vision-eff samplers optimize MODEL --nfe N [N ...] --out FILE`: per-model schedule optimization."""
from __future__ import annotations

import argparse
import json
import sys

from ..zoo import ZOO, diffusion_models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vision-eff samplers", description="sampler tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("optimize", help="optimize the step schedule of a built-in model for given NFEs",
                       description="Find the N call sigmas that best match a high-NFE trajectory on a few noise "
                                   "samples and write a schedule file for PCMultistepScheduler(schedule=FILE).")
    diffusion = diffusion_models()
    o.add_argument("model", choices=diffusion + ["oracle"], help="built-in model, or 'oracle' (the Gaussian mixture)")
    o.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10], help="model calls to optimize for")
    o.add_argument("--out", required=True, help="schedule file to write (JSON)")
    o.add_argument("--samples", type=int, default=64, help="tuning noise samples (32-256)")
    o.add_argument("--seed", type=int, default=1234, help="tuning noise seed (use other noise to evaluate)")
    o.add_argument("--evals", type=int, default=60, help="sampler runs per NFE (each costs samples x NFE calls)")
    o.add_argument("--reference-nfe", type=int, default=100)
    o.add_argument("--order", type=int, default=3, choices=[1, 2, 3, 4], help="predictor order of the sampler")
    o.add_argument("--sigma-data", type=float, nargs="+", default=[0.5],
                   help="start schedules ('jump' at each data scale; several = multi-start)")
    o.add_argument("--orders", type=int, nargs="+", default=None, choices=[1, 2, 3, 4],
                   help="also search over these predictor orders (the file records the best per NFE)")
    o.add_argument("--fit-coefficients", action="store_true",
                   help="also fit per-step update coefficients to each candidate schedule (kept where they win on "
                        "held-out tuning noise; costs samples x reference-nfe more calls per candidate)")
    o.add_argument("--history", type=int, default=3, help="past model outputs per fitted step")
    o.add_argument("--no-warm-start", action="store_true",
                   help="do not also start each NFE's search from the previous NFE's optimized schedule")
    o.add_argument("--restarts", type=int, default=0,
                   help="rerun Nelder-Mead this many times from where it stopped (each another --evals)")
    o.add_argument("--guidance", type=float, default=1.0)
    o.add_argument("--batch", type=int, default=64)
    a = p.parse_args(argv)
    if any(n < 1 for n in a.nfe):
        p.exit(2, f"vision-eff samplers optimize: error: --nfe values must be >= 1, got {a.nfe}\n")
    if a.history < 1:
        p.exit(2, "vision-eff samplers optimize: error: --history must be >= 1\n")
    if a.restarts < 0:
        p.exit(2, "vision-eff samplers optimize: error: --restarts must be >= 0\n")
    if a.samples < 2 or a.evals < 1:
        p.exit(2, "vision-eff samplers optimize: error: --samples must be >= 2 and --evals >= 1\n")
    import torch

    from .functional import Solver
    from .optimize import optimize_schedule

    if a.model == "oracle":
        from .oracle import digits_mixture

        target = digits_mixture()
    else:
        target = a.model
    torch.manual_seed(0)
    doc = optimize_schedule(target, nfe=a.nfe, out=a.out, samples=a.samples, seed=a.seed, max_evals=a.evals,
                            reference_nfe=a.reference_nfe, solver=Solver(order=a.order, corrector=True),
                            guidance_scale=a.guidance, batch_size=a.batch, sigma_data=a.sigma_data, orders=a.orders,
                            coefficients=a.fit_coefficients, history=a.history, warm_start=not a.no_warm_start,
                            restarts=a.restarts)
    rep = doc["report"]
    for n in a.nfe:
        if str(n) in rep:
            r = rep[str(n)]
            print(f"NFE {n}: tuning RMSE {r['rmse_before']:.4f} -> {r['rmse_after']:.4f} "
                  f"({r['rmse_after'] / r['rmse_before']:.2f}x)  sigmas {[round(s, 4) for s in doc['sigmas'][str(n)]]}")
            if r.get("fitted_coefficients"):
                print("        with fitted per-step coefficients (they won on held-out tuning noise)")
    print(f"wrote {a.out} ({rep['model_calls']} model calls, {rep['seconds']}s); load it with "
          f"PCMultistepScheduler.from_config(pipe.scheduler.config, schedule={json.dumps(a.out)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
