"""Batched DALI video decoding, and the child process that runs DALI's CPU decoder for
:class:`vidconv.data.dali.DaliDecoder`.

:class:`BatchRunner` decodes a list of encoded files with ``fn.decoders.video`` several files
per pipeline run, with the next runs queued ahead (DALI's pipelined executor), and hands every
file's frames, or the reason it failed, to a callback. The GPU ("mixed") decoder uses it in the
training process; the CPU decoder uses the very same code inside this module's worker process.

Run as a script (``python _dali_worker.py READ_FD WRITE_FD THREADS BATCH PREFETCH``), not as a
package module, so that the worker imports only NumPy and DALI: no torch, no vidconv, a
start-up of about a second. A request is a list of ``(path, indices or None)``; the worker
answers each file as its run finishes, in any order, with ``("frames", k, shape)`` followed by
the frames' raw uint8 bytes or with ``("error", k, message)`` (``k``: the file's place in the
request), then ``("done",)``. Once DALI has imported, before any request, it sends
``("ready",)``. The process ends when the parent closes its end of the pipe (or
dies).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

# What a file's decode hands back: (its place in the request, the DALI tensor of its frames,
# valid only during the call, or None, and the reason it failed or None).
Deliver = Callable[[int, Any, "str | None"], None]


class _DeliveryFailed(Exception):
    """The callback failed (the caller's error, not the file's): passed on as it is."""


def error_text(exc: BaseException) -> str:
    """A DALI exception as one line (DALI raises RuntimeError subclasses with C++ messages)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = " ".join(lines)[:300]
    return f"DALI could not decode it ({type(exc).__name__}: {detail})"


def read_encoded(path: str) -> tuple[Any, str | None]:
    """A file's bytes as a NumPy uint8 array, or None and why it cannot be read."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except OSError as exc:
        return None, f"cannot read ({exc})"
    if data.size == 0:
        return None, "is empty"
    return data, None


class BatchRunner:
    """DALI video pipelines of one device that decode several files per run.

    Args:
        device: "cpu" or "mixed" (NVDEC), DALI's names.
        device_id: the CUDA device for "mixed"; None on the CPU.
        threads: DALI CPU threads of each pipeline.
        batch_size: files per pipeline run (DALI's maximum batch size; a run may hold fewer)
            when frames are chosen; whole files go one per run.
        prefetch: runs queued ahead of the one being read (DALI's prefetch queue depth) when
            frames are chosen; 1 runs each batch synchronously.

    A run that fails fails as a whole (DALI names no sample) and leaves the pipeline unusable,
    so its files are decoded again one per run on a fresh pipeline: a bad file is reported
    alone and the others of its batch still decode. Runs after a failed one are decoded again
    as batches.
    """

    def __init__(self, device: str, device_id: int | None, threads: int, batch_size: int,
                 prefetch: int) -> None:
        self.device = device
        self.device_id = device_id
        self.threads = threads
        self.batch_size = batch_size
        self.prefetch = prefetch
        self._pipes: dict[tuple[bool, bool], Any] = {}

    def close(self) -> None:
        """Drop the pipelines (the next run builds fresh ones)."""
        self._pipes.clear()

    def _pipe(self, with_frames: bool, pipelined: bool):
        key = (with_frames, pipelined)
        pipe = self._pipes.get(key)
        if pipe is not None:
            return pipe
        from nvidia.dali import fn, pipeline_def, types

        depth = self.prefetch if pipelined else 1

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=self.device_id, exec_pipelined=pipelined, exec_async=pipelined,
                      prefetch_queue_depth=depth)
        def video_pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            kwargs: dict[str, Any] = {}
            if with_frames:
                kwargs["frames"] = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
                # Without it an index past the last decodable frame gives a black frame.
                kwargs["pad_mode"] = "none"
            return fn.decoders.video(encoded, device=self.device, **kwargs)

        pipe = video_pipe()
        pipe.build()
        self._pipes[key] = pipe
        return pipe

    def _feed(self, pipe, chunk: Sequence[tuple[int, Any, Any]], with_frames: bool) -> None:
        import numpy as np

        pipe.feed_input("encoded", [data for _, data, _ in chunk])
        if with_frames:
            pipe.feed_input("frames", [np.asarray(ix, dtype=np.int32) for _, _, ix in chunk])

    def run(self, items: Sequence[tuple[int, Any, Sequence[int] | None]],
            deliver: Deliver) -> None:
        """Decode ``(k, encoded bytes, indices or None)`` items; ``deliver`` gets each one's
        frames (``(F, H, W, 3)`` uint8, all frames when its indices are None) or its error."""
        for with_frames in (False, True):
            group = [it for it in items if (it[2] is not None) == with_frames]
            if group:
                self._run_group(group, with_frames, deliver)

    def _run_group(self, group, with_frames: bool, deliver: Deliver) -> None:
        # Whole files (a cache fill, once per video) go one per synchronous run: a long video's
        # frames at full resolution can take gigabytes, and a batch of them queued twice over
        # could exhaust the GPU's memory.
        size = self.batch_size if with_frames else 1
        chunks = [group[i:i + size] for i in range(0, len(group), size)]
        pipelined = with_frames and self.prefetch > 1 and len(chunks) >= self.prefetch
        done = 0
        try:
            pipe = self._pipe(with_frames, pipelined)
            if pipelined:
                # The first schedule_run starts `prefetch` runs, so that many batches go in
                # first; each batch read makes room for one more.
                for chunk in chunks[:self.prefetch]:
                    self._feed(pipe, chunk, with_frames)
                pipe.schedule_run()
                fed = self.prefetch
                for chunk in chunks:
                    (out,) = pipe.outputs()
                    _hand_out(chunk, out, deliver)
                    done += 1
                    if fed < len(chunks):
                        self._feed(pipe, chunks[fed], with_frames)
                        pipe.schedule_run()
                        fed += 1
            else:
                for chunk in chunks:
                    self._feed(pipe, chunk, with_frames)
                    (out,) = pipe.run()
                    _hand_out(chunk, out, deliver)
                    done += 1
        except _DeliveryFailed as exc:
            self.close()  # runs queued ahead would be read as the next request's
            raise exc.__cause__ from None
        except Exception as exc:
            self.close()  # a failed run leaves DALI's pipeline unusable
            failed = chunks[done]
            if len(failed) == 1 and not pipelined:
                deliver(failed[0][0], None, error_text(exc))
            else:
                for item in failed:
                    self._run_group([item], with_frames, deliver)
            rest = [it for chunk in chunks[done + 1:] for it in chunk]
            if rest:
                self._run_group(rest, with_frames, deliver)
        except BaseException:
            self.close()  # interrupted mid-run: queued runs must not outlive it
            raise


def _hand_out(chunk, out, deliver: Deliver) -> None:
    for j, (k, _, _) in enumerate(chunk):
        try:
            deliver(k, out[j], None)
        except BaseException as exc:
            raise _DeliveryFailed() from exc


def main(argv: list[str]) -> int:
    import numpy as np

    read_fd, write_fd, threads, batch_size, prefetch = (int(a) for a in argv)
    requests = Connection(read_fd, readable=True, writable=False)
    answers = Connection(write_fd, readable=False, writable=True)
    runner = BatchRunner("cpu", None, threads, batch_size, prefetch)
    import nvidia.dali.fn  # noqa: F401  (seconds on a busy machine: not counted to a file)

    answers.send(("ready",))

    def deliver(k: int, sample: Any, error: str | None) -> None:
        if error is not None:
            answers.send(("error", k, error))
            return
        frames = np.ascontiguousarray(np.asarray(sample))
        answers.send(("frames", k, frames.shape))
        answers.send_bytes(memoryview(frames).cast("B"))

    while True:
        try:
            request = requests.recv()
        except (EOFError, OSError):
            return 0
        items = []
        for k, (path, indices) in enumerate(request):
            data, error = read_encoded(path)
            if error is not None:
                answers.send(("error", k, error))
            else:
                items.append((k, data, indices))
        runner.run(items, deliver)
        answers.send(("done",))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
