#!/usr/bin/env bash
# Latent diffusion in miniature: the autoencoder shapes-vae (32x32x3 <-> 16x16x4), then a DiT on its
# scaled latents (patch 2: 64 tokens instead of the pixel DiT's 256, so a step costs about a third), on the
# zoo recipe (10000 steps, lr 1e-3 cosine, batch 32, plain v-prediction MSE, labels dropped once per sample
# with p=0.1, EMA 0.998), checkpoints kept every 1000 steps. On 2 cores: about 8 + 55 minutes.
# The study, beside the UNet and the pixel DiT:
#   python distill/dit_from_unet.py --model shapes-latent-dit --checkpoints $OUT/shapes-latent-dit.step*.safetensors \
#       --title "shapes-latent-dit" --out distill/results/shapes-latent-dit.md
# VAE=packaged skips retraining the autoencoder (the DiT must be trained on the packaged one to load with it).
set -euo pipefail
OUT=${OUT:-runs/latent-dit}
VE=${VE:-.venv/bin/vision-eff}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
if [ "${VAE:-train}" != packaged ]; then
  $VE zoo train shapes-vae --threads "$THREADS"   # writes the packaged vision_eff/zoo/weights/shapes-vae.safetensors
fi
$VE zoo train shapes-latent-dit --threads "$THREADS" --save-every 1000 --keep-checkpoints \
  --out "$OUT/shapes-latent-dit.safetensors"
