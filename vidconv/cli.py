"""The ``vidconv`` command line: train, evaluate, fine-tune and compare the paper's networks.

    vidconv train DATA --out runs/sf --model single_frame --width 0.25
    vidconv evaluate runs/sf/checkpoint.pt TEST_DATA --clips 20 --views 4 --out runs/sf/eval
    vidconv finetune runs/sf/checkpoint.pt UCF_DATA --mode top3 --keep-prob 0.1 --out runs/ft
    vidconv compare runs/sf/eval/report.json runs/slow/eval/report.json --names single slow
    vidconv baseline ...        (the feature-histogram baseline, vidconv.baselines)

Multi-process training: ``torchrun --nproc_per_node 8 -m vidconv train ...``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vidconv.train.config import FINETUNE_MODES, MAX_SEED, OPTIMIZERS, SCHEDULES

PAPER = "Karpathy et al. 2014"


def _positive_int(text: str) -> int:
    value = int(text)
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
    g.add_argument("--workers", type=int, default=0, help="loader worker processes")
    g.add_argument("--backend", default="auto", help="video decoder: auto, pyav, dali")
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
    m.add_argument("--width", type=_finite_float, default=1.0, help="scale of every layer's width")
    m.add_argument("--dropout", type=_finite_float, default=0.5,
                   help="drop probability before FC layers")
    _add_training(p, finetune=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="clip and video hit@k with the paper's protocol",
                       description="Video-level evaluation: CLIPS clips per video, each in "
                                   "VIEWS crops/flips, scores averaged per video.")
    p.add_argument("checkpoint", help="checkpoint.pt (or a run directory)")
    _add_data(p)
    p.add_argument("--clips", type=_positive_int, default=20, help="clips per video (paper: 20)")
    p.add_argument("--views", type=_positive_int, default=4,
                   help="views per clip: 1 = centre, 4 = crops and flips (paper: 4)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--groups", default=None, help="JSON file mapping class -> group")
    p.add_argument("--out", default=None, help="directory for report.json and the PNG plots "
                                               "(default: CHECKPOINT's run dir /eval)")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--backend", default="auto")
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
    p.add_argument("--keep-prob", type=_finite_float, default=0.5,
                   help="dropout keep probability before every retrained FC layer "
                        "(the paper went as low as 0.1)")
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

    _add_baseline(sub)
    return parser


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
            "backend", "progress", "resume", "overwrite")
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
                      backend=args.backend, workers=args.workers)
    print(f"{report['model']['name']}: {report['num_videos']} videos, {report['num_clips']} "
          f"clips ({args.clips} clips x {args.views} views), {report['skipped_videos']} skipped")
    print(f"clip hit@1 {_fmt(report['clip_hit1'])}  video hit@1 {_fmt(report['video_hit1'])}  "
          f"video hit@5 {_fmt(report['video_hit5'])}  mAP {_fmt(report['mean_ap'])}")
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
    for title, rows in (("largest gains", result["gains"]), ("largest losses", result["losses"])):
        print(f"{title} ({b} - {a}):")
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

