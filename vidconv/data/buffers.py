"""Batch buffers on the CPU that are written again once nobody holds them.

A float32 batch of 32 full-resolution clips is 111 MB. Allocated afresh for every batch, its
pages are faulted in and zeroed by the kernel before the preprocessing op writes them: on the
project's 2-core machine that took as long as the op itself. :class:`BufferPool` hands a batch
tensor out again once the only reference left to its memory is the pool's own, so a training
loop that lets go of each batch (the usual ``for batch in loader``) writes into the same few
buffers, already mapped.

The test is the storage's reference counts: every tensor sharing the memory (views, ``.numpy()``
arrays, autograd's saved tensors, DLPack capsules) holds a reference to it, and a held
``untyped_storage()`` / ``storage()`` object one to the storage's Python object, so a buffer
some of which is still in use anywhere is never handed out. A buffer moved to shared memory
(``share_memory_``, e.g. to be sent to another process) or resized leaves the pool for good:
another process may still read it, or it no longer holds a batch.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

import torch


def _use_count(storage: torch.UntypedStorage) -> int | None:
    """The storage's reference count, or None where this torch does not expose it."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    return int(count(storage._cdata))


class BufferPool:
    """Up to ``capacity`` CPU tensors, each handed out again when nothing else refers to it.

    Thread-safe. Tensors beyond the capacity (all buffers in use, e.g. a caller keeping every
    batch) are allocated as usual and not kept.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        self.capacity = capacity
        # (key, buffer, its size in bytes, the storage's reference counts (C++, Python object)
        # when nothing but the pool holds it)
        self._entries: list[tuple[tuple, torch.Tensor, int, tuple[int, int]]] = []
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, shape: Sequence[int], dtype: torch.dtype,
             memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """A CPU tensor of ``shape``, ``dtype`` and ``memory_format`` with unspecified values:
        a free pooled one when there is one, else a new one (kept when there is room). Made
        outside inference mode and on the CPU whatever the caller's defaults."""
        key = (tuple(int(s) for s in shape), dtype, memory_format)
        with self._lock:
            # Moved to shared memory (another process may read it) or resized (the user freed
            # it): never written again.
            self._entries = [e for e in self._entries if not e[1].untyped_storage().is_shared()
                             and e[1].untyped_storage().nbytes() == e[2]]
            for k, buf, _, idle in self._entries:
                if k == key and storage_references(buf) == idle:
                    self.reused += 1
                    # A new tensor object on the memory: its reference marks the buffer taken.
                    return buf.detach()
            self.allocated += 1
            with torch.inference_mode(False):
                fresh = torch.empty(key[0], dtype=dtype, device="cpu",
                                    memory_format=memory_format)
            idle = storage_references(fresh)
            if self.capacity == 0 or idle is None:
                return fresh
            if len(self._entries) >= self.capacity:
                # Make room by dropping a buffer of another shape that nobody holds (the last
                # batch of an epoch, an evaluation's batch size); if all are held, keep none.
                for i, (k, buf, _, idle_k) in enumerate(self._entries):
                    if k != key and storage_references(buf) == idle_k:
                        del self._entries[i]
                        break
                else:
                    return fresh
            self._entries.append((key, fresh, fresh.untyped_storage().nbytes(), idle))
            return fresh.detach()


def storage_references(buf: torch.Tensor) -> tuple[int, int] | None:
    """The reference counts of ``buf``'s storage: C++ (tensors, views, arrays on it) and of its
    Python storage object (a held ``untyped_storage()``), measured the same way each time; None
    where this torch does not expose the first."""
    storage = buf.untyped_storage()
    count = _use_count(storage)
    return None if count is None else (count, sys.getrefcount(storage))
