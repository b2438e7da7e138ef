#!/usr/bin/env bash
# The built-in DiT distilled from the built-in UNet (knowledge distillation between architectures:
# the UNet's prediction at each noisy sample is the DiT's regression target; labels are dropped for
# both alike). Starts from the packaged shapes-dit weights; every checkpoint is kept for the study
# (`python distill/dit_from_unet.py --checkpoints $OUT/*/shapes-dit.step*.safetensors ...`).
#
# Stage 1 is the first half of a 3000-step run at lr 5e-4: its step-1500 checkpoint is what stage 2
# starts from (the run may be stopped once that file exists). Stage 2 runs two learning rates from it.
# On the 2-core CPU machine one step takes 1.3-1.5 s with 2 threads, about 2.2 s with 1 thread.
set -euo pipefail
OUT=${OUT:-runs/dit-from-unet}
VE=${VE:-.venv/bin/vision-eff}
mkdir -p "$OUT/stage1" "$OUT/lr3e-4" "$OUT/lr8e-4"
if [ ! -f "$OUT/stage1/shapes-dit.step1500.safetensors" ]; then
  $VE zoo train shapes-dit --teacher shapes-unet --init-from vision_eff/zoo/weights/shapes-dit.safetensors \
    --steps 3000 --lr 5e-4 --threads 2 --keep-checkpoints --out "$OUT/stage1/shapes-dit.safetensors" &
  pid=$!
  until [ -f "$OUT/stage1/shapes-dit.step1500.safetensors" ]; do
    kill -0 $pid 2>/dev/null || { echo "stage 1 ended before its step-1500 checkpoint" >&2; exit 1; }
    sleep 30
  done
  kill $pid; wait $pid 2>/dev/null || true
fi
for lr in 3e-4 8e-4; do  # the two arms ran side by side, one thread each
  $VE zoo train shapes-dit --teacher shapes-unet --init-from "$OUT/stage1/shapes-dit.step1500.safetensors" \
    --steps 4000 --lr $lr --threads 1 --keep-checkpoints --out "$OUT/lr$lr/shapes-dit.safetensors" &
done
wait
