import os
import subprocess
import sys

import pytest

from vision_eff import cli
from vision_eff.zoo.weights import weights_path


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "vision_eff.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["generate", "--model", "sd-xl"], "invalid choice"),
    (["generate", "--steps", "0"], "--steps must be >= 1"),
    (["generate", "--labels", "9", "--no-compare"], "class label 9 is out of range"),
    (["zoo", "train", "nope"], "invalid choice"),
    (["bench", "bogus"], "invalid choice"),
    (["zoo", "train", "shapes-unet", "--init-from", "/nonexistent.safetensors"], "no weights file"),
    (["zoo", "train", "shapes-dit", "--teacher", "shapes-dit"], "from another one"),
    (["zoo", "train", "shapes-classifier", "--teacher", "shapes-unet"], "only a built-in diffusion model"),
    (["zoo", "train", "shapes-dit", "--teacher", "shapes-vit"], "invalid choice"),
    (["generate", "--cache-interval", "0"], "--cache-interval must be >= 1"),
    (["zoo", "train", "shapes-classifier", "--keep-checkpoints"], "are for the diffusion models"),
    (["zoo", "train", "shapes-unet", "--repa"], "are for shapes-dit, not shapes-unet"),
    (["zoo", "train", "shapes-vit", "--shared-label-dropout"], "are for shapes-dit, not shapes-vit"),
    (["zoo", "train", "shapes-unet", "--dit-init"], "are for shapes-dit, not shapes-unet"),
    (["zoo", "train", "shapes-dit", "--dit-init", "--init-from", str(weights_path("shapes-dit"))],
     "--dit-init initialises a model trained from scratch"),
    (["zoo", "train", "shapes-dit", "--save-every", "0"], "--save-every must be >= 1"),
    (["zoo", "train", "shapes-pixart", "--loss", "snr"], "loss must be 'mse' or 'min_snrG'"),
    (["zoo", "train", "shapes-classifier", "--loss", "mse"], "--loss is for the diffusion models"),
    (["zoo", "train", "shapes-pixart", "--repa"], "are for shapes-dit, not shapes-pixart"),
    (["zoo", "train", "shapes-classifier", "--precision", "bf16"], "--precision is for the models whose recipe"),
    (["zoo", "train", "shapes-unet", "--precision", "fp16"], "invalid choice"),
    (["zoo", "train", "shapes-vae", "--timesteps", "uniform"], "--timesteps is for the diffusion models"),
    (["zoo", "train", "shapes-dit", "--timesteps", "cosine"], "invalid choice"),
    (["zoo", "train", "shapes-dit", "--teacher-labels", "all"], "it needs --teacher"),
    (["zoo", "train", "shapes-dit", "--teacher", "shapes-unet", "--teacher-labels", "many"], "invalid choice"),
    (["zoo", "train", "shapes-dit", "--mask-ratio", "1.5"], "--mask-ratio must be in (0, 1)"),
    (["zoo", "train", "shapes-unet", "--mask-ratio", "0.5"], "--mask-ratio is for the DiTs, not shapes-unet"),
])
def test_bad_input_one_line_exit_2(args, needle, capsys):
    """In process (a fresh interpreter per case costs seconds of imports); the entry point itself is checked
    in a subprocess below."""
    assert cli.main(args) == 2
    assert_one_error_line(capsys.readouterr().err, needle)


def assert_one_error_line(err: str, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln]
    assert len(lines) == 1 and needle in lines[0], err


@pytest.mark.parametrize("args, needle", [
    (["generate", "--steps", "0"], "--steps must be >= 1"),
    (["zoo", "train", "shapes-unet", "--init-from", "/nonexistent.safetensors"], "no weights file"),
])
def test_bad_input_one_line_exit_2_from_the_entry_point(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert_one_error_line(r.stderr, needle)
    assert "Traceback" not in r.stderr


def test_unwritable_output_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("generate", "--out", str(blocker / "sub"), "--no-compare")
    assert r.returncode == 2 and "cannot write" in r.stderr and "--out" in r.stderr


def test_help_texts(capsys):
    for argv in (["--help"], ["generate", "--help"], ["zoo", "train", "--help"]):
        assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "generate" in out and "--eval-samples" in out and "--steps" in out
    for argv in (["bench"], ["bench", "--help"], ["bench", "-h"]):
        assert cli.main(argv) == 0 and "diffusion  token merging" in capsys.readouterr().out


def test_zoo_list(capsys):
    assert cli.main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "shapes-unet" in out and "shapes-dit" in out and "trained" in out


def test_generate_small_end_to_end(tmp_path, capsys):
    rc = cli.main(["generate", "--out", str(tmp_path), "--eval-samples", "16", "--per-class", "2",
                   "--steps", "3", "--labels", "0", "1", "--system-allocator"])  # mallopt is process-wide
    assert rc == 0
    out = capsys.readouterr().out
    assert "diffusers default" in out and "FD" in out and "allocator: as the system set it" in out
    assert "Allocator, for both: as the system set it" in (tmp_path / "shapes-unet-generate.md").read_text()
    assert (tmp_path / "shapes-unet-generate.png").exists() and (tmp_path / "shapes-unet-generate.md").exists()
