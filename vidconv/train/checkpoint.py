"""Checkpoints: written atomically, read back with errors that say what does not match.

A checkpoint is a dict saved with torch.save::

    format       "vidconv-checkpoint/1"
    model        {"name", "multires", "stream", "width", "dropout", "num_classes"}
    classes      class names, in the classifier's order
    state_dict   the model's weights (never DDP-wrapped)
    optimizer, scheduler, plateau   optimiser / LR-schedule state (training checkpoints)
    step, epoch, batch_in_epoch     where training stopped
    rng          torch / CUDA / numpy / python generator states
    config       the TrainConfig as a dict
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "vidconv-checkpoint/1"
MODEL_KEYS = ("name", "multires", "stream", "width", "num_classes")


def model_info(model: nn.Module) -> dict[str, Any]:
    """What :func:`vidconv.models.build` needs to rebuild `model`."""
    return {
        "name": model.name,
        "multires": bool(model.multires),
        "stream": model.stream,
        "width": float(model.width),
        "dropout": float(model.drop1.p),
        "num_classes": int(model.num_classes),
    }


def build_model(info: dict[str, Any]) -> nn.Module:
    from vidconv.models import build

    return build(info["name"], int(info["num_classes"]), multires=bool(info["multires"]),
                 stream=info.get("stream", "both"), width=float(info["width"]),
                 dropout=float(info.get("dropout", 0.5)))


def describe(info: dict[str, Any]) -> str:
    return (f"model={info['name']}, multires={info['multires']}, stream={info['stream']}, "
            f"width={info['width']}, num_classes={info['num_classes']}")


def check_model_matches(found: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raise ValueError naming every field (model, multires, class count, ...) that differs."""
    diffs = [f"{key}: checkpoint has {found.get(key)!r}, expected {expected.get(key)!r}"
             for key in MODEL_KEYS
             if key in expected and found.get(key) != expected.get(key)]
    if diffs:
        raise ValueError(f"incompatible checkpoint {where}: " + "; ".join(diffs))


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` atomically: a crash mid-write leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no file at `path` (a run directory is accepted: its checkpoint.pt).
        ValueError: the file is not a vidconv checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Checkpoints hold numpy/python RNG states, which the weights-only unpickler refuses.
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"{path} is not a readable vidconv checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a vidconv checkpoint (format {found!r}, expected "
                         f"{FORMAT!r})")
    for key in ("model", "classes", "state_dict"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} lacks {key!r}")
    ckpt["path"] = str(path)
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """Rebuild the model a checkpoint holds: ``(model, classes, checkpoint)``, in eval mode."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["model"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {ckpt['path']} does not fit {describe(ckpt['model'])}: "
                         f"{exc}") from exc
    return model.to(device).eval(), list(ckpt["classes"]), ckpt
