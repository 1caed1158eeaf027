"""What a training run tells the user while it runs: ``metrics.csv`` (and TensorBoard when it
is installed), a progress bar, or with the bar off one plain line per metrics row.

The rows are the means over a window of ``log_every`` steps. The window's running sums are
part of the checkpoint (:meth:`LogWindow.state`), so a run stopped mid-window and resumed
writes the same rows as a run never stopped.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vidconv.train.rundir import RunDirError, os_error_message

CSV_FIELDS = ("step", "epoch", "loss", "clip_acc", "lr", "clips_per_s", "elapsed_s")


@dataclass
class LogWindow:
    """Running sums of the steps since the last metrics row."""

    loss_sum: float = 0.0  # sum over clips of the batch-mean loss
    correct: float = 0.0
    count: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, correct: float, n: int) -> None:
        self.loss_sum += loss * n
        self.correct += correct
        self.count += n

    def means(self) -> tuple[float, float]:
        """(mean loss, clip accuracy) of this rank's clips (NaN for an empty window)."""
        if not self.count:
            return float("nan"), float("nan")
        return self.loss_sum / self.count, self.correct / self.count

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def reset(self) -> None:
        self.loss_sum = self.correct = self.count = 0.0
        self.started = time.perf_counter()

    def state(self) -> dict[str, float]:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "count": self.count}

    def load_state(self, state: dict[str, float] | None) -> None:
        self.reset()
        if state:
            self.loss_sum = float(state["loss_sum"])
            self.correct = float(state["correct"])
            self.count = float(state["count"])


def read_rows(path: Path, upto_step: int, *, drop_step: int | None = None
              ) -> tuple[list[dict[str, str]], str | None]:
    """The rows of a metrics.csv with step <= `upto_step` (and not `drop_step`), and a note
    when a damaged tail was dropped.

    A crash can leave NUL bytes at the end of the file (the size was written, the data not)
    or half a row; everything from the first such byte or unreadable row on is dropped, the
    rows before it are kept.
    """
    data = path.read_bytes()
    cut = data.find(b"\0")
    good = data if cut < 0 else data[:cut]
    text = good.decode("utf-8", errors="replace")
    if not text.endswith("\n") and "\n" in text:
        text = text[:text.rindex("\n") + 1]  # a half-written last row
    elif "\n" not in text:
        text = ""
    rows: list[dict[str, str]] = []
    damaged_at: int | None = None
    reader = csv.DictReader(io.StringIO(text))
    for row in reader:
        try:
            step = int(row["step"])
            for key in CSV_FIELDS[1:]:
                float(row[key])
        except (KeyError, TypeError, ValueError):
            damaged_at = reader.line_num
            break
        if step <= upto_step and step != drop_step:
            rows.append({key: row[key] for key in CSV_FIELDS})
    note = None
    kept_text = len(text.encode()) if damaged_at is None else None
    if cut >= 0 or damaged_at is not None or kept_text != len(data):
        what = []
        if cut >= 0:
            what.append(f"{len(data) - cut} byte(s) from byte {cut} on, starting with NULs")
        if damaged_at is not None:
            what.append(f"an unreadable row at line {damaged_at}")
        elif cut < 0:
            what.append("a half-written last row")
        last = rows[-1]["step"] if rows else "none"
        note = (f"{path} had a damaged tail ({'; '.join(what)}), as a crash leaves it: "
                f"dropped it and kept {len(rows)} row(s) (last step {last})")
    return rows, note


class MetricsLog:
    """metrics.csv (rows past a resumed checkpoint's step dropped) and TensorBoard if
    present. Only the main rank writes (``enabled``)."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool, *,
                 drop_step: int | None = None) -> None:
        self.enabled = enabled
        self.file: Any = None
        self.tb: Any = None
        if not enabled:
            return
        path = run_dir / "metrics.csv"
        rows: list[dict[str, str]] = []
        try:
            if resume_step > 0 and path.is_file():
                rows, note = read_rows(path, resume_step, drop_step=drop_step)
                if note:
                    warnings.warn(note, stacklevel=3)
            self.file = path.open("w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)
            self.writer.writeheader()
            self.writer.writerows(rows)
            self.file.flush()
        except OSError as exc:
            self.close()
            raise RunDirError(os_error_message(exc, "write the metrics log", path)) from exc
        self.path = path
        try:
            from torch.utils.tensorboard import SummaryWriter

            # hide the events the CSV dropped: those past the checkpoint, and a dropped row's
            purge = drop_step if drop_step is not None else resume_step + 1
            self.tb = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=purge if resume_step else None)
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def write(self, **row: float) -> None:
        if not self.enabled:
            return
        try:
            self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                                  for k, v in row.items()})
            self.file.flush()
        except OSError as exc:
            raise RunDirError(os_error_message(exc, "write the metrics log", self.path)) from exc
        if self.tb is not None:
            for key in ("loss", "clip_acc", "lr", "clips_per_s"):
                self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class Progress:
    """A tqdm bar (``bar=True``), or else one line on stderr per metrics row, so a run with
    the bar off (a log file, CI) still shows that it is alive. Silent when not ``enabled``
    (ranks other than 0)."""

    def __init__(self, *, total: int, initial: int, desc: str, bar: bool, enabled: bool,
                 unit: str = "step") -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled
        self.bar: Any = None
        if enabled and bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True,
                            desc=desc)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def report(self, step: int, **values: float) -> None:
        """Show a metrics row: in the bar's postfix, or as a line."""
        if not self.enabled:
            return
        shown = {k: (f"{v:.3g}" if abs(v) < 1e-2 and v else f"{v:.3f}")
                 if isinstance(v, float) and math.isfinite(v) else str(v)
                 for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(shown)
            return
        fields = "".join(f" {k} {v}" for k, v in shown.items())
        print(f"{self.desc}: {self.unit} {step}/{self.total}{fields}", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
