"""The child process that runs DALI's CPU video decoder for :class:`vidconv.data.dali.DaliDecoder`.

Run as a script (``python _dali_worker.py READ_FD WRITE_FD THREADS``), not as a package module,
so that it imports only NumPy and DALI: no torch, no vidconv, a start-up of about a second.
Requests come as ``(path, indices or None)`` on READ_FD; each answer on WRITE_FD is either
``("frames", shape)`` followed by the frames' raw uint8 bytes, or ``("error", message)``. The
process ends when the parent closes its end of the pipe (or dies).
"""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection


def _pipe(threads: int, with_frames: bool):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=threads, device_id=None, exec_pipelined=False,
                  exec_async=False, prefetch_queue_depth=1)
    def video_pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        kwargs = {}
        if with_frames:
            kwargs["frames"] = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, device="cpu", **kwargs)

    pipe = video_pipe()
    pipe.build()
    return pipe


def _decode(pipes: dict, threads: int, path: str, indices):
    import numpy as np

    try:
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except OSError as exc:
        return None, f"cannot read ({exc})"
    if data.size == 0:
        return None, "is empty"
    with_frames = indices is not None
    try:
        pipe = pipes.get(with_frames)
        if pipe is None:
            pipe = pipes[with_frames] = _pipe(threads, with_frames)
        pipe.feed_input("encoded", [data])
        if with_frames:
            pipe.feed_input("frames", [np.asarray(indices, dtype=np.int32)])
        (out,) = pipe.run()
        return np.ascontiguousarray(np.asarray(out.as_tensor())[0]), None
    except Exception as exc:  # DALI raises RuntimeError subclasses with C++ messages
        # A failed run leaves the pipeline unusable; build a fresh one next time.
        pipes.clear()
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = " ".join(lines)[:300]
        return None, f"DALI could not decode it ({type(exc).__name__}: {detail})"


def main(argv: list[str]) -> int:
    read_fd, write_fd, threads = (int(a) for a in argv)
    requests = Connection(read_fd, readable=True, writable=False)
    answers = Connection(write_fd, readable=False, writable=True)
    pipes: dict = {}
    while True:
        try:
            path, indices = requests.recv()
        except (EOFError, OSError):
            return 0
        frames, error = _decode(pipes, threads, path, indices)
        if error is not None:
            answers.send(("error", error))
        else:
            answers.send(("frames", frames.shape))
            answers.send_bytes(memoryview(frames).cast("B"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
