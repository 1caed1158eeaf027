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
  them on the GPU (workers never touch CUDA). A slot is written again only when nothing in
  this process refers to it, tested like :class:`~vidconv.data.buffers.BufferPool`'s
  buffers. A caller that keeps more batches than there are slots gets the extra ones copied
  into ordinary memory, so that no shared segment (and file descriptor) stays open per kept
  batch. Another process cannot be seen holding a slot: clone a batch before sending it on.
- A bad video found by a worker is reported by the loader as if found there (warning, report,
  ``strict``), also when its batch is never yielded; an exception in a worker is raised by
  the loader, chained to the worker's traceback; a worker that dies (killed, out of memory)
  makes the loader raise an error naming it instead of waiting for ever, and the next
  iteration starts new workers. Tasks of an abandoned iteration are skipped, not decoded.
- Workers ignore Ctrl-C and SIGTERM (sent to the whole process group; the loader's process
  decides, e.g. a trainer checkpoints first) and exit when the loader is closed or garbage
  collected, or when its process dies.
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
    reference counts when only this slot holds them (None where torch does not expose them:
    such a slot is never reused)."""

    tensors: tuple[torch.Tensor, ...]
    idle: tuple[tuple[int, int] | None, ...]
    busy: bool = False

    def reusable(self) -> bool:
        return all(c is not None for c in self.idle)

    def free(self) -> bool:
        return not self.busy and self.reusable() and all(
            storage_references(t) == c for t, c in zip(self.tensors, self.idle, strict=True))


def _make_slot(shapes: Sequence[Sequence[int]], dtype: torch.dtype) -> _Slot:
    with torch.inference_mode(False):
        tensors = tuple(torch.empty(s, dtype=dtype, device="cpu").share_memory_()
                        for s in shapes)
    return _Slot(tensors, tuple(storage_references(t) for t in tensors))


class ProcessWorkers:
    """``count`` processes running ``make(loader, items, out, bad)`` on copies of ``loader``.

    Args:
        loader: what every worker gets a copy of (pickled, except with ``fork``).
        count: worker processes.
        start_method: "forkserver" (default: safe in a process that has threads or CUDA; the
            server imports torch once for all workers), "spawn" or "fork" (fastest start;
            unsafe once the process uses CUDA or holds locks in other threads).
        slot_key: (shapes, dtype) of the tensors of a batch's slot.
        make: runs in the worker: fills the slot tensors ``out`` for ``items`` and returns
            a picklable result; ``bad`` lists videos already known to be unusable.
        depth: batches in flight (default: two per worker).
        reuse: keep slots and write them again once free (False: every batch gets fresh
            shared memory, handed to the caller as ordinary memory).

    One iteration (:meth:`run`) at a time: starting another supersedes the one in progress,
    which raises if resumed.
    """

    def __init__(self, loader: Any, count: int, start_method: str, slot_key: tuple,
                 make: Callable[..., Any], depth: int | None = None, reuse: bool = True) -> None:
        if start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS}, got "
                             f"{start_method!r}")
        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # The default list ("__main__") plus what every worker imports anyway, once.
            ctx.set_forkserver_preload(["__main__", "torch", "vidconv.data.loader"])
        self.count = count
        self.depth = 2 * count if depth is None else depth
        # Slots kept: those in flight, the batch the caller holds and the one it let go of.
        self._capacity = self.depth + 2 if reuse else 0
        self._slot_key = slot_key
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(count)]
        # The iteration being served: workers skip tasks of earlier ones (abandoned half way).
        self._current = ctx.Value("q", 0, lock=False)
        self._procs = [ctx.Process(target=_worker_main, name=f"vidconv-data-{i}", daemon=True,
                                   args=(i, loader, make, self._tasks[i], self._results,
                                         self._current))
                       for i in range(count)]
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._tasks,
                                           self._results)
        try:
            for p in self._procs:
                p.start()
        except BaseException:
            self.close()
            raise
        self._slots: list[_Slot] = []
        self._known: list[set[int]] = [set() for _ in range(count)]  # slot ids each worker has
        self._generation = 0
        self.broken = False

    def alive(self) -> bool:
        return not self.broken and all(p.is_alive() for p in self._procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.is_alive()]

    def close(self) -> None:
        """Stop the workers (waits up to a few seconds, then kills them)."""
        self._finalizer()

    def _take_slot(self) -> tuple[int, _Slot]:
        """A free slot (its id), else a new one: kept while there is room (id >= 0), else a
        one-off (id -1) that no worker keeps and the caller gets a copy of."""
        for i, slot in enumerate(self._slots):
            if slot.free():
                slot.busy = True
                return i, slot
        slot = _make_slot(*self._slot_key)
        slot.busy = True
        if len(self._slots) >= self._capacity or not slot.reusable():
            return -1, slot
        self._slots.append(slot)
        return len(self._slots) - 1, slot

    def _free(self, slot_id: int) -> None:
        if slot_id >= 0:
            self._slots[slot_id].busy = False

    def run(self, chunks: Iterable[Sequence[Any]], bad: Callable[[], Sequence[int]],
            unseen: Callable[[Any], None]) -> Iterator[tuple[Any, tuple[torch.Tensor, ...]]]:
        """(result, slot tensors) per chunk, in order, with up to ``depth`` chunks in flight;
        ``bad()`` is sent with each chunk. The tensors stay the caller's until nothing refers
        to them any more. A result that is never yielded (an iteration abandoned, superseded
        or ended by an error) goes to ``unseen``. An exception raised by ``make`` is raised
        here, chained to the worker's traceback."""
        self._generation += 1
        generation = self._generation
        self._current.value = generation
        todo = enumerate(chunks)
        pending: dict[int, tuple[int, _Slot]] = {}  # sequence number -> its slot, in flight
        done: dict[int, tuple] = {}                 # results that came before their turn
        next_out = 0

        def submit() -> None:
            item = next(todo, None)
            if item is None:
                return
            seq, chunk = item
            worker = seq % self.count
            slot_id, slot = self._take_slot()
            tensors = None if slot_id in self._known[worker] else slot.tensors
            try:
                self._tasks[worker].put((generation, seq, list(chunk), tuple(bad()), slot_id,
                                         tensors))
            except BaseException:
                slot.busy = False
                raise
            if slot_id >= 0:
                self._known[worker].add(slot_id)
            pending[seq] = slot_id, slot

        try:
            for _ in range(self.depth):
                submit()
            while pending:
                self._check_current(generation)
                while next_out not in done:
                    message = self._receive(next_out, generation)
                    if message[1] != generation:
                        # Left over from an earlier iteration: its slot is free again, and a
                        # bad video it found is still news.
                        self._free(message[3])
                        if message[0] == "ok":
                            unseen(message[4])
                        continue
                    done[message[2]] = message
                kind, payload = done.pop(next_out)[0::4]
                slot_id, slot = pending.pop(next_out)
                next_out += 1
                try:
                    submit()  # before the slot is free: the caller has no view of it yet
                finally:
                    slot.busy = False
                if kind == "error":
                    exc, text = payload
                    raise exc from WorkerError(f"in the loader's worker process:\n{text}")
                if slot_id < 0:
                    # A one-off slot: the caller gets ordinary memory, the shared segment
                    # (and its file descriptor) goes now.
                    yield payload, tuple(t.clone() for t in slot.tensors)
                else:
                    yield payload, slot.tensors
        finally:
            if self._generation == generation:
                # Ended early (abandoned, or an error): workers skip what is still queued.
                self._generation += 1
                self._current.value = self._generation
            for seq, message in done.items():
                self._free(pending.pop(seq)[0])
                if message[0] == "ok":
                    unseen(message[4])
            # Results still in flight free their slots when they arrive (stale by then).

    def _check_current(self, generation: int) -> None:
        if self._generation != generation:
            raise RuntimeError("vidconv.data: a newer iteration over this loader started "
                               "while this one was paused; with worker processes a loader "
                               "serves one iteration at a time (finish or drop the first, "
                               "or use a second loader)")

    def _receive(self, seq: int, generation: int) -> tuple:
        while True:
            self._check_current(generation)
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
        if p.pid is None:
            continue  # never started
        p.join(timeout=5)
        if p.is_alive():
            p.kill()  # workers ignore SIGINT and SIGTERM
            p.join(timeout=5)
    for q in [*tasks, results]:
        q.close()
        q.cancel_join_thread()


def _worker_main(worker: int, loader: Any, make: Callable[..., Any], tasks: Any,
                 results: Any, current: Any) -> None:
    # Ctrl-C and a job scheduler's SIGTERM reach the whole process group: the loader's process
    # decides what happens (a trainer checkpoints first), and closes the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
        if generation < current.value:
            # Its iteration was abandoned: answer at once, so that the slot comes back.
            result: tuple = ("skipped", generation, seq, slot_id, None)
        else:
            try:
                result = ("ok", generation, seq, slot_id, make(loader, items, out, bad))
            except BaseException as exc:  # noqa: BLE001  (sent back and raised by the loader)
                result = ("error", generation, seq, slot_id, _sendable(exc, worker))
        # A one-off slot's memory must not stay mapped here once the loader has it back.
        del task, tensors, out
        results.put(result)
        del result


def _sendable(exc: BaseException, worker: int) -> tuple[BaseException, str]:
    """``exc`` (or, if it does not survive pickling, a WorkerError naming it) and the worker's
    traceback text."""
    import pickle

    text = "".join(traceback.format_exception(exc))
    try:
        pickle.loads(pickle.dumps(exc))
        return exc, text
    except Exception:  # noqa: BLE001
        return WorkerError(f"vidconv.data: loader worker process {worker} (pid {os.getpid()}) "
                           f"raised {type(exc).__name__}: {exc}"), text
