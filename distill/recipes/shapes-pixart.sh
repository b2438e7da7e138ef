#!/usr/bin/env bash
# shapes-pixart (PixArt-alpha in miniature: adaLN-single, cross-attention on label tokens) trained from
# scratch, arms side by side on one thread each, all on the zoo recipe's schedule (3400 steps, lr 1e-3 cosine,
# batch 32, v prediction, label dropout 0.1, EMA 0.998), checkpoints kept every 400 steps:
#   scratch: the zoo recipe's Min-SNR-5 loss weighting, which gives the noisiest timesteps (where the
#            layout and the class are decided) almost no weight;
#   mse:     plain v-prediction MSE (--loss mse), which keeps them in;
#   teacher: Min-SNR-5 with shapes-unet's prediction as the target (--teacher shapes-unet); slower per step.
# ARMS picks which run (default: all three at once; on 2 cores run at most two at a time).
# The study, at equal steps:
#   python distill/dit_from_unet.py --model shapes-pixart --checkpoints $OUT/*/shapes-pixart.step1600.safetensors \
#       --title "shapes-pixart from scratch" --out distill/results/shapes-pixart.md
set -euo pipefail
OUT=${OUT:-runs/pixart}
VE=${VE:-.venv/bin/vision-eff}
STEPS=${STEPS:-3400}
ARMS=${ARMS:-scratch mse teacher}
declare -A EXTRA=([scratch]="" [mse]="--loss mse" [teacher]="--teacher shapes-unet")
for arm in $ARMS; do
  mkdir -p "$OUT/$arm"
  # shellcheck disable=SC2086
  $VE zoo train shapes-pixart --steps "$STEPS" --threads 1 --save-every 400 --keep-checkpoints ${EXTRA[$arm]} \
    --out "$OUT/$arm/shapes-pixart.safetensors" > "$OUT/$arm/log.txt" 2>&1 &
done
wait
