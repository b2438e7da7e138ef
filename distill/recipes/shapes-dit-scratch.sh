#!/usr/bin/env bash
# shapes-dit trained from scratch two ways, side by side for the same wall time (one thread each):
#   baseline: the packaged recipe's final stage as it stands (diffusers' default initialisation, each
#             block dropping the label on its own), Min-SNR-5 v prediction;
#   new:      the DiT paper's initialisation (--dit-init), the label dropped once for every block
#             (--shared-label-dropout) and REPA alignment with shapes-vit (--repa); same loss and lr.
# REPA makes a step about 30% slower, so the new arm gets fewer steps for the same time. Checkpoints
# are kept every 400 steps; the study:
#   python distill/dit_from_unet.py --checkpoints $OUT/{baseline,new}/shapes-dit.safetensors \
#       --title "shapes-dit from scratch: packaged recipe vs DiT init + shared dropout + REPA" \
#       --out distill/results/shapes-dit-scratch.md
set -euo pipefail
OUT=${OUT:-runs/dit-scratch}
VE=${VE:-.venv/bin/vision-eff}
BASE_STEPS=${BASE_STEPS:-3600}
NEW_STEPS=${NEW_STEPS:-2800}
LR=${LR:-1e-3}
mkdir -p "$OUT/baseline" "$OUT/new"
$VE zoo train shapes-dit --steps "$BASE_STEPS" --lr "$LR" --threads 1 --save-every 400 --keep-checkpoints \
  --out "$OUT/baseline/shapes-dit.safetensors" > "$OUT/baseline/log.txt" 2>&1 &
$VE zoo train shapes-dit --steps "$NEW_STEPS" --lr "$LR" --threads 1 --save-every 400 --keep-checkpoints \
  --dit-init --shared-label-dropout --repa --out "$OUT/new/shapes-dit.safetensors" > "$OUT/new/log.txt" 2>&1 &
wait
