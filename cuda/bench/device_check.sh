#!/usr/bin/env bash
# The GPU checks of vision-eff in one prepared call, for a session that is lent a GPU (the device tool):
#
#     run(command="bash cuda/bench/device_check.sh", timeout_s=540)       # results come back from $OUT
#
# 1. the GPU tests (tests/kernels/test_gpu.py: the Triton kernels within 2x SDPA's error against float64 at
#    real shapes, the CUDA C++ and Triton matching kernels against the exact PyTorch path), log -> gpu-tests.log;
# 2. the attention benchmark (vision_eff/kernels/bench.py, forward and forward+backward, fp16) -> attention.md
#    (the UNet/DiT attention-share profile runs only where diffusers is importable; the GPU image has no
#    diffusers: carry its wheel in .whl/ to get it, see the device tool's README).
# Each file records the device, date, commit and command; copy them into cuda/results/ and commit them.
# Nothing here needs .venv: the GPU image's python3 has torch, triton, timm, safetensors and pytest.
# DRY_RUN=1 checks the script on a machine without a GPU (toy sizes on the CPU, numbers meaningless).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/vision-eff-device-check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit+dirty"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $commit"
  echo "command: bash cuda/bench/device_check.sh${DRY_RUN:+ (DRY_RUN=1)}"
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  else echo "no nvidia-smi"; fi
  "$py" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  "$py" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
} | tee "$out/device.txt"

status=0
if [ -z "${DRY_RUN:-}" ]; then
  timeout 300 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_gpu.py 2>&1 | tee "$out/gpu-tests.log"
  status=${PIPESTATUS[0]}
fi
profile=()
"$py" -c "import diffusers" 2>/dev/null || profile=(--no-profile)
# 240 s for the GPU run (its length there is not measured yet); the CPU dry run goes through Triton's interpreter (slow)
timeout "${ATTENTION_TIMEOUT:-$([ -n "${DRY_RUN:-}" ] && echo 1200 || echo 240)}" "$py" cuda/bench/attention.py ${DRY_RUN:+--dry-run} "${profile[@]}" --out "$out/attention.md" 2>&1 \
  | tee "$out/attention.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "device check done (status $status); files in $out"
exit $status
