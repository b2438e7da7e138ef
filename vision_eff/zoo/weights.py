"""Zoo weights: one safetensors file per model (never pickle), with the training record as metadata."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).parent / "weights"


class WeightsError(RuntimeError):
    """A weights file is missing, corrupt, or for another model."""


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def save(modules: dict[str, nn.Module], path: str | Path, metadata: dict) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{comp}.{k}": v.detach().to(torch.float32).contiguous().clone()
        for comp, m in modules.items()
        for k, v in m.state_dict().items()
    }
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise WeightsError(f"{path} is not a valid safetensors file ({exc}); retrain it with `vision-eff zoo train`") from exc
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def load_into(modules: dict[str, nn.Module], path: str | Path, model_name: str,
              allow_missing: tuple[str, ...] = ()) -> dict:
    """Load a zoo weights file into freshly built modules; returns the file's metadata.

    ``allow_missing``: parameter-name prefixes the file may lack (a training stage that adds a
    zero-initialised module); anything else missing or unexpected is an error.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise WeightsError(
            f"no weights for {model_name!r} at {path}; train them with `vision-eff zoo train {model_name}`"
        )
    meta = read_metadata(path)
    if meta.get("model") not in (None, model_name):
        raise WeightsError(f"{path} holds weights for {meta.get('model')!r}, not {model_name!r}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise WeightsError(f"{path} is corrupt ({exc}); retrain it with `vision-eff zoo train {model_name}`") from exc
    for comp, module in modules.items():
        prefix = comp + "."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith(allow_missing)]
        if missing or unexpected:
            raise WeightsError(
                f"{path} does not match the {model_name!r} architecture "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); retrain it"
            )
    return meta
