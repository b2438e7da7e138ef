"""GPU benchmark of the attention kernels (same as `vision-eff bench attention`).

    python cuda/bench/attention.py                      # full table -> cuda/results/attention_<gpu>.md
    python cuda/bench/attention.py --only ViT --passes fwd
    python cuda/bench/attention.py --dry-run --out /tmp/a.md   # check the script on CPU (no real numbers)

The measurement code lives in vision_eff/kernels/bench.py so the CLI and this script agree.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vision_eff.kernels.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
