#!/usr/bin/env bash
# The built-in DiT trained further with REPA representation alignment, beside the same training without
# it: two arms side by side (one thread each), both from the packaged shapes-dit weights, on the same
# fresh data and noise, both with the label dropped once for every block (--shared-label-dropout); the
# only difference is --repa. Checkpoints every 100 steps; the study:
#   python distill/dit_from_unet.py --checkpoints $OUT/{control,repa}/shapes-dit.safetensors \
#       --title "shapes-dit trained further with and without REPA" --out distill/results/shapes-dit-repa.md
# On the 2-core CPU machine, with both arms running: about 1.3 s a step without REPA, 1.7 s with it.
set -euo pipefail
OUT=${OUT:-runs/dit-repa}
VE=${VE:-.venv/bin/vision-eff}
STEPS=${STEPS:-400}
mkdir -p "$OUT/control" "$OUT/repa"
for arm in control repa; do
  extra=(); [ "$arm" = repa ] && extra=(--repa)
  $VE zoo train shapes-dit --init-from vision_eff/zoo/weights/shapes-dit.safetensors --steps "$STEPS" --lr 5e-4 \
    --threads 1 --shared-label-dropout "${extra[@]}" --save-every 100 --out "$OUT/$arm/shapes-dit.safetensors" &
done
wait
