"""Transfer learning as in the paper (Sec. 4.2, Sports-1M -> UCF-101): a new classifier for the
new classes, and the top layer, the top three layers or all layers retrained, or the same
network trained from scratch. The freezing itself is :mod:`vidconv.train.freezing`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vidconv.train.config import TrainConfig
from vidconv.train.engine import train
from vidconv.train.freezing import apply_finetune, set_train_mode, trainable_groups

__all__ = ["apply_finetune", "finetune", "set_train_mode", "trainable_groups"]


def finetune(checkpoint: str | Path, data: str | Path, *, mode: str = "top",
             keep_prob: float | None = 0.5, out: str | Path = "runs/finetune",
             **train_fields: Any) -> dict[str, Any]:
    """Fine-tune the network of `checkpoint` on `data` (new classifier sized to its classes).

    `train_fields` are further :class:`vidconv.train.TrainConfig` fields (lr, steps, ...).
    Returns :func:`vidconv.train.train`'s summary.
    """
    config = TrainConfig(data=str(data), out=str(out), init_from=str(checkpoint),
                         finetune_mode=mode, keep_prob=keep_prob, **train_fields)
    return train(config)
