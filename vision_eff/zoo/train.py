"""Training of the built-in models (``vision-eff zoo train NAME``).

Runs through ``accelerate`` so the same loop runs on one CPU or many GPUs; every rank
reads its own slice of the deterministic data stream. The exponential moving average of
the weights is what gets saved, together with the recipe (seed, steps, batch, data,
wall time) as safetensors metadata. A checkpoint is written every ``save_every`` steps,
so an interrupted run still leaves usable weights.
"""
from __future__ import annotations

import copy
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import data
from .models import DIFFUSION_KINDS, NUM_CLASSES, SCHEDULE_CONFIG, build, entry, sana_label_scalar
from .weights import save, weights_path


def _stream(batch_size: int, size: int, rank: int = 0, world: int = 1, start_step: int = 0, offset: int = 0):
    """Deterministic training batches: step s of rank r is train samples offset + [(s*world+r)*B, +B)."""
    step = start_step
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    while True:
        start = offset + (step * world + rank) * batch_size
        xs, ys = [], []
        for c in range(start // data.CHUNK, (start + batch_size - 1) // data.CHUNK + 1):
            if c not in cache:
                cache.clear() if len(cache) > 2 else None
                cache[c] = data.chunk("train", c, size)
            lo = max(start - c * data.CHUNK, 0)
            hi = min(start + batch_size - c * data.CHUNK, data.CHUNK)
            xs.append(cache[c][0][lo:hi])
            ys.append(cache[c][1][lo:hi])
        yield torch.cat(xs), torch.cat(ys)
        step += 1


def recipe_with(defaults: dict, threads: int | None = None, **overrides) -> dict:
    """A training recipe: ``defaults`` with the non-None ``overrides``; validates steps, sets CPU threads."""
    recipe = dict(defaults)
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    if recipe["steps"] < 1:
        raise ValueError(f"steps must be >= 1, got {recipe['steps']}")
    if threads:
        torch.set_num_threads(threads)
    return recipe


def _lr_lambda(total: int, warmup: int = 100):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with AVX512-BF16
    or AMX. Without them torch emulates bf16 autocast: on an AVX2 CPU that made a UNet training step 8x
    slower than fp32, and on an AVX-512 CPU without AVX512-BF16 (where oneDNN still reports bf16 support)
    a DiT step 2x slower (README: "The built-in zoo")."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = (lambda: torch.cpu._is_avx512_bf16_supported(), lambda: torch.cpu._is_amx_tile_supported())
    for check in checks:  # private helpers: any that this torch lacks counts as no
        try:
            if check():
                return True
        except (AttributeError, RuntimeError):
            continue
    return False


PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(choice: str) -> None:
    if choice not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {choice!r}")


def training_precision(recipe: dict, device: torch.device | str, choice: str = "auto") -> tuple[str, str]:
    """``("bf16" | "no", line for the metadata)``: whether to train under bf16 autocast. ``choice="auto"``: bf16 autocast where the
    recipe asks for it and ``device`` has native bf16, else fp32 (the line says why, as the recipe asked
    otherwise); ``"bf16"`` / ``"fp32"`` force one."""
    check_precision(choice)
    if choice == "fp32" or (choice == "auto" and not recipe.get("bf16")):
        return "no", "fp32"
    if choice == "bf16" or native_bf16(device):
        return "bf16", "bf16 autocast"
    return "no", (f"fp32: the recipe asks for bf16, but this {torch.device(device).type} has no native bf16 "
                  "(emulated bf16 autocast is slower than fp32; --precision bf16 forces it)")


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class _Objective(nn.Module):
    """Holds a zoo model's components and computes its training loss (one forward for DDP)."""

    def __init__(self, name: str, modules: dict[str, nn.Module], label_dropout: float = 0.0,
                 prediction_type: str | None = None, loss: str = "mse", teacher=None,
                 shared_label_dropout: bool = False, repa: dict | None = None, vae=None,
                 kl_weight: float = 0.0, timesteps: str = "uniform", teacher_labels: str = "one",
                 mask_ratio: float = 0.0):
        super().__init__()
        self.timesteps = check_timestep_sampling(timesteps)
        self.teacher_labels = check_teacher_labels(teacher_labels, teacher is not None)
        # Min-SNR-gamma weighting (Hang et al. 2023): the per-timestep weight of the x0 error is
        # min(SNR, gamma); expressed for the eps / v targets below.
        self.min_snr = min_snr_gamma(loss)
        self.entry = entry(name)
        self.prediction_type = prediction_type or self.entry.prediction_type
        self.parts = nn.ModuleDict(modules)
        self.label_dropout = label_dropout
        # a frozen teacher pipeline and the frozen autoencoder of a latent model (not submodules: they are
        # neither trained, synced nor saved)
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "vae", vae)
        self.kl_weight = kl_weight
        # Diffusers' DiT has one label embedding per block, each dropping labels on its own, so the
        # all-null input that guidance asks for is almost never trained. With a teacher (which must see
        # the same dropped labels) or ``shared_label_dropout`` the labels are dropped once here instead.
        self.shared_drop = self.entry.kind in ("unet", "pixart", "sana") or (
            self.entry.kind == "dit" and (teacher is not None or shared_label_dropout))
        if self.shared_drop and self.entry.kind == "dit":
            for m in modules["transformer"].modules():
                if hasattr(m, "dropout_prob") and hasattr(m, "embedding_table"):
                    m.dropout_prob = 0.0
        self.repa, self.repa_weight, self.last_repa = None, 0.0, None
        if repa:
            if self.teacher_labels == "all":
                raise ValueError("REPA aligns one row per clean image; it cannot be combined with teacher_labels='all'")
            if self.entry.kind != "dit" or self.entry.vae:
                raise ValueError(f"REPA alignment is for the pixel-space DiT (shapes-dit), not {name!r}")
            from .repa import RepaAlignment

            opts = dict(repa)
            self.repa_weight = float(opts.pop("weight", 0.5))
            self.repa = RepaAlignment(modules["transformer"], **opts)
        self.masking = None
        if mask_ratio:
            if self.entry.kind != "dit":
                raise ValueError(f"masked-token training (mask_ratio) is for the DiTs, not {name!r}")
            if self.repa is not None:
                raise ValueError("REPA aligns the tokens of every position; it cannot be combined with masked-token training")
            from .masked import MaskedTokenTraining

            self.masking = MaskedTokenTraining(modules["transformer"], ratio=mask_ratio)
        if self.entry.kind not in ("classifier", "vae"):
            from diffusers import DDPMScheduler

            self.register_buffer("alphas_cumprod", DDPMScheduler(**SCHEDULE_CONFIG).alphas_cumprod.float(), persistent=False)

    def forward(self, x0: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        e, b = self.entry, x0.shape[0]
        if e.kind == "classifier":
            logits = self.parts["classifier"](_augment(x0, gen).to(x0.device))
            return nn.functional.cross_entropy(logits.float(), labels)
        if e.kind == "vae":
            return _autoencoder_loss(self.parts["vae"], x0, gen, self.kl_weight)
        if self.vae is not None:  # a latent model trains on the scaled latents of its frozen autoencoder
            with torch.no_grad():
                x0 = encode_latents(self.vae, x0)
        t = sample_timesteps(b, self.timesteps, gen, SCHEDULE_CONFIG["num_train_timesteps"]).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        a = self.alphas_cumprod[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if self.teacher_labels == "all":  # every noisy image under every label: the null one is among them
            xt, t, a, labels = every_label(xt, t, a)
        elif self.shared_drop:
            drop = (torch.rand(b, generator=gen) < self.label_dropout).to(x0.device)
            labels = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
        # the cross-attending models (UNet, PixArt) read the label as tokens
        ctx = self.parts["label_encoder"](labels) if "label_encoder" in self.parts else None
        if e.kind == "unet":
            cls = labels if self.parts["unet"].config.num_class_embeds else None
            out = self.parts["unet"](xt, t, encoder_hidden_states=ctx, class_labels=cls).sample
        elif e.kind in ("pixart", "sana"):  # Sana also takes the label beside the timestep
            extra = {"guidance": sana_label_scalar(labels)} if e.kind == "sana" else {}
            out = self.parts["transformer"](xt, encoder_hidden_states=ctx, timestep=t, **extra).sample
        else:  # without a teacher, the DiT's own label embeddings drop labels with p=0.1 in training mode
            out = self.parts["transformer"](xt, t, class_labels=labels).sample
        masked_out = None
        if self.masking is not None:  # MDT: the same inputs again, with tokens dropped in the first blocks
            with self.masking.masked(gen):
                masked_out = self.parts["transformer"](xt, t, class_labels=labels).sample
        if self.teacher is not None:  # distillation: the teacher's prediction replaces the noisy target
            with torch.no_grad():
                pred = self.teacher._denoise(xt, t, labels).float()
            target = convert_prediction(pred, xt, a, self.teacher.scheduler.config.prediction_type,
                                        self.prediction_type)
        else:
            target = noise if self.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        def error(pred: torch.Tensor) -> torch.Tensor:
            if self.min_snr is None:
                return nn.functional.mse_loss(pred.float(), target)
            return (min_snr_weight(a, self.min_snr, self.prediction_type) * (pred.float() - target).square()).mean()

        loss = error(out) if masked_out is None else error(out) + error(masked_out)
        if self.repa is not None:
            self.last_repa = self.repa.loss(x0)
            loss = loss + self.repa_weight * self.last_repa
        return loss


TEACHER_LABELS = ("one", "all")


def check_teacher_labels(choice: str, has_teacher: bool) -> str:
    """``choice`` if it names one of :data:`TEACHER_LABELS` and, for ``"all"``, there is a teacher to ask."""
    if choice not in TEACHER_LABELS:
        raise ValueError(f"teacher_labels must be one of {TEACHER_LABELS}, got {choice!r}")
    if choice == "all" and not has_teacher:
        raise ValueError("teacher_labels='all' asks the teacher what each noisy image becomes under every "
                         "label; it needs a teacher (--teacher)")
    return choice


def every_label(xt: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of the ``b`` noisy images with every label 0..NUM_CLASSES (the last is the null label):
    ``(xt, t, alpha_bar, labels)`` with ``b * (NUM_CLASSES + 1)`` rows, image-major.

    Distillation with ``teacher_labels="all"`` trains on these: the teacher's answers for one noisy image
    under different labels differ only through the label, which is exactly what a student that ignores
    its label (the pixel DiT here) has to learn, and the null label's answer is guidance's."""
    k = NUM_CLASSES + 1
    labels = torch.arange(k, device=xt.device).repeat(xt.shape[0])
    return xt.repeat_interleave(k, 0), t.repeat_interleave(k, 0), a.repeat_interleave(k, 0), labels


def _autoencoder_loss(vae: nn.Module, x: torch.Tensor, gen: torch.Generator, kl_weight: float) -> torch.Tensor:
    """L1 + L2/2 reconstruction through a sampled latent, plus ``kl_weight`` x the per-image KL to N(0, I)."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample(generator=gen)).sample.float()
    return (rec - x).abs().mean() + 0.5 * (rec - x).square().mean() + kl_weight * post.kl().float().mean()


def encode_latents(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the diffusion space of a latent model: the posterior mean x the scaling factor."""
    return vae.encode(images.to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor


@torch.no_grad()
def latent_scaling_factor(vae: nn.Module, count: int = 1024) -> float:
    """1 / the standard deviation of the posterior means of the first ``count`` training images (the
    latent-diffusion convention: the diffusion model sees latents of unit variance)."""
    was = vae.training
    vae.eval()
    x, _ = data.batch("train", 0, count, 32)
    z = torch.cat([vae.encode(x[i:i + 256].to(vae.device, vae.dtype)).latent_dist.mode().float()
                   for i in range(0, count, 256)])
    vae.train(was)
    return 1.0 / z.std().item()


def min_snr_gamma(loss: str) -> float | None:
    """The gamma of a ``"min_snrG"`` loss name, None for ``"mse"``; a ValueError for anything else."""
    if loss != "mse" and not (isinstance(loss, str) and loss.startswith("min_snr")
                              and loss[7:].replace(".", "", 1).isdigit()):
        raise ValueError(f"loss must be 'mse' or 'min_snrG' (e.g. 'min_snr5'), got {loss!r}")
    return float(loss[7:]) if loss != "mse" else None


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def check_timestep_sampling(sampling: str) -> str:
    """``sampling`` if it names one of :data:`TIMESTEP_SAMPLINGS`, else a ValueError naming them."""
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLINGS}, got {sampling!r}")
    return sampling


def sample_timesteps(n: int, sampling: str, gen: torch.Generator, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``n`` training timesteps in [0, num_train_timesteps): ``"uniform"``, or ``"logit_normal"`` (SD3's
    density, Esser et al. 2024: t / T = sigmoid(z), z ~ N(0, 1)), which concentrates training on the middle
    of the schedule, where the class of an image is decided, at the cost of its ends."""
    if check_timestep_sampling(sampling) == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), generator=gen)
    u = torch.sigmoid(torch.randn(n, generator=gen, dtype=torch.float64))
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weight of the squared error of an ``"epsilon"`` or ``"v_prediction"`` target: the x0
    error weighted by min(SNR, gamma), since x0 error = eps error / sqrt(snr) = v error * sqrt(1 - a)."""
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)


def convert_prediction(pred: torch.Tensor, xt: torch.Tensor, alpha_bar: torch.Tensor, source: str,
                       target: str) -> torch.Tensor:
    """A denoiser output of one prediction type ("epsilon", "v_prediction", "sample") as another,
    at x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    types = ("epsilon", "v_prediction", "sample")
    if source not in types or target not in types:
        raise ValueError(f"prediction types must be among {types}, got {source!r} -> {target!r}")
    if source == target:
        return pred
    sa, sb = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if source == "epsilon":
        eps, x0 = pred, (xt - sb * pred) / sa
    elif source == "sample":
        x0, eps = pred, (xt - sa * pred) / sb
    else:
        x0, eps = sa * xt - sb * pred, sb * xt + sa * pred
    return {"epsilon": eps, "sample": x0, "v_prediction": sa * eps - sb * x0}[target]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Classifier augmentation so features stay meaningful on imperfect generated images."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    blur = torch.rand(b, generator=gen) < 0.3
    xb = nn.functional.avg_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(blur.view(b, 1, 1, 1), xb, x)
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.15
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def train(name: str, steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
          seed: int | None = None, out: str | Path | None = None, save_every: int = 250,
          progress: bool = True, threads: int | None = None, init_from: str | Path | None = None,
          prediction_type: str | None = None, stage: dict | None = None, teacher: str | None = None,
          keep_checkpoints: bool = False, repa: dict | None = None,
          shared_label_dropout: bool | None = None, init: str | None = None, loss: str | None = None,
          precision: str = "auto", timesteps: str | None = None, teacher_labels: str | None = None,
          mask_ratio: float | None = None) -> Path:
    """Train a zoo model and write its weights; returns the weights path.

    A recipe with ``pretrain`` stages (e.g. epsilon prediction first, then v prediction) runs them in
    order, each initialised from the one before, unless ``init_from`` names weights the stages already
    produced or ``steps`` is given (then only the final stage is trained, from scratch). ``stage``
    overrides recipe keys for one stage (used by that chain). ``teacher`` names a trained built-in
    diffusion model to distill from in the final stage (recorded in the recipe and the metadata).
    ``repa`` (DiT only) adds REPA representation alignment with the built-in ViT (options of
    :class:`~vision_eff.zoo.repa.RepaAlignment` and ``weight``); ``shared_label_dropout`` (DiT) drops
    each sample's label once for every block, so guidance's all-null input is trained. ``init="dit"``
    (DiT, from scratch) starts from the DiT paper's initialisation instead of diffusers' default. ``loss``
    ("mse" or "min_snrG") replaces the recipe's loss in the final stage. ``precision`` ("auto", "bf16",
    "fp32"): see :func:`training_precision`; what was used goes into the metadata. ``timesteps``
    ("uniform" or "logit_normal", :func:`sample_timesteps`) replaces the final stage's timestep sampling.
    ``teacher_labels="all"`` (with ``teacher``) distills each noisy image under every label instead of its
    own (:func:`every_label`): the batch size counts noisy images, each giving NUM_CLASSES + 1 rows.
    ``mask_ratio`` (a DiT, in the final stage) adds MDT's masked-token loss beside the plain one
    (:class:`~vision_eff.zoo.masked.MaskedTokenTraining`, that share of tokens dropped in the first half of the blocks).
    Every ``save_every`` steps the weights so far are written to ``out``; with ``keep_checkpoints``
    each of them is also kept as ``OUT.stepN.safetensors`` (for studies of quality against steps).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    e = entry(name)
    recipe = recipe_with(e.train, threads=threads, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         teacher=teacher, repa=repa, shared_label_dropout=shared_label_dropout, init=init,
                         loss=loss, timesteps=timesteps, teacher_labels=teacher_labels, mask_ratio=mask_ratio)
    check_timestep_sampling(recipe.get("timesteps", "uniform"))  # before any pretraining stage runs
    check_teacher_labels(recipe.get("teacher_labels", "one"), recipe.get("teacher") is not None)
    _check_teacher(recipe.get("teacher"), name)  # before any pretraining stage runs
    check_precision(precision)  # before any pretraining stage runs
    if loss is not None:
        min_snr_gamma(loss)
    if init not in (None, "diffusers") and init_from is not None:
        raise ValueError(f"init={init!r} initialises a model trained from scratch; with init_from the weights replace it")
    out = Path(out) if out is not None else weights_path(name)
    pre = recipe.pop("pretrain", None)
    pre = [pre] if isinstance(pre, dict) else pre
    if stage is not None:
        recipe.update(stage)
        pre = None
    # the pretraining stages belong to the full recipe: an explicit --steps trains the final stage alone
    if pre and init_from is None and prediction_type is None and steps is None:
        for i, st in enumerate(pre):
            path = out.with_name(f"{out.stem}-stage{i}.safetensors")
            # the first stage starts from scratch, so it takes the initialisation; later ones load weights
            train(name, seed=recipe["seed"], out=path, save_every=save_every, progress=progress,
                  threads=threads, init_from=init_from, stage=st, init=recipe.get("init") if i == 0 else None,
                  precision=precision)
            init_from = path
    history: list[dict] = []
    if init_from is not None:
        from .weights import read_metadata

        before = read_metadata(init_from)
        history = list(before.get("history") or []) + [
            {k: before.get(k) for k in ("init_from", "steps_done", "samples_seen", "data_offset", "prediction_type",
                                        "train_seconds", "recipe") if k in before}]
        if pre:
            recipe["pretrain"] = pre
        # a stage reads fresh data: after the samples the weights it starts from have seen
        if "data_offset" in before:  # a file this code wrote: its own offset plus what it saw
            recipe.setdefault("data_offset", before["data_offset"] + before.get("samples_seen", 0))
        elif pre:  # the output of the recipe's stages (each of which started at sample 0)
            recipe.setdefault("data_offset", sum(st["steps"] * st.get("batch_size", recipe["batch_size"]) for st in pre))
    prediction_type = prediction_type or recipe.get("prediction_type") or e.prediction_type
    # the autocast is ours, not accelerate's: its mixed precision is process-wide state that a second run in
    # the same process could not change
    accel = Accelerator(mixed_precision="no")
    mixed, precision_used = training_precision(recipe, accel.device, precision)
    if precision_used.startswith("fp32: ") and progress:
        print(f"vision-eff: training in {precision_used}", file=sys.stderr)
    autocast_bf16 = mixed == "bf16"
    torch.manual_seed(recipe["seed"])
    class_embed = recipe.get("class_embed", True)
    # a stage that loads weights would only overwrite the initialisation: it is built plain
    init = recipe.get("init", "diffusers") if init_from is None else "diffusers"
    modules = build(name, class_embed=class_embed) if e.kind == "unet" else build(name, init=init)
    if init_from is not None:
        from safetensors import safe_open

        from .weights import load_into

        # a stage that adds the (zero-initialised) class embedding starts from one without it
        with safe_open(str(init_from), framework="pt") as f:
            grows = class_embed and not any(k.startswith("unet.class_embedding.") for k in f.keys())
        load_into(modules, init_from, name, allow_missing=("class_embedding.",) if grows else ())
    teacher, teacher_meta = _load_teacher(recipe.get("teacher"), name, accel.device)
    vae, vae_meta = _load_vae(e, accel.device)
    objective = _Objective(name, modules, recipe.get("label_dropout", 0.0), prediction_type,
                           recipe.get("loss", "mse"), teacher=teacher,
                           shared_label_dropout=recipe.get("shared_label_dropout", False), repa=recipe.get("repa"),
                           vae=vae, kl_weight=recipe.get("kl_weight", 0.0),
                           timesteps=recipe.get("timesteps", "uniform"),
                           teacher_labels=recipe.get("teacher_labels", "one"), mask_ratio=recipe.get("mask_ratio", 0.0))
    params = list(objective.parameters())  # the model's, and REPA's projector or MDT's mask token (training-only)
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.0 if e.kind != "classifier" else 1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe["steps"]))
    wrapped, opt, sched = accel.prepare(objective, opt, sched)
    raw = accel.unwrap_model(wrapped).parts
    ema = copy.deepcopy(raw).eval() if "ema" in recipe else None
    offset = recipe.get("data_offset", 0)
    gen = torch.Generator().manual_seed(recipe["seed"] * 7919 + accel.process_index + offset)
    stream = _stream(recipe["batch_size"], 32, accel.process_index, accel.num_processes, offset=offset)
    t0 = time.time()
    wrapped.train()
    bar = tqdm(range(recipe["steps"]), desc=f"train {name}", disable=not (progress and accel.is_main_process))
    ema_loss = ema_align = None

    def checkpoint(step: int, final: bool) -> None:
        if not accel.is_main_process:
            return
        meta = dict(
            model=name, kind=e.kind, recipe=recipe, steps_done=step, final=final,
            prediction_type=prediction_type, init_from=Path(init_from).name if init_from else None,
            data_offset=offset, history=history,
            samples_seen=step * recipe["batch_size"] * accel.num_processes,
            data=f"vision_eff.zoo.data train split, 32x32, sample {offset} + (step*world+rank)*batch onwards",
            train_seconds=round(time.time() - t0, 1), processes=accel.num_processes,
            machine=f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
            precision=precision_used, torch=torch.__version__, final_loss=round(ema_loss or float("nan"), 5), **teacher_meta, **vae_meta,
            **({"final_repa": round(ema_align, 5)} if ema_align is not None else {}),
        )
        if e.kind == "classifier":
            meta["eval_accuracy"] = round(_classifier_accuracy(raw["classifier"]), 5)
        if e.kind == "vae":  # what the latent models scale latents by (load_model sets it in the config)
            meta["scaling_factor"] = round(latent_scaling_factor(raw["vae"]), 6)
        target = ema if ema is not None else raw
        save({k: target[k] for k in modules}, out, meta)
        if keep_checkpoints and not final:
            shutil.copyfile(out, checkpoint_path(out, step))

    for step in bar:
        x, y = next(stream)
        x, y = x.to(accel.device), y.to(accel.device)
        with torch.autocast(accel.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = wrapped(x, y, gen).float()
        accel.backward(loss)
        accel.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            _ema_update(ema, raw, min(recipe["ema"], (1 + step) / (10 + step)))
        value = loss.item()  # the denoising loss (REPA's term is shown beside it)
        if objective.last_repa is not None:
            align = objective.last_repa.item()
            value -= objective.repa_weight * align
            ema_align = align if ema_align is None else 0.98 * ema_align + 0.02 * align
        ema_loss = value if ema_loss is None else 0.98 * ema_loss + 0.02 * value
        bar.set_postfix(loss=f"{ema_loss:.4f}", **({"repa": f"{ema_align:.3f}"} if ema_align is not None else {}))
        if save_every and (step + 1) % save_every == 0 and step + 1 < recipe["steps"]:
            checkpoint(step + 1, final=False)
    checkpoint(recipe["steps"], final=True)
    for extra in (objective.repa, objective.masking):  # training-only hooks off the model
        if extra is not None:
            extra.remove()
    accel.wait_for_everyone()
    return out


def checkpoint_path(out: str | Path, step: int) -> Path:
    """Where ``train(..., keep_checkpoints=True)`` keeps the weights written after ``step`` steps."""
    out = Path(out)
    return out.with_name(f"{out.stem}.step{step}{out.suffix}")


def _check_teacher(teacher: str | None, name: str) -> None:
    if teacher is not None and (teacher == name or entry(teacher).kind not in DIFFUSION_KINDS):
        raise ValueError(f"teacher must be another built-in diffusion model than {name!r}, got {teacher!r}")
    if teacher is not None and entry(teacher).vae != entry(name).vae:
        space = lambda n: f"{entry(n).vae}'s latents" if entry(n).vae else "pixels"  # noqa: E731
        raise ValueError(f"teacher {teacher!r} denoises {space(teacher)} and {name!r} {space(name)}: "
                         f"a teacher must work in the same space as its student")


def _load_vae(e, device) -> tuple[nn.Module | None, dict]:
    """The frozen autoencoder of a latent model, and what identifies its weights."""
    if e.vae is None:
        return None, {}
    from . import load_model
    from ..samplers.schedules import model_fingerprint

    vae = load_model(e.vae, device=device)["vae"]
    return vae, {"vae": e.vae, "vae_fingerprint": model_fingerprint(vae)}


def _load_teacher(teacher: str | None, name: str, device) -> tuple[object, dict]:
    """The frozen pipeline of a zoo diffusion model to distill from, and what identifies its weights."""
    if teacher is None:
        return None, {}
    from . import load_pipeline, model_info
    from ..samplers.schedules import model_fingerprint

    _check_teacher(teacher, name)
    pipe = load_pipeline(teacher, device=device)
    return pipe, {"teacher": teacher, "teacher_fingerprint": model_fingerprint(pipe.denoiser),
                  "teacher_steps_done": model_info(teacher).get("steps_done")}


@torch.no_grad()
def _classifier_accuracy(model: nn.Module) -> float:
    was = model.training
    model.eval()
    x, y = data.eval_split(32)
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc
