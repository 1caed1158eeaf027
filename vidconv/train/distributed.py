"""How the ranks of a torchrun job agree: on a number (mean / max / sum / min), on the RNG
states to checkpoint, and on the outcome of work only rank 0 does (preparing the run
directory), so that an error there stops every rank instead of leaving the others waiting.

A single process is a group of one, for which every call is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# What a rank-0-only step may fail with and every rank should report the same way.
SHARED_ERRORS = (OSError, ValueError)


@dataclass
class Group:
    """This process's place in the job: ``rank`` of ``world`` (``local_rank`` on its node).
    ``created``: this object started the process group (and so ends it in :meth:`close`)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False
    comm_device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, value: float, op: str = "mean") -> float:
        """`value` combined over the ranks: "mean", "sum", "max" or "min"."""
        if op not in ("mean", "sum", "max", "min"):
            raise ValueError(f"op must be mean, sum, max or min, got {op!r}")
        if self.world == 1:
            return float(value)
        t = torch.tensor([value], dtype=torch.float64, device=self.comm_device)
        reduce_op = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}.get(op,
                                                                             dist.ReduceOp.SUM)
        dist.all_reduce(t, op=reduce_op)
        return t.item() / (self.world if op == "mean" else 1)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only; if it raises an OSError or ValueError, every rank raises
        it (the other ranks get the same type and message); anything else rank 0 raises stops
        the other ranks with a RuntimeError naming it (rather than leaving them waiting), and
        rank 0 raises it as it is. Returns fn's result on rank 0, None elsewhere."""
        result: T | None = None
        failure: tuple[str, str] | None = None
        own: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:
                if self.world == 1:
                    raise
                own = exc
                kind = ("OSError" if isinstance(exc, OSError) else
                        "ValueError" if isinstance(exc, ValueError) else "other")
                failure = (kind, str(exc) if kind != "other" else
                           f"rank 0 failed: {type(exc).__name__}: {exc}")
        if self.world > 1:
            box = [failure]
            dist.broadcast_object_list(box, src=0)
            failure = box[0]
            if own is not None and not isinstance(own, SHARED_ERRORS):
                raise own
            if failure is not None:
                kind, message = failure
                raise {"OSError": OSError, "ValueError": ValueError}.get(kind, RuntimeError)(
                    message)
        return result

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()
            self.created = False


def init_group(device_hint: str) -> Group:
    """The group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one that already
    exists is joined, not re-created. NCCL when the ranks use CUDA, gloo otherwise."""
    use_cuda = torch.cuda.is_available() and device_hint != "cpu"
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        comm = (torch.device("cuda", local_rank)
                if dist.get_backend() == "nccl" else torch.device("cpu"))
        return Group(dist.get_rank(), dist.get_world_size(), local_rank, False, comm)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    comm = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, True, comm)
