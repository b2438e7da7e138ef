#!/usr/bin/env bash
# The built-in DiT distilled from the built-in UNet under every label, beside the plain distillation, side by
# side for the same steps and the same rows per step (one thread each, so both see the same machine):
#   one: 36 noisy images a step, each with its own label (or the null one, 10% of the time), the UNet's
#        prediction as the target (`--teacher shapes-unet`, as recipes/shapes-dit-from-unet.sh);
#   all: 4 noisy images a step, each under all 8 labels and the null one (36 rows), the UNet's prediction
#        for each label as the target (`--teacher-labels all`): what the label changes is all that differs
#        within a group of rows, and that is what the DiT, which barely uses its label, lacks.
# Both start from the packaged shapes-dit. Then score them in one run (distill/README.md).
set -euo pipefail
OUT=${OUT:-runs/ab}
VE=${VE:-.venv/bin/vision-eff}
STEPS=${STEPS:-1200}
common=(zoo train shapes-dit --teacher shapes-unet --init-from vision_eff/zoo/weights/shapes-dit.safetensors
        --steps "$STEPS" --lr 5e-4 --precision fp32 --threads 1 --save-every 400 --keep-checkpoints)
mkdir -p "$OUT/one" "$OUT/all"
$VE "${common[@]}" --teacher-labels one --batch-size 36 --out "$OUT/one/shapes-dit.safetensors" &
$VE "${common[@]}" --teacher-labels all --batch-size 4 --out "$OUT/all/shapes-dit.safetensors" &
wait
