#!/usr/bin/env bash
# shapes-latent-dit trained further: 9000 more steps from the 10000-step weights of shapes-latent-dit.sh
# (lr 3e-4 cosine with 100 warm-up steps, batch 32, plain v-MSE, shared label dropout, EMA 0.998; the run
# reads fresh data after what the first 10000 steps saw), checkpoints every 1000 steps. On 2 cores: about 33 min.
# The study, beside the UNet and the pixel DiT:
#   python distill/dit_from_unet.py --model shapes-latent-dit --checkpoints $OUT/shapes-latent-dit.step3000.safetensors \
#       $OUT/shapes-latent-dit.step6000.safetensors $OUT/shapes-latent-dit.safetensors --samples 128 --threads 2 \
#       --out distill/results/shapes-latent-dit-longer.md
# FROM: the weights to continue (default: the 10000-step output of shapes-latent-dit.sh). The packaged weights are
# this script run twice: then FROM=runs/latent-dit-cont/shapes-latent-dit.safetensors OUT=runs/latent-dit-cont2.
set -euo pipefail
OUT=${OUT:-runs/latent-dit-cont}
VE=${VE:-.venv/bin/vision-eff}
THREADS=${THREADS:-2}
FROM=${FROM:-runs/latent-dit/shapes-latent-dit.safetensors}
mkdir -p "$OUT"
$VE zoo train shapes-latent-dit --init-from "$FROM" --steps 9000 --lr 3e-4 --threads "$THREADS" \
  --save-every 1000 --keep-checkpoints --out "$OUT/shapes-latent-dit.safetensors"
