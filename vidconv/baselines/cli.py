"""`vidconv baseline train|evaluate`: the feature-histogram baseline from the command line.

    vidconv baseline train DATA [--root ROOT] --out baseline.pkl [--words 128] [--classifier mlp]
    vidconv baseline evaluate baseline.pkl DATA [--root ROOT] [--clips-per-video 20] [--json r.json]

DATA is a class-per-folder root (root/<class>/<video>) or a UCF-101-style list file (then --root
is the video root); see `vidconv.data.open_source`. vidconv/cli.py mounts this with
`add_parser(subparsers)`; `main(argv)` runs it standalone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vidconv.baselines.features import FEATURE_TYPES


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="class-per-folder root, or a split list file (UCF-101 format)")
    p.add_argument("--root", default=None, help="video root for a list file")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per clip (default 10; evaluate: the trained baseline's)")
    p.add_argument("--step", type=int, default=None,
                   help="frame step inside a clip (default 1; evaluate: the trained baseline's)")
    # progress bars on by default, as in `vidconv train` / `evaluate`
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="baseline_command", required=True, metavar="{train,evaluate}")
    t = sub.add_parser("train", help="fit vocabularies and classifier on a training source")
    _add_data_args(t)
    t.add_argument("--out", required=True, help="where to write the fitted baseline (.pkl)")
    t.add_argument("--clips-per-video", type=int, default=4,
                   help="random training clips per video (default 4)")
    t.add_argument("--words", type=int, default=128, help="vocabulary size per feature type")
    t.add_argument("--features", default=",".join(FEATURE_TYPES),
                   help=f"comma-separated subset of {','.join(FEATURE_TYPES)}")
    t.add_argument("--classifier", choices=("linear", "mlp"), default="linear",
                   help="linear SVM or one-hidden-layer MLP (the paper's 'neural net')")
    t.add_argument("--hidden", type=int, default=256, help="MLP hidden units")
    t.add_argument("--C", type=float, default=1.0, help="linear SVM regularisation")
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="clip hit@1, video hit@1/hit@5 of a fitted baseline")
    e.add_argument("model", help="a baseline written by `vidconv baseline train`")
    _add_data_args(e)
    e.add_argument("--clips-per-video", type=int, default=20,
                   help="evenly spaced clips per video (paper: 20; default 20)")
    e.add_argument("--video-pooling", choices=("histogram", "scores"), default="histogram",
                   help="classify pooled video histograms (paper) or average clip scores")
    e.add_argument("--groups", default=None,
                   help="JSON file mapping class -> group, or group -> [classes] (accuracy per "
                        "group)")
    e.add_argument("--json", default=None, help="also write the report as JSON here")
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `baseline` subcommand to vidconv's CLI; dispatch with `args.func(args)`."""
    p = subparsers.add_parser(
        "baseline", help="feature-histogram (bag of words) baseline",
        description="The paper's feature-histogram baseline: local HOG / colour / motion "
                    "features, k-means vocabularies, pyramid histograms, linear SVM or MLP.")
    return _configure(p)


def _spec(args: argparse.Namespace, trained: Any = None) -> Any:
    """The clip spec from --frames / --step; evaluate keeps the trained baseline's clip when
    neither is given."""
    from vidconv.baselines.data import baseline_spec

    if args.frames is None and args.step is None and trained is not None:
        spec = getattr(trained, "extra", {}).get("spec")
        if spec is not None:
            return spec
    return baseline_spec(frames=10 if args.frames is None else args.frames,
                         step=1 if args.step is None else args.step)


def _print_report(report: dict[str, Any]) -> None:
    """Fractions with three decimals, as `vidconv evaluate` prints them."""
    def frac(v: float | None) -> str:  # None: no test video of that class / group
        return "-" if v is None else f"{v:.3f}"

    print(f"{report['num_videos']} videos, {report['num_clips']} clips: "
          f"clip hit@1 {frac(report['clip_hit1'])}  video hit@1 {frac(report['video_hit1'])}  "
          f"video hit@5 {frac(report['video_hit5'])}  mAP {frac(report['mean_ap'])}  "
          f"({report['clips_per_s']:,.0f} clips/s, CPU features)")
    for key, why in (report.get("not_applicable") or {}).items():
        print(f"  {key}: not applicable ({why})")
    for name, acc in (report.get("groups") or {}).items():
        print(f"  group {name}: video hit@1 {frac(acc)}")


def run(args: argparse.Namespace) -> int:
    """Run a parsed `baseline` command; returns the exit code."""
    from vidconv.baselines.api import evaluate_baseline, train_baseline
    from vidconv.baselines.histogram import BaselineConfig, FeatureHistogramBaseline
    from vidconv.data import open_source

    # A missing or unreadable baseline is the first thing to report, before probing videos.
    model = (FeatureHistogramBaseline.load(args.model) if args.baseline_command == "evaluate"
             else None)
    source = open_source(args.data, root=args.root)
    if model is None:
        features = tuple(f.strip() for f in args.features.split(",") if f.strip())
        config = BaselineConfig(features=features, words=args.words, classifier=args.classifier,
                                hidden=args.hidden, C=args.C, seed=args.seed)
        model = train_baseline(source, config, spec=_spec(args),
                               clips_per_video=args.clips_per_video, seed=args.seed,
                               progress=args.progress)
        path = model.save(args.out)
        print(f"baseline trained on {model.extra['train_clips']} clips of "
              f"{len(source.videos)} videos ({len(source.classes)} classes) in "
              f"{model.extra['train_seconds']:.1f}s; written to {path}")
        return 0
    from vidconv.train.evaluation import load_groups

    groups = load_groups(args.groups)  # class -> group or group -> [classes], as `evaluate`
    report = evaluate_baseline(model, source, spec=_spec(args, model), groups=groups,
                               clips_per_video=args.clips_per_video,
                               video_pooling=args.video_pooling, progress=args.progress)
    _print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str,
                                                     allow_nan=False) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: argv is what follows `vidconv baseline`."""
    parser = _configure(argparse.ArgumentParser(
        prog="vidconv baseline", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
