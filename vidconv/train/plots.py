"""PNG plots of evaluation reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib (pip install 'vidconv[plot]')") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fig_width(n: int) -> float:
    return min(max(6.0, 0.25 * n + 2), 40.0)


def plot_per_class(report: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of video accuracy per class, sorted from best to worst."""
    plt = _pyplot()
    pairs = [(c, a) for c, a in zip(report["classes"], report["per_class"], strict=True)
             if a is not None]
    pairs.sort(key=lambda p: -p[1])
    fig, ax = plt.subplots(figsize=(_fig_width(len(pairs)), 4))
    ax.bar(range(len(pairs)), [a for _, a in pairs], color="tab:blue")
    ax.set_xticks(range(len(pairs)), [c for c, _ in pairs], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("video accuracy")
    ax.set_title(f"{report['model']['name']}: per-class accuracy (video hit@1 "
                 f"{report['video_hit1']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_confusion(report: dict[str, Any], path: str | Path) -> Path:
    """Row-normalised confusion matrix (rows = true class)."""
    import numpy as np

    plt = _pyplot()
    conf = np.asarray(report["confusion"], dtype=float)
    rows = conf.sum(axis=1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    n = len(report["classes"])
    side = min(max(5.0, 0.2 * n + 3), 40.0)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), report["classes"], rotation=90, fontsize=7)
        ax.set_yticks(range(n), report["classes"], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_compare(result: dict[str, Any], path: str | Path, top: int = 10) -> Path:
    """Classes gaining and losing most (B - A), as horizontal bars."""
    plt = _pyplot()
    rows = result["gains"][:top] + list(reversed(result["losses"][:top]))
    rows = sorted(rows, key=lambda r: r["diff"])
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * len(rows) + 1.5)))
    colors = ["tab:green" if r["diff"] > 0 else "tab:red" for r in rows]
    ax.barh(range(len(rows)), [r["diff"] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)), [r["class"] for r in rows], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    a, b = result["names"]
    label = "average precision" if result["metric"] == "ap" else "accuracy"
    ax.set_xlabel(f"{label}: {b} - {a}")
    ax.set_title(f"per-class {label}, {b} vs {a}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
