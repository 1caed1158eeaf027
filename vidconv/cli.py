"""The ``vidconv`` command line: train, evaluate, fine-tune and compare the paper's networks.

    vidconv synth data/synth                       # a small labelled dataset: train/ + test/
    vidconv train DATA --out runs/sf --model single_frame --width 0.25
    vidconv evaluate runs/sf/checkpoint.pt TEST_DATA --clips 20 --views 4 --out runs/sf/eval
    vidconv finetune runs/sf/checkpoint.pt UCF_DATA --mode top3 --keep-prob 0.1 --out runs/ft
    vidconv compare runs/sf/eval/report.json runs/slow/eval/report.json --names single slow
    vidconv baseline ...        (the feature-histogram baseline, vidconv.baselines)
    vidconv prepare VIDEOS prepared/  (decode once into JPEG tar shards; train on prepared/)

Multi-process training: ``torchrun --nproc_per_node 8 -m vidconv train ...``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vidconv.train.config import (
    FINETUNE_MODES,
    MAX_SEED,
    OPTIMIZERS,
    SCHEDULES,
    WORKER_TYPES,
)

# vidconv.data.loader.BACKENDS, spelled out so that building the parser imports no loader
# (tests/test_torchcodec.py checks the two agree).
BACKEND_CHOICES = ("auto", "pyav", "dali", "torchcodec")

PAPER = "Karpathy et al. 2014"


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text!r}"
                                         ) from None
    if not 0 <= value < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return value


def _even_size(text: str) -> int:
    value = _positive_int(text)
    if value < 8 or value % 2:
        raise argparse.ArgumentTypeError(f"must be an even number of pixels >= 8 (the videos "
                                         f"are yuv420p), got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def _fraction(text: str, *, drop: bool) -> float:
    """A drop probability in [0, 1) or a keep probability in (0, 1]: dropping every unit (or
    keeping none) would leave nothing to train."""
    value = _finite_float(text)
    if drop and not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be a drop probability in [0, 1) (1 would drop every unit), got {text}")
    if not drop and not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"must be a keep probability in (0, 1] (0 would keep no unit), got {text}")
    return value


def _drop_probability(text: str) -> float:
    return _fraction(text, drop=True)


def _keep_probability(text: str) -> float:
    return _fraction(text, drop=False)


class _DropoutAs(argparse.Action):
    """``--dropout P`` (drop probability) and ``--keep-prob Q`` (keep probability) are two
    spellings of one setting: each stores into the command's own destination, converted
    (``P = 1 - Q``), so both commands accept both and neither changes meaning."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        value = float(values)
        given_as = "keep_prob" if option_string == "--keep-prob" else "dropout"
        if given_as != self.dest:
            value = round(1.0 - value, 12)  # 1 - 0.9 is 0.09999999999999998 in binary
        setattr(namespace, self.dest, value)


def _add_dropout(group: Any, *, dest: str, default: float, where: str) -> None:
    """The mutually exclusive pair ``--dropout P`` / ``--keep-prob Q``, stored as `dest`
    ("dropout" or "keep_prob") with `default` in that unit."""
    pair = group.add_mutually_exclusive_group()
    drop_default = default if dest == "dropout" else 1 - default
    pair.add_argument("--dropout", dest=dest, type=_drop_probability, action=_DropoutAs,
                      default=default, metavar="P",
                      help=f"dropout {where}, as the probability of DROPPING a unit (default "
                           f"{drop_default:g}); the same as --keep-prob 1-P")
    pair.add_argument("--keep-prob", dest=dest, type=_keep_probability, action=_DropoutAs,
                      default=default, metavar="Q",
                      help=f"the same dropout as the probability of KEEPING a unit (default "
                           f"{1 - drop_default:g}; the paper's fine-tuning went as low as "
                           "0.1); the same as --dropout 1-Q")


# Views per evaluation clip, in vidconv.data.loader.VIEWS order (a test keeps the two in step).
MAX_VIEWS = 10


def _views(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer 1 to {MAX_VIEWS}, "
                                         f"got {text!r}") from None
    if not 1 <= value <= MAX_VIEWS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_VIEWS}, got {text}")
    return value


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="dataset folder (DATA/<class>/<video>) or a list file "
                                "(UCF-101 split format)")
    p.add_argument("--root", default=None, help="video root for a list file")


def _add_training(p: argparse.ArgumentParser, *, finetune: bool) -> None:
    g = p.add_argument_group("optimisation (defaults: the paper's)")
    g.add_argument("--out", default="runs/finetune" if finetune else "runs/run",
                   help="run directory: checkpoint.pt, metrics.csv, summary.json (default "
                        "%(default)s); one that already holds a run is refused unless "
                        "--resume or --overwrite is given, and one that another run is "
                        "using is refused")
    g.add_argument("--batch-size", type=_positive_int, default=32)
    g.add_argument("--steps", type=_positive_int, default=None,
                   help="optimiser steps in total (default: --epochs passes over the data)")
    g.add_argument("--epochs", type=_positive_int, default=1)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    g.add_argument("--lr", type=_finite_float, default=1e-3)
    g.add_argument("--momentum", type=_finite_float, default=0.9)
    g.add_argument("--weight-decay", type=_finite_float, default=5e-4)
    g.add_argument("--schedule", choices=SCHEDULES, default="plateau",
                   help="plateau: lower the LR when the training loss stops improving")
    g.add_argument("--lr-factor", type=_finite_float, default=0.1, help="plateau: LR multiplier")
    g.add_argument("--patience", type=_positive_int, default=2,
                   help="plateau: checks without improvement before lowering the LR")
    g.add_argument("--plateau-window", type=_positive_int, default=None,
                   help="plateau: steps per check (default one epoch, at least 100)")
    g.add_argument("--grad-clip", type=_finite_float, default=None, help="clip the gradient norm")
    g.add_argument("--no-amp", dest="amp", action="store_false",
                   help="no bf16 autocast (autocast is used on CUDA only)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCDHW instead of channels_last_3d (CUDA only)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--seed", type=_seed, default=0, help="integer in [0, 2**32)")
    g.add_argument("--checkpoint-every", type=_positive_int, default=500,
                   help="steps between checkpoints (one is also written at the end and on "
                        "Ctrl-C / SIGTERM)")
    g.add_argument("--log-every", type=_positive_int, default=10)
    g.add_argument("--workers", type=int, default=0,
                   help="loader workers making batches ahead (default 0: none)")
    g.add_argument("--worker-type", default="thread", choices=WORKER_TYPES,
                   help="threads (default) or processes; processes scale with the cores "
                        "where threads stop at the loader's Python (see ClipLoader)")
    g.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="video decoder (see ClipLoader: auto picks per file)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar: one line per metrics row on stderr instead")
    once = g.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true",
                      help="continue from OUT/checkpoint.pt exactly where it stopped")
    once.add_argument("--overwrite", action="store_true",
                      help="replace the run in OUT (its checkpoint, config, metrics, summary "
                           "and tensorboard logs)")


def build_parser() -> argparse.ArgumentParser:
    from vidconv.models import list_models

    parser = argparse.ArgumentParser(
        prog="vidconv",
        description=f"Train and evaluate the video CNNs of {PAPER} (single-frame, early, late, "
                    "slow fusion; multiresolution).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a model on a video dataset",
                       description="Train a network; augmentation (random crop + flip per "
                                   "clip) is the loader's.")
    _add_data(p)
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=list_models(), default="single_frame")
    m.add_argument("--multires", action="store_true", help="fovea + context streams (89x89)")
    m.add_argument("--stream", choices=("both", "fovea", "context"), default="both",
                   help="with --multires: one stream only")
    m.add_argument("--width", type=_finite_float, default=1.0,
                   help="scale of every layer's width")
    _add_dropout(m, dest="dropout", default=0.5, where="before each FC layer")
    _add_training(p, finetune=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="clip and video hit@k with the paper's protocol",
                       description="Video-level evaluation: CLIPS clips per video, each in "
                                   "VIEWS crops/flips, scores averaged per video.")
    p.add_argument("checkpoint", help="checkpoint.pt (or a run directory)")
    _add_data(p)
    p.add_argument("--clips", type=_positive_int, default=20, help="clips per video (paper: 20)")
    p.add_argument("--views", type=_views, default=4,
                   help=f"views per clip, 1 to {MAX_VIEWS}, taken in this order: centre, "
                        "centre flipped, top-left, bottom-right flipped, top-right, "
                        "bottom-left flipped, then those four corners with the other flip "
                        "(default 4, the paper's: the centre and two opposite corners, each "
                        "once flipped); multires models keep the fovea centred, so their "
                        "views differ by flip only")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--groups", default=None, help="JSON file mapping class -> group")
    p.add_argument("--out", default=None, help="directory for report.json and the PNG plots "
                                               "(default: CHECKPOINT's run dir /eval)")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0,
                   help="loader workers making batches ahead (default 0: none)")
    p.add_argument("--worker-type", default="thread", choices=WORKER_TYPES,
                   help="threads (default) or processes (see ClipLoader)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("finetune", help="transfer a trained model to new classes",
                       description="New classifier for DATA's classes; retrain the top layer, "
                                   "the top three, all layers, or train from scratch.")
    p.add_argument("checkpoint", help="checkpoint.pt of the pretrained model")
    _add_data(p)
    p.add_argument("--mode", choices=FINETUNE_MODES, default="top",
                   help="top: classifier only; top3: fc1, fc2, classifier; all; scratch: same "
                        "architecture, random init")
    _add_dropout(p, dest="keep_prob", default=0.5, where="before every retrained FC layer")
    _add_training(p, finetune=True)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("compare", help="per-class gains/losses of model B over model A",
                       description="The paper's motion-contribution analysis: per-class "
                                   "difference B - A of two evaluation reports.")
    p.add_argument("a", help="report.json of model A (e.g. single frame)")
    p.add_argument("b", help="report.json of model B (e.g. slow fusion)")
    p.add_argument("--names", nargs=2, default=("A", "B"), metavar=("NAME_A", "NAME_B"))
    p.add_argument("--metric", choices=("auto", "ap", "accuracy"), default="auto")
    p.add_argument("--top", type=_positive_int, default=10)
    p.add_argument("--out", default=None, help="directory for compare.json and compare.png")
    p.set_defaults(func=cmd_compare)

    _add_prepare(sub)
    _add_synth(sub)
    _add_baseline(sub)
    return parser


def _add_prepare(sub: Any) -> None:
    p = sub.add_parser(
        "prepare", help="decode a video dataset once into JPEG-frame tar shards",
        description="Decode every video of SRC once (upright, centre square, resized as the "
                    "loader does) and write WebDataset tar shards of JPEG frames plus an index "
                    "to OUT; train/evaluate/finetune then read OUT like a video dataset. Bad "
                    "videos are skipped and listed in OUT/report.json; running the same command "
                    "again resumes a killed prepare.")
    p.add_argument("src", help="video dataset folder (SRC/<class>/<video>) or a list file")
    p.add_argument("out", help="output folder (index.json, shard-NNNNNN.tar, report.json)")
    p.add_argument("--root", default=None, help="video root for a list file")
    p.add_argument("--frame-size", type=int, choices=(200, 178), default=200,
                   help="200 for full-resolution models, 178 for multiresolution ones")
    p.add_argument("--fps", type=float, default=None,
                   help="keep about this many frames per second (default: every frame)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="decoding processes (default: the CPU count)")
    p.add_argument("--shard-size", type=float, default=1024.0, metavar="MB",
                   help="close a shard once it holds this many MiB (default 1024)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from vidconv.data.prepare import prepare

    if not args.shard_size > 0:
        return _fail(f"--shard-size must be a positive number of MiB, got {args.shard_size}")
    try:
        report = prepare(args.src, args.out, frame_size=args.frame_size, fps=args.fps,
                         quality=args.quality, workers=args.workers, root=args.root,
                         shard_bytes=max(1, int(args.shard_size * (1 << 20))),
                         progress=args.progress)
    except KeyboardInterrupt:
        print(f"vidconv: prepare interrupted; finished shards are kept in {args.out}, run the "
              "same command again to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        where = exc.filename or args.out
        return _fail(f"{where}: {exc.strerror or exc}")
    print(f"prepared {report.num_prepared} of {report.num_videos} videos "
          f"({report.resumed_videos} from an earlier run) into {report.num_shards} shard(s), "
          f"{report.num_skipped} skipped; {report.realtime_factor:.1f}x real time, "
          f"JPEG by {report.jpeg}")
    for row in report.skipped:
        print(f"skipped {row['source']}: {row['reason']}")
    print(f"index: {Path(args.out) / 'index.json'}")


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _add_synth(sub: Any) -> None:
    p = sub.add_parser(
        "synth", help="write a small labelled synthetic video dataset (train/ and test/)",
        description="Write labelled synthetic videos (vidconv.data.synthetic): one moving "
                    "object per video, classes told apart by appearance, motion or both, with "
                    "camera motion, clutter and noise as distractors; real VP9 (WebM) or H.264 "
                    "(MP4) files in OUT/train/<class>/ and OUT/test/<class>/, from different "
                    "scenes. Rerunning with the same options reuses the files.",
        epilog="Then: vidconv train OUT/train --out runs/synth && "
               "vidconv evaluate runs/synth OUT/test")
    p.add_argument("out", help="folder to write: OUT/train and OUT/test (created)")
    p.add_argument("--classes", default="4",
                   help="how many classes (the first N of the catalogue: up to 8 that differ "
                        "in appearance and motion come first, then motion-only and "
                        "appearance-only pairs; default 4), or comma-separated class names")
    p.add_argument("--videos", type=_positive_int, default=8,
                   help="training videos per class (default 8)")
    p.add_argument("--test-videos", type=_nonnegative_int, default=4,
                   help="test videos per class (default 4; 0: no test split)")
    p.add_argument("--frames", type=_positive_int, default=32,
                   help="frames per video (default 32; early and slow fusion need 10, late "
                        "fusion 15)")
    p.add_argument("--size", type=_even_size, default=64,
                   help="frame height and width in pixels, even (default 64)")
    p.add_argument("--codec", choices=("vp9", "h264"), default="vp9")
    p.add_argument("--seed", type=_nonnegative_int, default=0,
                   help="picks the scenes; another seed gives other videos (default 0)")
    p.add_argument("--camera", type=_unit_interval, default=0.2,
                   help="probability of camera motion per video (default 0.2)")
    p.add_argument("--clutter", type=_nonnegative_int, default=2,
                   help="distractor shapes per video (default 2)")
    p.add_argument("--noise", type=_nonnegative_float, default=3.0,
                   help="sensor noise, std in 8-bit levels (default 3)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="processes that render and encode (default: 1 for small datasets)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--list-classes", action="store_true",
                   help="print the class catalogue (name, kind, group) and exit")
    p.set_defaults(func=cmd_synth)


def _synth_classes(text: str) -> int | list[str]:
    text = text.strip()
    if text.isdigit():
        return int(text)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--classes must be a count or class names, got {text!r}")
    return names


def cmd_synth(args: argparse.Namespace) -> int:
    """Write OUT/train (and OUT/test) with vidconv.data.synthetic.write_dataset."""
    import time

    try:
        from vidconv.data import synthetic
    except ImportError as exc:
        return _fail(f"vidconv synth needs numpy: {exc}")
    if args.list_classes:
        for name in synthetic.DEFAULT_ORDER:
            spec = synthetic.CATALOGUE[name]
            print(f"{name:<34} {spec.kind:<10} {spec.group}")
        return 0
    try:
        import av  # noqa: F401  (write_dataset imports it per video; fail before any work)
    except ImportError as exc:
        return _fail(f"vidconv synth writes videos with PyAV, which is not installed ({exc}); "
                     "install it with: pip install av")
    try:
        classes = synthetic.class_specs(_synth_classes(args.classes))
    except (TypeError, ValueError) as exc:
        return _fail(f"--classes: {exc}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _fail(f"OUT {out} exists and is not a folder")
    splits = [("train", args.videos, 0)] + ([("test", args.test_videos, 1)]
                                             if args.test_videos else [])
    for split, _, _ in splits:
        folder = out / split
        # Never mix synthetic classes into someone's real dataset: only a folder this command
        # wrote (it has a manifest) or an empty one is written into.
        if folder.is_dir() and any(folder.iterdir()) and not (
                folder / synthetic.MANIFEST).is_file():
            return _fail(f"{folder} exists, is not empty and is not a synthetic dataset (no "
                         f"{synthetic.MANIFEST}); choose another OUT")
    t0 = time.perf_counter()
    written = []
    try:
        for split, videos, stream in splits:
            # Train and test scenes come from separate seed streams: no scene is in both.
            info = synthetic.write_dataset(
                out / split, classes=classes, videos_per_class=videos, frames=args.frames,
                size=args.size, codec=args.codec, seed=(args.seed, stream), camera=args.camera,
                clutter=args.clutter, noise=args.noise, workers=args.workers,
                progress=args.progress)
            written.append((split, videos, info["reused"]))
    except KeyboardInterrupt:
        print("vidconv: interrupted; the finished videos are complete files, and the same "
              "command writes the rest", file=sys.stderr)
        return 130
    except OSError as exc:
        return _fail(f"cannot write {exc.filename or out}: {exc.strerror or exc}")
    seconds = time.perf_counter() - t0
    names = sorted(s.name for s in classes)
    for split, videos, reused in written:
        print(f"{out / split}: {len(names)} classes x {videos} videos "
              f"({'reused, unchanged' if reused else 'written'})")
    print(f"classes: {', '.join(names)} ({seconds:.1f}s)")
    if args.test_videos:
        print(f"next: vidconv train {out / 'train'} --out runs/synth && "
              f"vidconv evaluate runs/synth {out / 'test'}")
    return 0


def _add_baseline(sub: Any) -> None:
    try:
        from vidconv.baselines import cli as baselines_cli
    except ImportError as exc:
        error = str(exc)
        p = sub.add_parser("baseline", help="feature-histogram baseline (unavailable)",
                           add_help=True)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args: _fail(
            f"the baseline needs vidconv.baselines, which could not be imported: {error}"))
        return
    baselines_cli.add_parser(sub)


def _fail(message: str) -> int:
    print(f"vidconv: error: {message}", file=sys.stderr)
    return 2


def _train_fields(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("root", "out", "batch_size", "steps", "epochs", "optimizer", "lr", "momentum",
            "weight_decay", "schedule", "lr_factor", "patience", "plateau_window", "grad_clip",
            "amp", "channels_last", "device", "seed", "checkpoint_every", "log_every", "workers",
            "worker_type", "backend", "progress", "resume", "overwrite")
    return {k: getattr(args, k) for k in keys}


def _print_summary(summary: dict[str, Any]) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for all
        return
    state = "interrupted, checkpoint saved" if summary["interrupted"] else "done"
    print(f"{state}: {summary['steps']}/{summary['total_steps']} steps, loss "
          f"{summary['final_loss']:.4f}, train clip acc {summary['train_clip_acc']:.3f}, "
          f"{summary['clips_per_s']:.1f} clips/s on {summary['device']}, "
          f"{summary['skipped_videos']} video(s) skipped")
    print(f"checkpoint: {summary['checkpoint']}")


def cmd_train(args: argparse.Namespace) -> int:
    from vidconv.train import TrainConfig, train

    config = TrainConfig(data=args.data, model=args.model, multires=args.multires,
                         stream=args.stream, width=args.width, dropout=args.dropout,
                         **_train_fields(args))
    summary = train(config)
    _print_summary(summary)
    return 130 if summary["interrupted"] else 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from vidconv.train import TrainConfig, train

    config = TrainConfig(data=args.data, init_from=args.checkpoint, finetune_mode=args.mode,
                         keep_prob=args.keep_prob, **_train_fields(args))
    summary = train(config)
    _print_summary(summary)
    return 130 if summary["interrupted"] else 0


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vidconv.train import evaluate

    out = args.out
    if out is None:
        ckpt = Path(args.checkpoint)
        out = (ckpt if ckpt.is_dir() else ckpt.parent) / "eval"
    report = evaluate(args.checkpoint, args.data, root=args.root, clips=args.clips,
                      views=args.views, batch_size=args.batch_size, device=args.device,
                      groups=args.groups, out=out, plots=args.plots, progress=args.progress,
                      backend=args.backend, workers=args.workers,
                      worker_type=args.worker_type)
    print(f"{report['model']['name']}: {report['num_videos']} videos, {report['num_clips']} "
          f"clips ({args.clips} clips x {args.views} views), {report['skipped_videos']} skipped")
    print(f"clip hit@1 {_fmt(report['clip_hit1'])}  video hit@1 {_fmt(report['video_hit1'])}  "
          f"video hit@5 {_fmt(report['video_hit5'])}  mAP {_fmt(report['mean_ap'])}")
    for key, why in (report.get("not_applicable") or {}).items():
        print(f"  {key}: not applicable ({why})")
    for group, acc in (report.get("groups") or {}).items():
        print(f"  group {group:<30} video acc {_fmt(acc)}  "
              f"mAP {_fmt(report['groups_ap'].get(group))}")
    print(f"report: {Path(out) / 'report.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vidconv.train import compare

    result = compare(args.a, args.b, names=tuple(args.names), out=args.out, top=args.top,
                     metric=args.metric)
    a, b = result["names"]
    width = max([len(r["class"]) for r in result["rows"]] + [5])
    print(f"per-class {result['metric']}: mean {a} {_fmt(result['mean_a'])}, "
          f"mean {b} {_fmt(result['mean_b'])}")
    for title, rows, none in (("largest gains", result["gains"], f"{b} is above {a}"),
                              ("largest losses", result["losses"], f"{b} is below {a}")):
        print(f"{title} ({b} - {a}):")
        if not rows:  # an empty table reads as a formatting bug; say what it means instead
            print(f"  none: no class where {none}")
            continue
        print(f"  {'class':<{width}}  {a:>8}  {b:>8}  {'diff':>7}")
        for r in rows:
            print(f"  {r['class']:<{width}}  {_fmt(r[a]):>8}  {_fmt(r[b]):>8}  "
                  f"{r['diff']:+7.3f}")
    if args.out:
        print(f"written: {Path(args.out) / 'compare.json'}, {Path(args.out) / 'compare.png'}")
    return 0


def _os_error_text(exc: OSError) -> str:
    """Our own OSErrors carry a sentence; the system's get 'path: cause'."""
    if exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    print(f"vidconv: warning: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vidconv`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from vidconv.host_memory import use_huge_pages

    why_not = use_huge_pages()  # before the first tensor; VIDCONV_HUGE_PAGES=0 turns it off
    if why_not is not None:
        logging.getLogger("vidconv").debug("CPU tensors on 4 KiB pages: %s", why_not)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line, no source path
        try:
            return int(args.func(args) or 0)
        except (ValueError, TypeError, ImportError, FloatingPointError) as exc:
            return _fail(str(exc))
        except OSError as exc:  # FileNotFoundError, a full disk, a run directory in use, ...
            return _fail(_os_error_text(exc))
        except KeyboardInterrupt as exc:
            _fail(str(exc) or "interrupted")
            return 130


if __name__ == "__main__":
    sys.exit(main())

