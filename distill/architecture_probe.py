"""Study: which denoiser architecture learns fastest in the same wall time on this machine?

A quick probe, not a zoo recipe: it trains one fresh architecture for a fixed number of minutes on the
built-in training stream (batch, learning rate, Min-SNR-5 v-prediction loss, 10% shared label dropout,
bf16 autocast, EMA 0.998: the zoo's DiT recipe), then scores the EMA weights' x0 estimate on 128
held-out images at a few timesteps with the true, a wrong and the null label (as ``label_use.py`` does).
Lower x0 error means a better denoiser; a wrong/true ratio near 1 means the label is ignored.

Architectures, all diffusers models built from config at width 128 (the built-in models' size):
- ``dit``: the built-in ``shapes-dit`` (DiTTransformer2DModel, patch 2, adaLN-zero);
- ``sana``: SanaTransformer2DModel, patch 2: linear attention, a depthwise-conv gated FFN (Mix-FFN),
  adaLN-single timestep modulation and cross-attention on the built-in label tokens;
- ``unet``: the built-in ``shapes-unet`` (UNet2DConditionModel with the label in the timestep embedding);
- ``dit-skip``: ``dit`` with long skip connections between shallow and deep blocks (after U-ViT, Bao et
  al. 2023, who find them essential for a pixel-space ViT denoiser): the output of block k joins the input
  of block L-1-k, and the patch embedding joins the last block's output, each through a linear map of
  the concatenation that starts as the identity on the main path and zero on the skip, so the model
  starts as ``dit`` does. Forward hooks on the blocks; the diffusers model itself is unchanged.

    python distill/architecture_probe.py --model sana --minutes 10 --out distill/results/architecture-probe.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

MODELS = ("dit", "dit-skip", "sana", "unet")


class LongSkips(nn.Module):
    """U-ViT's long skips on a diffusers DiT, through forward hooks on its blocks (see the module doc).

    Sources are block outputs (``-1``: the patch embedding, the first block's input); each target is a
    block's input, or, for the patch embedding, the last block's output.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        blocks = net.transformer_blocks
        n, dim = len(blocks), net.inner_dim
        # (source, target, where): block k's output -> block n-1-k's input, the embedding -> the last output
        self.pairs = [(k, n - 1 - k, "input") for k in range(n // 2 - 1)] + [(-1, n - 1, "output")]
        self.mix = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in self.pairs)
        with torch.no_grad():
            for lin in self.mix:
                lin.weight.zero_()
                lin.weight[:, :dim].copy_(torch.eye(dim))
                lin.bias.zero_()
        self._saved: dict[int, torch.Tensor] = {}  # this forward's sources, emptied by the last join
        blocks[0].register_forward_pre_hook(self._save_embedding, with_kwargs=True)
        for k in {src for src, _, _ in self.pairs} - {-1}:
            blocks[k].register_forward_hook(self._saver(k))
        for i, (src, dst, where) in enumerate(self.pairs):
            if where == "input":
                blocks[dst].register_forward_pre_hook(self._joiner_in(i, src), with_kwargs=True)
            else:
                blocks[dst].register_forward_hook(self._joiner_out(i, src))

    def _join(self, i: int, src: int, h: torch.Tensor) -> torch.Tensor:
        return self.mix[i](torch.cat([h, self._saved[src].to(h.dtype)], dim=-1))

    def _save_embedding(self, module, args, kwargs):
        self._saved[-1] = args[0]

    def _saver(self, k: int):
        def hook(module, args, output):
            self._saved[k] = output
        return hook

    def _joiner_in(self, i: int, src: int):
        def hook(module, args, kwargs):
            return (self._join(i, src, args[0]),) + tuple(args[1:]), kwargs
        return hook

    def _joiner_out(self, i: int, src: int):
        def hook(module, args, output):
            out = self._join(i, src, output)
            self._saved.clear()  # the last block's join is the last use: hold no activations between calls
            return out
        return hook


def build(kind: str, layers: int):
    """(denoiser, label encoder or None): fresh modules of one architecture."""
    from diffusers import DiTTransformer2DModel, SanaTransformer2DModel, UNet2DConditionModel

    from vision_eff.zoo.models import DIT_CONFIG, SANA_CONFIG, UNET_CLASS_EMBEDS, UNET_CONFIG, LabelEncoder

    if kind in ("dit", "dit-skip"):
        net = DiTTransformer2DModel(**dict(DIT_CONFIG, num_layers=layers))
        for m in net.modules():  # labels are dropped once per sample by the loop, not per block
            if hasattr(m, "dropout_prob") and hasattr(m, "embedding_table"):
                m.dropout_prob = 0.0
        if kind == "dit-skip":
            net.long_skips = LongSkips(net)  # a submodule, so its weights train, average and save with the DiT
        return net, None
    if kind == "sana":
        # the zoo's shapes-sana without its label-beside-the-timestep path (the probe's runs predate it)
        net = SanaTransformer2DModel(**dict(SANA_CONFIG, num_layers=layers, guidance_embeds=False))
        return net, LabelEncoder(dim=SANA_CONFIG["caption_channels"])
    net = UNet2DConditionModel(**UNET_CONFIG, num_class_embeds=UNET_CLASS_EMBEDS)
    nn.init.zeros_(net.class_embedding.weight)
    return net, LabelEncoder(dim=UNET_CONFIG["cross_attention_dim"])


def predict(kind: str, net, enc, xt, t, labels):
    if kind in ("dit", "dit-skip"):
        return net(xt, t, class_labels=labels).sample
    if kind == "sana":
        return net(xt, encoder_hidden_states=enc(labels), timestep=t).sample
    return net(xt, t, encoder_hidden_states=enc(labels), class_labels=labels).sample


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time (default 10)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--layers", type=int, default=6, help="transformer depth (dit, sana; default 6)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="append the result rows to this markdown file")
    a = p.parse_args(argv)
    if a.minutes <= 0 or a.batch_size < 1 or a.lr <= 0 or a.layers < 1:
        p.error("--minutes, --batch-size, --lr and --layers must be positive")
    from diffusers import DDPMScheduler

    from vision_eff.zoo import data
    from vision_eff.zoo.models import NUM_CLASSES, SCHEDULE_CONFIG
    from vision_eff.zoo.train import _ema_update, _stream, convert_prediction, min_snr_weight

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net, enc = build(a.model, a.layers)
    mods = nn.ModuleList([net] + ([enc] if enc is not None else []))
    params = sum(q.numel() for q in mods.parameters()) / 1e6
    ac = DDPMScheduler(**SCHEDULE_CONFIG).alphas_cumprod.float()
    opt = torch.optim.AdamW(mods.parameters(), lr=a.lr, weight_decay=0.0)
    with torch.random.fork_rng():  # a second build, not a deepcopy: the long skips' hooks hold their module
        ema_net, ema_enc = build(a.model, a.layers)
    ema = nn.ModuleList([ema_net] + ([ema_enc] if ema_enc is not None else [])).eval()
    ema.load_state_dict(mods.state_dict())
    gen = torch.Generator().manual_seed(0)
    stream = _stream(a.batch_size, 32)
    t0, step, smooth = time.time(), 0, None
    while time.time() - t0 < a.minutes * 60:
        x0, y = next(stream)
        b = x0.shape[0]
        t = torch.randint(0, SCHEDULE_CONFIG["num_train_timesteps"], (b,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        al = ac[t].view(b, 1, 1, 1)
        xt = al.sqrt() * x0 + (1 - al).sqrt() * noise
        y = torch.where(torch.rand(b, generator=gen) < 0.1, torch.full_like(y, NUM_CLASSES), y)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 100)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = predict(a.model, net, enc, xt, t, y)
        target = al.sqrt() * noise - (1 - al).sqrt() * x0
        loss = (min_snr_weight(al, 5.0, "v_prediction") * (out.float() - target).square()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(mods.parameters(), 1.0)
        opt.step()
        _ema_update(ema, mods, min(0.998, (1 + step) / (10 + step)))
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        step += 1
        if step % 500 == 0:
            print(f"step {step} {time.time() - t0:.0f}s loss {smooth:.4f}", flush=True)
    per_step = (time.time() - t0) / step
    print(f"{a.model}: {params:.2f}M params, {step} steps in {a.minutes:g} min, {per_step:.3f} s/step, "
          f"loss {smooth:.4f}")
    net, enc = ema[0], (ema[1] if len(ema) > 1 else None)
    xs, ys = data.chunk("eval", 0, 32)
    xs, ys = xs[:128], ys[:128]
    g = torch.Generator().manual_seed(1)
    rows = []
    with torch.no_grad():
        for tt in (100, 200, 350, 500, 800):
            noise = torch.randn(xs.shape, generator=g)
            al = ac[tt]
            xt = al.sqrt() * xs + (1 - al).sqrt() * noise
            t = torch.full((len(xs),), tt)
            err = []
            for lab in (ys, (ys + 1) % NUM_CLASSES, torch.full_like(ys, NUM_CLASSES)):
                v = predict(a.model, net, enc, xt, t, lab).float()
                err.append((convert_prediction(v, xt, al, "v_prediction", "sample") - xs).square().mean().item())
            print(f"t={tt} x0 mse true {err[0]:.5f} wrong {err[1]:.5f} null {err[2]:.5f} "
                  f"ratio {err[1] / err[0]:.3f}", flush=True)
            rows.append(f"| {a.model} | {a.layers} | {params:.2f} | {a.batch_size} | {a.minutes:g} | {step} | "
                        f"{per_step:.3f} | {tt} | {err[0]:.5f} | {err[1]:.5f} | {err[2]:.5f} | {err[1] / err[0]:.3f} |")
    if a.out:
        out = Path(a.out)
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                "# Denoiser architectures trained for the same wall time\n\n"
                "Rows appended by `python distill/architecture_probe.py --model M --minutes N --out FILE` "
                "(Min-SNR-5 v-prediction, lr warm-up 100 steps, bf16 autocast, EMA 0.998; x0 MSE of the EMA "
                "weights on 128 held-out images, noise seed 1, the same for every row).\n\n"
                "| model | layers | M params | batch | minutes | steps | s/step | t | x0 MSE true label | "
                "wrong label | null label | wrong / true |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        with out.open("a") as f:
            f.write("\n".join(rows) + "\n")
        print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
