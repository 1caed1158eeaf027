"""The run directory: one run at a time, never a finished run replaced by accident, and every
file written whole or not at all.

A run directory holds ``checkpoint.pt``, ``config.json``, ``metrics.csv``, ``summary.json``
(and ``tensorboard/`` when TensorBoard is installed). While a run uses it, the run holds an
exclusive ``fcntl`` lock on ``.lock`` (which names the holder's PID); the operating system
drops the lock when the process ends, however it ends, so a killed run never blocks the next.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import sys
from pathlib import Path

RUN_FILES = ("checkpoint.pt", "config.json", "metrics.csv", "summary.json")
LOCK_NAME = ".lock"
# what save_file names its temporary files: .<name>.tmp<pid>
TEMP_FILE = re.compile(r"^\..+\.tmp(\d+)$")

_CAUSES = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.EEXIST: "a file is in the way",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory",
}


class RunDirError(OSError):
    """A run directory that cannot be used or written; the message names the path and why."""


def os_error_message(exc: OSError, action: str, path: str | Path) -> str:
    """'cannot <action> <path>: <cause>' in words (disk full, permission denied, ...)."""
    cause = _CAUSES.get(exc.errno or -1) or exc.strerror or str(exc)
    where = exc.filename if exc.filename and str(exc.filename) != str(path) else None
    return f"cannot {action} {path}: {cause}" + (f" ({where})" if where else "")


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable (no-op where directories cannot be
    opened, e.g. on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_file(path: str | Path, write: object, *, what: str = "file") -> Path:
    """Write `path` atomically and durably: `write(f)` fills a temporary file beside it, which
    is fsynced and renamed over `path`, and the directory is fsynced. On any failure
    (including KeyboardInterrupt) the temporary file is removed and `path` is untouched; an
    OSError becomes a :class:`RunDirError` naming `path` and the cause."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)  # type: ignore[operator]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, RunDirError):
            kept = " (the previous one is intact)" if path.is_file() else ""
            raise RunDirError(os_error_message(exc, f"write {what}", path) + kept) from exc
        raise
    return path


def save_text(path: str | Path, text: str, *, what: str = "file") -> Path:
    return save_file(path, lambda f: f.write(text.encode()), what=what)


class RunDir:
    """A run directory and its lock. ``claim`` checks, creates and locks it; ``release``
    unlocks (also done by the OS when the process ends)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoint = self.path / "checkpoint.pt"
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------------ checks

    def holds_run(self) -> bool:
        """Whether a run has written here (a checkpoint or any of the run's logs)."""
        return any((self.path / name).exists() for name in RUN_FILES)

    def claim(self, *, resume: bool, overwrite: bool) -> list[str]:
        """Create and lock the directory for a run; returns notes for the user (temporary
        files of an interrupted save removed, an old run replaced).

        Raises:
            FileNotFoundError: `resume` and there is no checkpoint to resume.
            RunDirError: the path is a file, cannot be created or written, another run holds
                the lock, or it holds a run and neither `resume` nor `overwrite` is set.
        """
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the "
                             f"run in {self.path}, overwrite replaces it")
        if resume and not self.checkpoint.is_file():
            raise self.no_checkpoint_error()  # before creating anything: nothing to resume
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} is a file, not a directory; choose "
                              "another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(os_error_message(exc, "create the run directory", self.path)
                              ) from exc
        self._lock()
        try:
            notes = self._clean_temp_files()
            if self.holds_run() and not resume:
                if not overwrite:
                    raise RunDirError(
                        f"{self.path} already holds a run ({self._describe()}); pass --resume "
                        "to continue it, --overwrite to replace it, or choose another --out")
                notes.append(f"replacing the run in {self.path} ({self._describe()})")
                self._remove_run_files()
        except BaseException:
            self.release()
            raise
        return notes

    def no_checkpoint_error(self) -> FileNotFoundError:
        # a run that died before its first checkpoint still left its logs
        instead = ("pass --overwrite instead of --resume to start a new run there"
                   if self.holds_run() else "drop --resume to start a new run")
        return FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint} (run directory "
                                 f"{self.path}); {instead}")

    def _describe(self) -> str:
        found = [name for name in RUN_FILES if (self.path / name).exists()]
        return ", ".join(found)

    def _remove_run_files(self) -> None:
        try:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            shutil.rmtree(self.path / "tensorboard", ignore_errors=True)
        except OSError as exc:
            raise RunDirError(os_error_message(exc, "replace the run in", self.path)) from exc
        fsync_dir(self.path)

    def _clean_temp_files(self) -> list[str]:
        """Remove what an interrupted save left behind. Under the lock no other process writes
        here, so every temporary file belongs to a process that is gone: a killed save
        (SIGKILL, power loss) cannot remove its own, and on a full disk they keep it full."""
        removed = []
        for entry in self.path.iterdir():
            if TEMP_FILE.match(entry.name) and entry.is_file():
                try:
                    entry.unlink()
                except OSError as exc:
                    raise RunDirError(os_error_message(exc, "remove the partial file", entry)
                                      ) from exc
                removed.append(entry.name)
        if not removed:
            return []
        fsync_dir(self.path)
        return [f"removed {len(removed)} partial file(s) an interrupted save left in "
                f"{self.path}: {', '.join(sorted(removed))}"]

    # ------------------------------------------------------------------------------- lock

    def _lock(self) -> None:
        lock_path = self.path / LOCK_NAME
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(os_error_message(exc, "write to the run directory", self.path)
                              ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RunDirError(
                f"run directory {self.path} is in use by another vidconv run "
                f"({'PID ' + holder if holder else 'PID unknown'}); wait for it to finish or "
                "choose another --out") from None
        except OSError as exc:
            os.close(fd)
            raise RunDirError(os_error_message(exc, "lock the run directory", self.path)
                              ) from exc
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            os.close(fd)
            raise RunDirError(os_error_message(exc, "write to the run directory", self.path)
                              ) from exc
        self._lock_fd = fd

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def release(self) -> None:
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def note(message: str) -> None:
    """A one-line notice on stderr (rank 0 only calls it)."""
    print(f"vidconv: note: {message}", file=sys.stderr, flush=True)
