"""Freezing for transfer learning: which layer groups a fine-tuning mode retrains, and the
frozen ones made really frozen.

Frozen layers have ``requires_grad=False``, are not given to the optimiser (so weight decay and
momentum cannot move them either), and stay in eval mode while the rest trains (dropout before
a frozen layer is off, any normalisation statistics untouched).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from vidconv.train.config import FINETUNE_MODES

# The dropout layer in front of each fully connected group of a VideoNet.
_DROPOUT_BEFORE = {"fc1": "drop1", "fc2": "drop2", "classifier": "drop3"}


def trainable_groups(model: nn.Module, mode: str) -> list[str]:
    """Names of the layer groups (VideoNet.layer_groups) a fine-tuning mode retrains."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"mode must be one of {FINETUNE_MODES}, got {mode!r}")
    names = [name for name, _ in model.layer_groups()]
    if mode == "top":
        return names[-1:]
    if mode == "top3":
        return names[-3:]
    return names


def apply_finetune(model: nn.Module, mode: str, keep_prob: float | None = None
                   ) -> list[nn.Module]:
    """Freeze what `mode` keeps fixed and set dropout before every retrained FC layer to
    ``1 - keep_prob`` (None leaves the model's dropout). Returns the frozen modules, which
    :func:`set_train_mode` keeps in eval mode."""
    train_names = set(trainable_groups(model, mode))
    frozen: list[nn.Module] = []
    for name, group in model.layer_groups():
        trainable = name in train_names
        for p in group.parameters():
            p.requires_grad_(trainable)
        drop = getattr(model, _DROPOUT_BEFORE[name]) if name in _DROPOUT_BEFORE else None
        if trainable:
            if drop is not None and keep_prob is not None:
                drop.p = 1.0 - float(keep_prob)
        else:
            frozen.append(group)
            if drop is not None:
                frozen.append(drop)
    # Parameters outside every layer group (none in VideoNet today) follow "all" semantics only.
    grouped = {id(p) for _, g in model.layer_groups() for p in g.parameters()}
    if mode in ("top", "top3"):
        for p in model.parameters():
            if id(p) not in grouped:
                p.requires_grad_(False)
    return frozen


def set_train_mode(model: nn.Module, frozen: Iterable[nn.Module]) -> None:
    """model.train(), then the frozen modules back to eval."""
    model.train()
    for module in frozen:
        module.eval()
