#!/usr/bin/env bash
# shapes-pixart (PixArt-alpha in miniature: adaLN-single, cross-attention on label tokens) trained from
# scratch two ways, side by side for about the same wall time (one thread each):
#   scratch: the zoo recipe (lr 1e-3, batch 32, Min-SNR-5 v prediction, label dropout 0.1, EMA 0.998);
#   teacher: the same, with shapes-unet's prediction as the regression target (--teacher shapes-unet);
#            the teacher's forward makes a step slower, so this arm gets fewer steps.
# Checkpoints are kept every 400 steps; the study:
#   python distill/dit_from_unet.py --model shapes-pixart --checkpoints $OUT/{scratch,teacher}/shapes-pixart.safetensors \
#       --title "shapes-pixart from scratch: plain vs distilled from shapes-unet" \
#       --out distill/results/shapes-pixart.md
set -euo pipefail
OUT=${OUT:-runs/pixart}
VE=${VE:-.venv/bin/vision-eff}
SCRATCH_STEPS=${SCRATCH_STEPS:-3400}
TEACHER_STEPS=${TEACHER_STEPS:-2600}
mkdir -p "$OUT/scratch" "$OUT/teacher"
$VE zoo train shapes-pixart --steps "$SCRATCH_STEPS" --threads 1 --save-every 400 --keep-checkpoints \
  --out "$OUT/scratch/shapes-pixart.safetensors" > "$OUT/scratch/log.txt" 2>&1 &
$VE zoo train shapes-pixart --steps "$TEACHER_STEPS" --threads 1 --save-every 400 --keep-checkpoints \
  --teacher shapes-unet --out "$OUT/teacher/shapes-pixart.safetensors" > "$OUT/teacher/log.txt" 2>&1 &
wait
