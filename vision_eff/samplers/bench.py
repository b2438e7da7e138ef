"""`vision-eff bench samplers`: our samplers beside diffusers' strongest scheduler configurations.

Part 1, the exact oracle (``oracle.py``): every configuration samples the digits Gaussian mixture from the
same noise through the same VP epsilon-prediction "model" (the closed-form denoiser), and is scored by
RMSE to the probability-flow ODE endpoint from the same noise and start time (scipy, rtol 1e-9, checked
against 1e-11) and by FD to the true mixture. Schedules are optimized on other noise (``--tune-seed``).

Part 2, the built-in models: class accuracy and FD (``vision_eff.metrics.Evaluator``) and RMSE to a
200-step (``--ref-steps``) diffusers DPM-Solver++ reference from the same noise, through the real pipeline with
``pipe.scheduler = X.from_config(pipe.scheduler.config)``.

Tables go to ``samplers/results/`` and a grid to ``gallery/samplers/``.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..gallery import REPO_ROOT, command_line, labelled_panels, markdown_table, provenance, update_section
from .oracle import checked_endpoint, digits_mixture, gaussian_fd
from .schedulers import ExpMultistepScheduler, PCMultistepScheduler
from .schedules import NoiseSchedule

BASE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")

# diffusers at its strongest: every spacing / final-sigma option of its best ODE solvers
_SPACINGS = {"": {}, "-trailing": dict(timestep_spacing="trailing"), "-karras": dict(use_karras_sigmas=True)}
PEERS: dict[str, tuple[str, dict]] = {}
for _order in (2, 3):
    for _sp, _kw in {**_SPACINGS, "-lu": dict(use_lu_lambdas=True), "-exp": dict(use_exponential_sigmas=True)}.items():
        for _fin in ("zero", "sigma_min"):
            PEERS[f"dpm++{_order}m{_sp}" + ("-smin" if _fin == "sigma_min" else "")] = (
                "DPMSolverMultistepScheduler", dict(solver_order=_order, final_sigmas_type=_fin, **_kw))
for _st in ("bh1", "bh2"):
    for _sp, _kw in _SPACINGS.items():
        for _fin in ("zero", "sigma_min"):
            PEERS[f"unipc-{_st}{_sp}" + ("-smin" if _fin == "sigma_min" else "")] = (
                "UniPCMultistepScheduler", dict(solver_type=_st, final_sigmas_type=_fin, **_kw))
for _order in (2, 3):
    for _sp, _kw in _SPACINGS.items():
        PEERS[f"deis{_order}{_sp}"] = ("DEISMultistepScheduler", dict(solver_order=_order, **_kw))
PEERS.update({
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True)),
    "ddim-trailing": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")),
    "ddim-linspace": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing="linspace")),
    "euler-karras": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    "euler-trailing": ("EulerDiscreteScheduler", dict(timestep_spacing="trailing")),
    "heun-karras": ("HeunDiscreteScheduler", dict(use_karras_sigmas=True)),
    "lms-karras": ("LMSDiscreteScheduler", dict(use_karras_sigmas=True)),
    "dpm++2s-karras": ("DPMSolverSinglestepScheduler", dict(use_karras_sigmas=True)),
})
# the shortlist run on the built-in models (each model call costs real time there)
MODEL_PEERS = ["dpm++2m", "dpm++2m-karras", "dpm++3m-lu", "unipc-bh1-trailing-smin", "unipc-bh2-smin", "deis3",
               "ddim-trailing"]
OURS = {"pc3": (PCMultistepScheduler, {}), "pc2": (PCMultistepScheduler, dict(predictor_order=2)),
        "exp3m": (ExpMultistepScheduler, {})}


def peer_scheduler(name: str, config: dict):
    import diffusers

    cls_name, kw = PEERS[name]
    # as keyword arguments: merged into the dict, diffusers drops every key its `_use_default_values` lists
    return getattr(diffusers, cls_name).from_config(config, **kw)


def steps_for(name: str, nfe: int) -> int | None:
    """num_inference_steps that makes ``nfe`` model calls (Heun: 2 calls per step except the last)."""
    if name.startswith("heun"):
        return (nfe + 1) // 2 if nfe % 2 else None
    return nfe


@torch.no_grad()
def run_loop(sched, model, noise: torch.Tensor, steps: int) -> tuple[torch.Tensor, int, float]:
    """A pipeline's denoising loop; returns the final sample, the model calls made and the start timestep."""
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    calls = 0
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t)
        calls += 1
        x = sched.step(out, t, x).prev_sample
    return x, calls, float(sched.timesteps[0])


def oracle_model(mixture, noise: NoiseSchedule):
    """The mixture as a VP epsilon-prediction model: (x, t) -> eps, exact in float64, returned in x's dtype."""
    def model(x, t):
        s = float(noise.t_to_sigma(float(t)))
        a = 1 / math.sqrt(1 + s * s)
        d = mixture.denoise(x.double() / a, s)
        return ((x.double() - a * d) / (s * a)).to(x.dtype)
    return model


def oracle_bench(nfes, n_eval, seed, tune_seed, n_tune, tune_evals, opt_nfes=(4, 5, 6, 8, 10), log=print,
                 history: int = 4, restarts: int = 2) -> dict:
    from .optimize import optimize_schedule

    mix = digits_mixture()
    ns = NoiseSchedule.ddpm(**BASE)
    model = oracle_model(mix, ns)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_eval, mix.dim, generator=g, dtype=torch.float64)
    refs, conv = {}, {}
    m_true, c_true = mix.mean_cov()
    floor = gaussian_fd(mix.sample(n_eval, torch.Generator().manual_seed(seed + 1)), m_true, c_true)

    def score(x, t0):
        key = round(t0, 4)
        if key not in refs:
            s0 = float(ns.t_to_sigma(t0))
            refs[key], conv[key] = checked_endpoint(mix, noise * math.sqrt(1 + s0 * s0), s0)
        return ((x.double() - refs[key]) ** 2).mean().sqrt().item(), gaussian_fd(x, m_true, c_true)

    t0 = time.time()
    opt = optimize_schedule(mix, nfe=list(opt_nfes), samples=n_tune, seed=tune_seed, max_evals=tune_evals,
                            progress=False, orders=(2, 3), sigma_data=(0.25, 0.5), coefficients=history > 0,
                            history=max(history, 1), restarts=restarts)
    log(f"oracle: schedules optimized in {time.time() - t0:.0f}s")
    configs = {**{f"ours:{k}": (lambda k=k: OURS[k][0].from_config(BASE, **OURS[k][1])) for k in OURS},
               "ours:pc+opt": lambda: PCMultistepScheduler.from_config(BASE, schedule=opt, fitted_coefficients=False),
               "ours:pc+opt+fit": lambda: PCMultistepScheduler.from_config(BASE, schedule=opt),
               **{name: (lambda name=name: peer_scheduler(name, BASE)) for name in PEERS}}
    rmse, fd = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in configs.items():
            for n in nfes:
                steps = steps_for(name, n)
                if steps is None or ("+opt" in name and n not in opt_nfes) or (
                        name.endswith("+fit") and str(n) not in opt.get("coefficients", {})):
                    continue
                try:
                    x, calls, ts = run_loop(make(), model, noise.float(), steps)
                except Exception as e:  # a diffusers config that rejects this setting
                    log(f"  {name} NFE {n}: {type(e).__name__}: {str(e)[:80]}")
                    continue
                if calls != n:
                    continue
                r, f = score(x, ts) if torch.isfinite(x).all() else (float("nan"), float("nan"))
                rmse[name, n], fd[name, n] = r, f
            log(f"  {name}: " + " ".join(f"{rmse.get((name, n), float('nan')):.4f}" for n in nfes))
    return {"rmse": rmse, "fd": fd, "floor": floor, "convergence": max(conv.values()), "opt": opt,
            "n_eval": n_eval, "n_tune": n_tune, "restarts": restarts}


def _best(table: dict, names, n):
    vals = [(table[k, n], k) for k in names if (k, n) in table and math.isfinite(table[k, n])]
    return min(vals) if vals else (float("nan"), "-")


def oracle_markdown(res: dict, nfes, command: str) -> str:
    rmse, fd = res["rmse"], res["fd"]
    names = sorted({k for k, _ in rmse})
    peers = [k for k in names if not k.startswith("ours")]
    ours_plain = [k for k in names if k.startswith("ours") and "+opt" not in k]
    rows = []
    for n in nfes:
        d, dn = _best(rmse, peers, n)
        o, on = _best(rmse, ours_plain, n)
        # the optimized configuration is the file's own choice: fitted coefficients where it kept them
        pn = "ours:pc+opt+fit" if ("ours:pc+opt+fit", n) in rmse else "ours:pc+opt"
        p = rmse.get((pn, n), float("nan"))  # nan: no schedule optimized for this NFE
        rows.append({"NFE": n, "diffusers best": f"{d:.4f} ({dn})", "ours, no tuning": f"{o:.4f} ({on})",
                     "ratio": f"{o / d:.2f}", "ours, optimized": f"{p:.4f} ({pn})", "ratio opt": f"{p / d:.2f}",
                     "FD diffusers best": f"{_best(fd, peers, n)[0]:.3f}", "FD ours opt": f"{fd.get((pn, n), float('nan')):.3f}"})
    full = [{"config": k, **{f"NFE {n}": (f"{rmse[k, n]:.4f}" if (k, n) in rmse else "") for n in nfes}} for k in
            sorted(names, key=lambda k: np.nanmean([rmse.get((k, n), np.nan) for n in nfes[:4]] or [np.nan]))]
    return "\n\n".join([
        "# Sampler benchmark: exact Gaussian-mixture oracle (sklearn digits, 16 components, 64-d)",
        provenance(command),
        f"RMSE to the probability-flow ODE endpoint from the same noise and start time ({res['n_eval']} evaluation "
        f"samples; reference solved with DOP853 at rtol 1e-11, max change vs rtol 1e-9: {res['convergence']:.1e}); "
        f"FD to the true mixture (floor for {res['n_eval']} true samples: {res['floor']:.3f}). Optimized schedules were "
        f"tuned on {res['n_tune']} other noise samples ({res.get('restarts', 0)} Nelder-Mead restarts; `ours:pc+opt`: optimized sigmas; `ours:pc+opt+fit`: the same "
        "sigmas with per-step coefficients fitted to the tuning trajectories, where they won on held-out tuning noise). Data in [-1, 1]; every sampler runs float32 through the "
        "diffusers step API; NFE = model calls.",
        "## Summary (ratio = ours / diffusers' best at the same NFE; goal <= 0.8 untuned, <= 0.5 optimized)",
        markdown_table(rows),
        "## RMSE of every configuration", markdown_table(full),
    ]) + "\n"


def _pipe_images(pipe, labels, noise, steps, guidance, batch):
    out = []
    for i in range(0, len(labels), batch):
        out.append(pipe.decode_latents(pipe(class_labels=labels[i:i + batch], num_inference_steps=steps,
                                            guidance_scale=guidance, latents=noise[i:i + batch],
                                            output_type="latent").images))
    return torch.cat(out)


def model_generate(model_name, nfes, n_images, seed, guidance, batch, schedule_file, ref_steps, log=print,
                   peers=None) -> dict:
    """Images from every configuration at every NFE (same noise and labels), and the reference."""
    from ..zoo import load_pipeline

    pipe = load_pipeline(model_name)
    base_config = dict(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_images, *pipe.latent_shape, generator=g)
    labels = torch.arange(n_images) % 8
    t0 = time.time()
    pipe.scheduler = peer_scheduler("dpm++2m", base_config)
    gen = {"ref": _pipe_images(pipe, labels, noise, ref_steps, guidance, batch), "labels": labels, "images": {},
           "ref_steps": ref_steps, "n": n_images}
    log(f"{model_name}: {ref_steps}-step reference in {time.time() - t0:.0f}s")
    configs = {"ours:pc3": lambda: PCMultistepScheduler.from_config(base_config)}
    has = {}  # the NFEs a schedule-file row exists for
    if schedule_file is not None and Path(schedule_file).exists():
        from .optimize import use_schedule
        from .schedules import read_schedule_file

        doc = read_schedule_file(schedule_file)
        configs["ours:pc+opt"] = lambda: use_schedule(pipe, schedule_file, fitted_coefficients=False)
        has["ours:pc+opt"] = set(doc["sigmas"])
        if doc.get("coefficients"):
            configs["ours:pc+opt+fit"] = lambda: use_schedule(pipe, schedule_file)
            has["ours:pc+opt+fit"] = set(doc["coefficients"])
    configs.update({k: (lambda k=k: peer_scheduler(k, base_config)) for k in (peers or MODEL_PEERS)})
    for name, make in configs.items():
        for n in nfes:
            if name in has and str(n) not in has[name]:
                continue
            t1 = time.time()
            pipe.scheduler = make()
            x = _pipe_images(pipe, labels, noise, n, guidance, batch)
            gen["images"][name, n] = x
            rmse = ((x.double() - gen["ref"].double()) ** 2).mean().sqrt().item()
            log(f"  {model_name} {name} NFE {n}: rmse {rmse:.4f} ({time.time() - t1:.0f}s)")
    return gen


def save_generated(gen: dict, path: Path) -> None:
    from safetensors.torch import save_file

    t = {"ref": gen["ref"].half(), "labels": gen["labels"]}
    t.update({f"{name}|{n}": x.half() for (name, n), x in gen["images"].items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path), metadata={"ref_steps": str(gen["ref_steps"]), "n": str(gen["n"])})


def load_generated(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    images = {(k.split("|")[0], int(k.split("|")[1])): v.float() for k, v in t.items() if "|" in k}
    return {"ref": t["ref"].float(), "labels": t["labels"], "images": images, "ref_steps": int(meta["ref_steps"]),
            "n": int(meta["n"])}


def model_evaluate(gen: dict, log=print) -> dict:
    """RMSE to the reference; FD and accuracy when the evaluator's classifier weights exist (else NaN)."""
    from ..zoo import weights_path

    ev = None
    if weights_path("shapes-classifier").exists():
        from ..metrics import Evaluator

        ev = Evaluator()
    else:
        log("shapes-classifier weights not found: FD and accuracy left out (rerun with --eval-only later)")
    nan = float("nan")
    ref, labels = gen["ref"], gen["labels"]
    res = {"rmse": {}, "fd": {}, "acc": {}, "images": {}, "n": gen["n"], "ref_steps": gen["ref_steps"],
           "ref": ev.evaluate(ref, labels) if ev else {"fd": nan, "accuracy": nan},
           "floor": ev.fd_floor(gen["n"]) if ev else nan, "ref_images": ref[:16]}
    for key, x in gen["images"].items():
        res["rmse"][key] = ((x.double() - ref.double()) ** 2).mean().sqrt().item()
        res["fd"][key] = ev.fd(x) if ev else nan
        res["acc"][key] = ev.accuracy(x, labels) if ev else nan
        res["images"][key] = x[:16]
    return res


def model_markdown(model_name, res, nfes, command, guidance) -> str:
    names = sorted({k for k, _ in res["rmse"]})
    peers = [k for k in names if not k.startswith("ours")]
    ours = [k for k in names if k.startswith("ours")]
    rows = []
    for n in nfes:
        d, dn = _best(res["rmse"], peers, n)
        o, on = _best(res["rmse"], ours, n)
        fdd, fdn = _best(res["fd"], peers, n)
        fdo, fdon = _best(res["fd"], ours, n)
        rows.append({"NFE": n, "RMSE diffusers best": f"{d:.4f} ({dn})", "RMSE ours best": f"{o:.4f} ({on})",
                     "ratio": f"{o / d:.2f}", "FD diffusers best": f"{fdd:.3f} ({fdn})", "FD ours best": f"{fdo:.3f} ({fdon})"})
    full = [{"config": k, **{f"NFE {n}": f"{res['rmse'][k, n]:.4f} / {res['fd'][k, n]:.2f} / {res['acc'][k, n]:.2f}"
                             for n in nfes if (k, n) in res["rmse"]}} for k in names]
    r = res["ref"]
    goal = ""
    if 6 in nfes and 10 in nfes:
        fd6, n6 = _best(res["fd"], ours, 6)
        fd10, n10 = _best(res["fd"], peers, 10)
        goal = (f"Goal check: our best FD at NFE 6 = {fd6:.3f} ({n6}) vs diffusers' best FD at NFE 10 = {fd10:.3f} "
                f"({n10}): {'met' if fd6 <= fd10 else 'NOT met'}.")
    return "\n\n".join([
        f"# Sampler benchmark: {model_name}", provenance(command),
        f"{res['n']} images (class-balanced), guidance scale {guidance}, the same noise for every configuration. "
        f"RMSE (images in [-1, 1]) to a {res['ref_steps']}-step diffusers DPM-Solver++(2M) reference from the same noise; FD and "
        f"accuracy from vision_eff.metrics.Evaluator. Reference: FD {r['fd']:.3f}, accuracy {r['accuracy']:.3f}; "
        f"FD floor (real images, n={res['n']}): {res['floor']:.3f}.",
        "## Summary", markdown_table(rows), goal,
        "## Every configuration (RMSE / FD / accuracy)", markdown_table(full),
    ]) + "\n"


def save_grid(model_name, res, nfes, out_dir: Path) -> Path:
    peers = [k for k in {k for k, _ in res["rmse"]} if not k.startswith("ours")]
    best_peer = min(peers, key=lambda k: np.mean([res["rmse"][k, n] for n in nfes]))
    ours = next(k for k in ("ours:pc+opt+fit", "ours:pc+opt", "ours:pc3") if all((k, n) in res["rmse"] for n in nfes))
    k = 8
    panels = [(f"{ours} (rows: NFE {', '.join(map(str, nfes))}, reference)",
               torch.cat([res["images"][ours, n][:k] for n in nfes] + [res["ref_images"][:k]])),
              (f"diffusers {best_peer}", torch.cat([res["images"][best_peer, n][:k] for n in nfes] + [res["ref_images"][:k]]))]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model_name}.png"
    labelled_panels(panels, nrow=k, scale=3).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vision-eff bench samplers", description=__doc__.split("\n\n")[0])
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10, 15, 20])
    p.add_argument("--oracle-samples", type=int, default=512)
    p.add_argument("--tune-samples", type=int, default=192)
    p.add_argument("--tune-evals", type=int, default=150, help="Nelder-Mead evaluations per NFE and order on the oracle")
    p.add_argument("--tune-restarts", type=int, default=2,
                   help="Nelder-Mead restarts from the last result on the oracle (each another --tune-evals)")
    p.add_argument("--opt-nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10], help="NFEs to optimize schedules for")
    p.add_argument("--fit-history", type=int, default=4,
                   help="past model outputs per step of the fitted coefficients on the oracle (0: do not fit)")
    p.add_argument("--seed", type=int, default=1, help="evaluation noise seed")
    p.add_argument("--tune-seed", type=int, default=1234, help="tuning noise seed (must differ from --seed)")
    p.add_argument("--models", nargs="*", default=["shapes-unet", "shapes-dit"], help="built-in models ('' for none)")
    p.add_argument("--model-nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    p.add_argument("--model-peers", nargs="+", default=MODEL_PEERS, choices=sorted(PEERS), metavar="PEER",
                   help=f"diffusers configurations run on the built-in models (default: {' '.join(MODEL_PEERS)})")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--ref-steps", type=int, default=200)
    p.add_argument("--schedule-dir", default=str(Path(__file__).resolve().parent.parent / "zoo" / "schedules"),
                   help="schedule files NAME.json from `vision-eff samplers optimize`")
    p.add_argument("--skip-oracle", action="store_true")
    p.add_argument("--images-dir", default="/tmp/vision-eff-samplers",
                   help="where generated model images are kept (float16 safetensors) for --eval-only")
    p.add_argument("--eval-only", action="store_true",
                   help="recompute FD / accuracy / RMSE tables from --images-dir without sampling again")
    p.add_argument("--out", default=str(REPO_ROOT / "samplers" / "results"))
    a = p.parse_args(argv)
    if any(n < 1 for n in a.nfe + a.model_nfe + a.opt_nfe):
        p.error("NFE values must be >= 1")
    if a.seed == a.tune_seed:
        p.error("--tune-seed must differ from --seed (tuning and evaluation noise must differ)")
    if a.tune_restarts < 0:
        p.error("--tune-restarts must be >= 0")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    command = command_line("vision-eff bench samplers", argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.skip_oracle:
        res = oracle_bench(a.nfe, a.oracle_samples, a.seed, a.tune_seed, a.tune_samples, a.tune_evals, a.opt_nfe,
                           history=a.fit_history, restarts=a.tune_restarts)
        (out / "oracle.md").write_text(oracle_markdown(res, a.nfe, command))
        print((out / "oracle.md").read_text().split("## RMSE of every")[0])
    for m in [m for m in a.models if m]:
        saved = Path(a.images_dir) / f"{m}.safetensors"
        if a.eval_only:
            if not saved.exists():
                p.error(f"--eval-only: {saved} not found; run without --eval-only first")
            gen = load_generated(saved)
        else:
            gen = model_generate(m, a.model_nfe, a.images, a.seed, a.guidance, a.batch,
                                 Path(a.schedule_dir) / f"{m}.json", a.ref_steps, peers=a.model_peers)
            save_generated(gen, saved)
        res = model_evaluate(gen)
        md = model_markdown(m, res, a.model_nfe, command, a.guidance)
        (out / f"{m}.md").write_text(md)
        grid = save_grid(m, res, a.model_nfe, REPO_ROOT / "gallery" / "samplers")
        update_section(f"samplers-{m}", f"## Samplers: {m}\n\n![{m}](samplers/{grid.name})\n\n" + md.split("## Every")[0]
                       .split("\n", 1)[1])
        print(md.split("## Every")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
