"""Worker processes that make a loader's batches, so decoding scales with the CPU's cores.

Threads share one interpreter: the JPEG decoder and the preprocessing ops release the GIL,
but the loader's Python between them does not, and on the project's 2-core machine two threads
kept 1.7 cores busy. On a 16-core GPU machine that Python would bound a threaded loader well
below what the cores can decode. :class:`ProcessWorkers` runs the batch-making half of
:class:`~vidconv.data.ClipLoader` in ``num_workers`` processes instead:

- Each worker receives a copy of the loader once, at start (its sources, probe results and
  sampling state; see ``ClipLoader.__getstate__``), and lives as long as the loader, so an
  epoch costs no process start.
- The loader hands batch ``i`` of an iteration to worker ``i % num_workers`` and yields the
  batches in order, so what comes out does not depend on which worker is faster: the same
  batches as with threads or none.
- Batches come back through shared memory the loader allocates once and reuses (a *slot*
  per batch in flight), never through a pipe. On the CPU a worker writes the finished model
  input; for a CUDA loader it writes the uint8 clips, and the loader moves and preprocesses
  them on the GPU (workers never touch CUDA). A slot is written again only when nothing the
  caller holds refers to it, tested like :class:`~vidconv.data.buffers.BufferPool`'s buffers;
  a caller that keeps every batch makes the loader allocate more slots, not overwrite them.
- A bad video found by a worker is reported by the loader as if found there (warning, report,
  ``strict``); an exception in a worker is raised by the loader; a worker that dies (killed,
  out of memory) makes the loader raise an error naming it instead of waiting for ever, and
  the next iteration starts new workers. Workers ignore Ctrl-C (the loader's process handles
  it) and exit when the loader is closed or garbage collected, or when its process dies.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401  (registers the reductions that share tensors)

from vidconv.data.buffers import storage_references

START_METHODS = ("forkserver", "spawn", "fork")
# How long the loader waits for a result before checking that its workers are alive, and a
# worker for a task before checking that the loader's process is.
_POLL_SECONDS = 0.5


class WorkerError(RuntimeError):
    """A worker process died, or raised something that could not be sent back as itself."""


@dataclass
class _Slot:
    """Shared memory for one batch in flight: the tensors a worker writes and their storages'
    reference counts when only this slot holds them."""

    key: tuple
    tensors: tuple[torch.Tensor, ...]
    idle: tuple[tuple[int, int] | None, ...]
    busy: bool = False

    def free(self) -> bool:
        return not self.busy and all(storage_references(t) == c
                                     for t, c in zip(self.tensors, self.idle, strict=True))


def _make_slot(key: tuple) -> _Slot:
    shapes, dtype = key
    with torch.inference_mode(False):
        tensors = tuple(torch.empty(s, dtype=dtype, device="cpu").share_memory_()
                        for s in shapes)
    return _Slot(key, tensors, tuple(storage_references(t) for t in tensors))


class ProcessWorkers:
    """``count`` processes running ``make(loader, items, out, bad)`` on copies of ``loader``.

    Args:
        loader: what every worker gets a copy of (pickled, except with ``fork``).
        count: worker processes.
        start_method: "forkserver" (default: safe in a process that has threads or CUDA, and
            the server imports torch once for all workers), "spawn" or "fork" (fastest start;
            unsafe once the process uses CUDA or holds locks in other threads).
        slot_key: (shapes, dtype) of the tensors of a batch's slot.
        make: runs in the worker: fills the slot tensors ``out`` for ``items`` and returns
            a picklable result; ``bad`` lists videos already known to be unusable.
        depth: batches in flight (default: two per worker).
    """

    def __init__(self, loader: Any, count: int, start_method: str,
                 slot_key: tuple, make: Callable[..., Any], depth: int | None = None) -> None:
        if start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS}, got "
                             f"{start_method!r}")
        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            ctx.set_forkserver_preload(["torch", "vidconv.data.loader"])
        self.count = count
        self.depth = 2 * count if depth is None else depth
        # Slots kept: those in flight, the batch the caller holds and the one it let go of.
        self._capacity = self.depth + 2
        self._slot_key = slot_key
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(count)]
        self._procs = [ctx.Process(target=_worker_main, name=f"vidconv-data-{i}", daemon=True,
                                   args=(i, loader, make, self._tasks[i], self._results))
                       for i in range(count)]
        for p in self._procs:
            p.start()
        self._slots: list[_Slot] = []
        self._known: list[set[int]] = [set() for _ in range(count)]  # slot ids each worker has
        self._generation = 0
        self.broken = False
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._tasks,
                                           self._results)

    def alive(self) -> bool:
        return not self.broken and all(p.is_alive() for p in self._procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.is_alive()]

    def close(self) -> None:
        """Stop the workers (waits up to a few seconds, then terminates them)."""
        self._finalizer()

    def _take_slot(self) -> tuple[int, _Slot]:
        """A free slot (its id), else a new one: kept while there is room (id >= 0), else a
        one-off (id -1) that no worker keeps, so its memory goes when the caller lets go."""
        for i, slot in enumerate(self._slots):
            if slot.key == self._slot_key and slot.free():
                slot.busy = True
                return i, slot
        slot = _make_slot(self._slot_key)
        slot.busy = True
        if len(self._slots) >= self._capacity:
            return -1, slot
        self._slots.append(slot)
        return len(self._slots) - 1, slot

    def run(self, chunks: Iterable[Sequence[Any]], bad: Callable[[], Sequence[int]]
            ) -> Iterator[tuple[Any, tuple[torch.Tensor, ...]]]:
        """(result, slot tensors) per chunk, in order, with up to ``depth`` chunks in flight;
        ``bad()`` is sent with each chunk. The tensors stay the caller's until nothing refers
        to them any more. An exception raised by ``make`` is raised here."""
        self._generation += 1
        generation = self._generation
        todo = enumerate(chunks)
        pending: dict[int, _Slot] = {}  # sequence number -> its slot, in flight
        done: dict[int, tuple] = {}     # results that came before their turn
        next_out = 0

        def submit() -> None:
            item = next(todo, None)
            if item is None:
                return
            seq, chunk = item
            worker = seq % self.count
            slot_id, slot = self._take_slot()
            tensors = None if slot_id in self._known[worker] else slot.tensors
            if slot_id >= 0:
                self._known[worker].add(slot_id)
            self._tasks[worker].put((generation, seq, list(chunk), tuple(bad()), slot_id,
                                     tensors))
            pending[seq] = slot

        try:
            for _ in range(self.depth):
                submit()
            while pending:
                while next_out not in done:
                    message = self._receive(next_out)
                    if message[1] != generation:
                        # Left over from an iteration abandoned half way: its slot is free.
                        if message[3] >= 0:
                            self._slots[message[3]].busy = False
                        continue
                    done[message[2]] = message
                kind, payload = done.pop(next_out)[0::4]
                slot = pending.pop(next_out)
                next_out += 1
                # Before the slot is free: the caller has no view of it yet.
                submit()
                slot.busy = False
                if kind == "error":
                    raise payload
                yield payload, slot.tensors
        finally:
            # Results already here free their slots now; those still in flight when they
            # arrive (their generation is stale by then).
            for seq in done:
                pending.pop(seq).busy = False

    def _receive(self, seq: int) -> tuple:
        while True:
            try:
                return self._results.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    self.broken = True
                    p = dead[0]
                    code = p.exitcode
                    how = (f"was killed by signal {-code}" if code is not None and code < 0
                           else f"exited with code {code}")
                    hint = " (out of memory?)" if code == -signal.SIGKILL else ""
                    self.close()
                    raise WorkerError(f"vidconv.data: loader worker process {p.name} (pid "
                                      f"{p.pid}) {how}{hint} while batch {seq} of this "
                                      "iteration was being made; the loader starts new "
                                      "workers on the next iteration") from None


def _shutdown(procs: list, tasks: list, results: Any) -> None:
    for q in tasks:
        try:
            q.put(None)
        except (OSError, ValueError):
            pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
    for q in [*tasks, results]:
        q.close()
        q.cancel_join_thread()


def _worker_main(worker: int, loader: Any, make: Callable[..., Any], tasks: Any,
                 results: Any) -> None:
    # Ctrl-C reaches the whole process group: the loader's process decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One core per worker: the worker count is the parallelism.
    torch.set_num_threads(1)
    parent = mp.parent_process()
    slots: dict[int, tuple[torch.Tensor, ...]] = {}
    while True:
        try:
            task = tasks.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return
            continue
        if task is None:
            return
        generation, seq, items, bad, slot_id, tensors = task
        if tensors is not None and slot_id >= 0:
            slots[slot_id] = tensors  # kept: later tasks name it by id only
        out = tensors if slot_id < 0 else slots[slot_id]
        try:
            result = ("ok", generation, seq, slot_id, make(loader, items, out, bad))
        except BaseException as exc:  # noqa: BLE001  (sent back and raised by the loader)
            result = ("error", generation, seq, slot_id, _sendable(exc, worker))
        # A one-off slot's memory must not stay mapped here once the loader has it back.
        del task, tensors, out
        results.put(result)
        del result


def _sendable(exc: BaseException, worker: int) -> BaseException:
    """``exc`` if it survives pickling, else a WorkerError carrying its traceback."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        text = "".join(traceback.format_exception(exc))
        return WorkerError(f"vidconv.data: loader worker process {worker} (pid {os.getpid()}) "
                           f"raised:\n{text}")
