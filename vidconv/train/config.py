"""The training configuration: one dataclass that the CLI fills, the checkpoint stores and
`--resume` checks against."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("plateau", "cosine", "constant")
# vidconv.data.loader.WORKER_TYPES, spelled out so that the config imports no loader.
WORKER_TYPES = ("thread", "process")
FINETUNE_MODES = ("top", "top3", "all", "scratch")
FLOAT_FIELDS = ("width", "dropout", "lr", "momentum", "weight_decay", "lr_factor", "grad_clip",
                "keep_prob")
# NumPy's legacy seeding limit; torch.manual_seed takes more, but one rule for both is simpler
MAX_SEED = 2**32


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults follow the paper (Sec. 4.1 and
    shared/paper.md): batch 32, SGD with momentum 0.9, weight decay 5e-4, learning rate 1e-3
    lowered (by `lr_factor`) when the training loss stops improving.

    data: dataset folder (root/<class>/<video>) or a UCF-101 style list file; root: the video
        root of a list file. out: the run directory.
    steps: optimiser steps in total; None = `epochs` passes over the (per-rank) loader.
    plateau_window: steps per plateau check of the mean training loss (None = one epoch, at
        least 100 steps);
        patience: checks without improvement before the learning rate is multiplied by lr_factor.
    amp: bf16 autocast (used on CUDA only); channels_last: channels_last_3d (CUDA only).
    init_from / finetune_mode / keep_prob: transfer learning (see vidconv.train.finetune).
    """

    data: str
    root: str | None = None
    out: str = "runs/run"
    model: str = "single_frame"
    multires: bool = False
    stream: str = "both"
    width: float = 1.0
    dropout: float = 0.5
    batch_size: int = 32
    steps: int | None = None
    epochs: int = 1
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "plateau"
    lr_factor: float = 0.1
    patience: int = 2
    plateau_window: int | None = None
    grad_clip: float | None = None
    amp: bool = True
    channels_last: bool = True
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    workers: int = 0
    worker_type: str = "thread"
    backend: str = "auto"
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    init_from: str | None = None
    finetune_mode: str | None = None
    keep_prob: float | None = None

    def __post_init__(self) -> None:
        # Absolute paths: `--resume` compares them, and a run resumed from another directory
        # (or with ./data for data) is still the same run.
        self.data = os.path.abspath(self.data)
        self.out = str(self.out)
        if self.root is not None:
            self.root = os.path.abspath(self.root)
        if self.init_from is not None:
            # a run directory means its checkpoint: one spelling, so --resume compares equal
            if os.path.isdir(self.init_from):
                self.init_from = os.path.join(self.init_from, "checkpoint.pt")
            self.init_from = os.path.realpath(self.init_from)
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if value is None and name in ("grad_clip", "keep_prob"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the "
                             f"run in {self.out}, overwrite replaces it")
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.worker_type not in WORKER_TYPES:
            raise ValueError(f"worker_type must be one of {WORKER_TYPES}, got "
                             f"{self.worker_type!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("batch_size", "epochs", "checkpoint_every", "log_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("steps", "plateau_window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor!r}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"weight_decay must be >= 0 and momentum in [0, 1), got "
                             f"{self.weight_decay!r} and {self.momentum!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip!r}")
        if self.finetune_mode is not None:
            if self.finetune_mode not in FINETUNE_MODES:
                raise ValueError(f"finetune_mode must be one of {FINETUNE_MODES}, got "
                                 f"{self.finetune_mode!r}")
            if self.init_from is None and self.finetune_mode != "scratch":
                raise ValueError(f"finetune_mode={self.finetune_mode!r} needs init_from "
                                 "(the checkpoint to fine-tune)")
        if self.keep_prob is not None and not 0 < self.keep_prob <= 1:
            raise ValueError(f"keep_prob must be in (0, 1], got {self.keep_prob!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, naming unknown keys (a typo would otherwise be silently ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


# Options that define the model and its data; a resumed run must agree on all of them.
RESUME_MUST_MATCH = ("data", "root", "model", "multires", "stream", "width", "dropout",
                     "batch_size", "optimizer", "schedule", "seed", "init_from",
                     "finetune_mode", "keep_prob")
