"""Which device a run uses: the one rule shared by training, evaluation and the benchmarks."""

from __future__ import annotations

import torch

SUPPORTED = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this rank's GPU if CUDA works, else the CPU; "cuda" -> this rank's GPU.

    Raises:
        ValueError: a name torch does not know, a device type vidconv has no kernels for
            (``meta``, ``mps``, ...), or a CUDA device that is not there.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be {SUPPORTED}, got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        # vidconv's ops have CPU and CUDA kernels only; "meta" would build a model without
        # data and fail deep inside the first convolution
        raise ValueError(f"device must be {SUPPORTED}, got {device!r} (vidconv runs on the CPU "
                         "and on CUDA GPUs only)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asked for CUDA but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return dev
