#!/usr/bin/env bash
# The pixel DiT with 2D rotary position embedding in its self-attention (shapes-dit-rope) beside the plain
# DiT, both from scratch, side by side for the same steps (one thread each, so both see the same machine):
#   plain: shapes-dit, with only the absolute sine-cosine position embedding diffusers adds to the tokens;
#   rope:  shapes-dit-rope, the same model and weights count with RoPE2DAttnProcessor in every attention
#          layer (vision_eff/zoo/rope.py): attention scores depend on the offset between two tokens.
# The same recipe for both: batch 16, lr 8e-4, Min-SNR-5, labels dropped once per sample, fp32, seed 0.
# Then score them in one run (distill/README.md).
set -euo pipefail
OUT=${OUT:-runs/rope}
VE=${VE:-.venv/bin/vision-eff}
STEPS=${STEPS:-4500}
EVERY=${EVERY:-1500}
common=(--steps "$STEPS" --batch-size 16 --lr 8e-4 --loss min_snr5 --shared-label-dropout --precision fp32
        --threads 1 --save-every "$EVERY" --keep-checkpoints)
mkdir -p "$OUT/plain" "$OUT/rope"
$VE zoo train shapes-dit "${common[@]}" --out "$OUT/plain/shapes-dit.safetensors" > "$OUT/plain.log" 2>&1 &
$VE zoo train shapes-dit-rope "${common[@]}" --out "$OUT/rope/shapes-dit-rope.safetensors" > "$OUT/rope.log" 2>&1 &
wait
