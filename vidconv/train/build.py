"""What a training run is made of, built from its :class:`TrainConfig`: the model (new,
pretrained for fine-tuning, or resumed), the optimiser and the learning-rate schedule, and the
check that a checkpoint to resume belongs to this run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vidconv.train import checkpoint as ckpt_io
from vidconv.train.config import RESUME_MUST_MATCH, TrainConfig
from vidconv.train.freezing import apply_finetune
from vidconv.train.rundir import RunDir


def load_resume(config: TrainConfig, path: Path, classes: list[str]) -> dict[str, Any]:
    """The checkpoint at `path`, checked to be this run's (same data, model, seed, ...).
    A fine-tuning run's model fields are taken from it (they came from the pretrained
    checkpoint).

    Raises:
        FileNotFoundError: no checkpoint at `path`.
        ValueError: naming every option that differs, or the dataset's classes differ.
    """
    if not path.is_file():
        raise RunDir(path.parent).no_checkpoint_error()
    resume = ckpt_io.load_checkpoint(path)
    old = resume.get("config") or {}
    if config.init_from is not None:
        for key in ("model", "multires", "stream", "width"):
            if key in old:
                setattr(config, key, old[key])
    diffs = [f"{key}: checkpoint has {old.get(key)!r}, this run {getattr(config, key)!r}"
             for key in RESUME_MUST_MATCH if old.get(key) != getattr(config, key)]
    if diffs:
        raise ValueError(f"--resume: {path} was written by a different run: " + "; ".join(diffs))
    if list(resume["classes"]) != classes:
        raise ValueError(f"--resume: the dataset's classes differ from the checkpoint's "
                         f"({len(classes)} vs {len(resume['classes'])} classes)")
    return resume


def build_model(config: TrainConfig, num_classes: int, resume: dict[str, Any] | None
                ) -> tuple[nn.Module, list[nn.Module]]:
    """``(model, frozen modules)``: the resumed run's architecture, the pretrained network of
    ``init_from`` with a new classifier (or its architecture from scratch), or a new model.
    A fine-tuning run's model fields are set from the pretrained checkpoint, so its
    config.json tells the truth."""
    from vidconv.models import build

    cfg = config
    if resume is not None:
        model = ckpt_io.build_model(resume["model"])
    elif cfg.init_from is not None:
        init = ckpt_io.load_checkpoint(cfg.init_from)
        if cfg.finetune_mode == "scratch":
            model = ckpt_io.build_model({**init["model"], "num_classes": num_classes})
        else:
            model = ckpt_io.build_model(init["model"])
            try:
                model.load_state_dict(init["state_dict"])
            except RuntimeError as exc:
                raise ValueError(f"checkpoint {cfg.init_from} does not fit "
                                 f"{ckpt_io.describe(init['model'])}: {exc}") from exc
            model.reset_classifier(num_classes)
        info = init["model"]
        cfg.model, cfg.multires, cfg.stream, cfg.width = (
            info["name"], info["multires"], info["stream"], info["width"])
    else:
        model = build(cfg.model, num_classes, multires=cfg.multires, stream=cfg.stream,
                      width=cfg.width, dropout=cfg.dropout)
    frozen: list[nn.Module] = []
    if cfg.finetune_mode is not None:
        frozen = apply_finetune(model, cfg.finetune_mode, cfg.keep_prob)
    elif cfg.keep_prob is not None:
        model.set_dropout(1.0 - cfg.keep_prob)
    return model, frozen


def build_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or AdamW, over the trainable `params` only."""
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
                    ) -> Any:
    """Cosine over `total_steps`, plateau (stepped with the windowed mean loss), or None."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config.lr_factor, patience=config.patience)
    return None
