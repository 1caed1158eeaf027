"""Training, video-level evaluation and transfer learning for the paper's networks.

>>> from vidconv.train import TrainConfig, train, evaluate
>>> summary = train(TrainConfig(data="videos/", out="runs/sf", model="single_frame", width=0.25))
>>> report = evaluate(summary["checkpoint"], "videos_test/", clips=20, views=4)
>>> report["video_hit1"]

The command line (``vidconv train|evaluate|finetune|compare``) wraps these functions.
"""

from __future__ import annotations

from vidconv.train.checkpoint import load_checkpoint, load_model, save_checkpoint
from vidconv.train.config import TrainConfig
from vidconv.train.engine import Trainer, train
from vidconv.train.evaluation import compare, evaluate, load_groups
from vidconv.train.finetune import finetune
from vidconv.train.freezing import apply_finetune, trainable_groups

__all__ = [
    "TrainConfig",
    "Trainer",
    "apply_finetune",
    "compare",
    "evaluate",
    "finetune",
    "load_checkpoint",
    "load_groups",
    "load_model",
    "save_checkpoint",
    "train",
    "trainable_groups",
]
