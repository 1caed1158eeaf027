"""Checkpoints: written atomically, read back with errors that say what does not match.

A checkpoint is a dict saved with torch.save::

    format       "vidconv-checkpoint/1"
    model        {"name", "multires", "stream", "width", "dropout", "num_classes"}
    classes      class names, in the classifier's order
    state_dict   the model's weights (never DDP-wrapped)
    optimizer, scheduler, plateau   optimiser / LR-schedule state (training checkpoints)
    step, epoch, batch_in_epoch     where training stopped
    rng          torch / CUDA / numpy / python generator states, one per rank
    log_window   the metrics rows' running sums since the last row (training checkpoints)
    config       the TrainConfig as a dict

Everything in it is a tensor, a dict, a list, a tuple or a primitive, so it is read with
``torch.load(weights_only=True)``: loading a checkpoint never runs code from the file.
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vidconv.train.rundir import RunDirError, os_error_message, save_file

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


def build_model(info: object) -> nn.Module:
    """Rebuild the model a checkpoint's ``model`` entry describes.

    The fields go to :func:`vidconv.models.build` as stored, so its checks judge them: a damaged
    or hand-edited entry (``multires: "no"``, ``width: "wide"``, a missing name) is a ValueError
    naming the field, never a model built from a coerced value (``bool("no")`` is True).
    """
    from vidconv.models import build

    if not isinstance(info, dict):
        raise ValueError(f"checkpoint model entry must be a dict, got {type(info).__name__}")
    missing = [key for key in MODEL_KEYS if key not in info and key != "stream"]
    if missing:
        raise ValueError(f"checkpoint model entry lacks {', '.join(map(repr, missing))}")
    try:
        return build(info["name"], info["num_classes"], multires=info["multires"],
                     stream=info.get("stream", "both"), width=info["width"],
                     dropout=info.get("dropout", 0.5))
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"checkpoint model entry {describe(info)} is invalid: {exc}") from exc


def describe(info: dict[str, Any]) -> str:
    """One line naming a checkpoint's model fields (missing ones as None)."""
    return (f"model={info.get('name')}, multires={info.get('multires')}, "
            f"stream={info.get('stream', 'both')}, width={info.get('width')}, "
            f"num_classes={info.get('num_classes')}")


def check_model_matches(found: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raise ValueError naming every field (model, multires, class count, ...) that differs."""
    diffs = [f"{key}: checkpoint has {found.get(key)!r}, expected {expected.get(key)!r}"
             for key in MODEL_KEYS
             if key in expected and found.get(key) != expected.get(key)]
    if diffs:
        raise ValueError(f"incompatible checkpoint {where}: " + "; ".join(diffs))


def rng_state() -> dict[str, Any]:
    """This process's generator states in types a weights-only load accepts (NumPy's key as
    an int64 tensor, Python's state as a list)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` atomically and durably: a crash, a kill or a full disk
    mid-write leaves the previous file intact and no temporary file behind (a SIGKILL's is
    removed by the next run in the directory).

    Raises:
        vidconv.train.rundir.RunDirError (an OSError): the file cannot be written; the message
            names the path and the cause (disk full, permission denied, ...).
    """
    obj = {"format": FORMAT, **payload}
    return save_file(path, lambda f: torch.save(obj, f), what="the checkpoint")


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
        # weights_only: a checkpoint is data; a file that needs code to unpickle is refused
        # before any of that code runs
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused is None:
            raise ValueError(f"{path} is not a readable vidconv checkpoint: "
                             f"{_first_line(exc)}") from exc
        raise ValueError(f"{path} is not a readable vidconv checkpoint: it holds a Python "
                         f"object ({refused.group(1)}) that a safe (weights-only) load refuses; "
                         "vidconv checkpoints hold only tensors, numbers, strings, lists and "
                         "dicts, and are never loaded by running code from the file") from exc
    except OSError as exc:
        raise RunDirError(os_error_message(exc, "read the checkpoint", path)) from exc
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


def _first_line(exc: BaseException) -> str:
    """The line of a torch.load error that says what is wrong (its weights-only errors wrap
    the cause in advice about weights_only=False, which vidconv never uses)."""
    boilerplate = ("weights only load failed", "please file an issue", "check the documentation")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = [line for line in lines if not line.lower().startswith(boilerplate)]
    return (kept or lines or [type(exc).__name__])[0].removeprefix("WeightsUnpickler error:"
                                                                    ).strip() or "damaged"


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
