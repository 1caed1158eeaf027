"""The one place vidconv.train reaches into vidconv.data: opening a dataset, building a loader
and reading its report of skipped videos."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vidconv.clip import ClipSpec


def open_data(data: str, root: str | None = None) -> Any:
    """A dataset folder (root/<class>/<video>) or a list file, as a vidconv.data source.

    Raises:
        FileNotFoundError / ValueError from the loader, naming the path.
    """
    from vidconv.data import open_source

    source = open_source(data, root=root)
    if not source.videos:
        raise ValueError(f"dataset {data!r} holds no videos")
    return source


def make_loader(source: Any, spec: ClipSpec, *, batch_size: int, train: bool,
                device: torch.device | str, backend: str = "auto", seed: int = 0,
                clips_per_video: int = 20, views: int = 1, shard_id: int | None = None,
                num_shards: int | None = None, workers: int = 0,
                worker_type: str = "thread") -> Any:
    from vidconv.data import ClipLoader

    return ClipLoader(source, spec, batch_size=batch_size, train=train,
                      clips_per_video=clips_per_video, views=views, device=str(device),
                      backend=backend, seed=seed, shard_id=shard_id, num_shards=num_shards,
                      strict=False, num_workers=workers, worker_type=worker_type)


def loader_report(loader: Any) -> dict[str, Any] | None:
    """The loader's report of skipped videos as a JSON-friendly dict (None if it has none)."""
    report = getattr(loader, "report", None)
    if report is None:
        return None
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        report = dataclasses.asdict(report)
    elif hasattr(report, "to_dict"):
        report = report.to_dict()
    elif not isinstance(report, dict):
        return {"text": str(report)}
    return _jsonable(report)


def skipped_count(report: dict[str, Any] | None) -> int:
    """How many videos the loader skipped, from its report."""
    if not report:
        return 0
    for key in ("num_skipped", "skipped_count", "n_skipped"):
        if isinstance(report.get(key), int):
            return report[key]
    skipped = report.get("skipped")
    if isinstance(skipped, int):
        return skipped
    if isinstance(skipped, list | dict):
        return len(skipped)
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def to_device(inputs: Any, device: torch.device, channels_last: bool) -> Any:
    """Move a batch's inputs (a tensor or the (fovea, context) pair) to `device`."""
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_device(x, device, channels_last) for x in inputs)
    inputs = inputs.to(device, non_blocking=True)
    if channels_last and inputs.dim() == 5:
        inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
    return inputs
