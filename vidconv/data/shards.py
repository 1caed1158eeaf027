"""Prepared datasets: videos decoded once into WebDataset-format tar shards of JPEG frames.

``vidconv prepare`` (:mod:`vidconv.data.prepare`) writes a folder::

    OUT/index.json             written last: options, classes, shards, one entry per video
    OUT/shard-000000.tar       WebDataset samples, one per video: KEY.json + KEY.000000.jpg ...
    OUT/shard-000000.json      that shard's frame table (byte offset, size, CRC-32 per frame)
    OUT/skipped.jsonl          videos prepare could not use, one JSON line each
    OUT/report.json            what the run did (counts, sizes, throughput, skipped files)

A sample's frames are already upright, centre-cropped and resized to the index's
``frame_size`` exactly as :class:`vidconv.data.ClipLoader` does it for videos, in presentation
order. Any WebDataset reader sees sample ``KEY`` with fields ``json`` and ``000000.jpg`` ...;
:func:`iter_samples` is this package's sequential (streaming) reader.

:class:`PreparedSource` is the random-access reader behind :func:`vidconv.data.open_source`:
it presents the prepared videos like a video source (same order, same labels), so
:class:`~vidconv.data.ClipLoader` samples clips, views and shards by exactly the rules it uses
for video files and decodes only the JPEG frames a clip needs (one ``pread`` for a clip's
frames, at offsets from the frame table, decoded straight into the loader's batch). Shards
may be local files or, with ``shards=``, URLs (``http(s)://``, ``file://``) or
``pipe:COMMAND`` (the command writes the shard to stdout, as in WebDataset): a remote shard is
copied once, atomically, into a local cache the first time one of its frames is needed, so
each rank only fetches the shards holding the videos it reads; with ``per_node``
(``VIDCONV_SHARDS_PER_NODE=1``) each node of a multi-node run reads only its part of the shard
list, split among its ranks.

Damage: a shard shorter than its frame table says (a truncated copy) has every sample past the
cut reported as skipped, naming the shard, at construction; a frame whose bytes no longer match
their CRC-32 or no longer decode fails its video as a :class:`~vidconv.data.decode.DecodeError`
naming shard, sample and frame (the loader skips and reports it). A missing shard is a
:class:`FileNotFoundError` naming it.

JPEG decoding on the CPU uses simplejpeg when it is installed (libjpeg-turbo with little
per-call overhead: about 2x Pillow's frames/s for 200x200 frames here), else Pillow (also
libjpeg-turbo); ``VIDCONV_JPEG=pillow`` forces Pillow. Both are libjpeg-turbo with the same
default IDCT and upsampling, so they give the same pixels, and both release the GIL while
decoding, so the loader's worker threads decode in parallel. With DALI present, the loader can
decode on the GPU (``fn.decoders.image(device="mixed")``, nvJPEG) instead: see
:class:`DaliJpegDecoder`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vidconv.data.decode import DecodeError, VideoInfo
from vidconv.data.sources import VideoItem

FORMAT = "vidconv-prepared"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SKIPPED_NAME = "skipped.jsonl"
REPORT_NAME = "report.json"
# VideoInfo.codec of a prepared video: tells the loader to read JPEG frames, not a container.
PREPARED_CODEC = "jpeg-frames"
REMOTE_PREFIXES = ("http://", "https://", "file://", "pipe:")
# Frames of one video less than this many bytes apart are fetched with one read.
_READ_GAP = 64 << 10


def shard_name(number: int) -> str:
    """File name of shard ``number``."""
    return f"shard-{number:06d}.tar"


def table_name(number: int) -> str:
    """File name of shard ``number``'s frame table."""
    return f"shard-{number:06d}.json"


def sample_key(index: int) -> str:
    """WebDataset key of the video at ``index`` in the source (no dots: WebDataset splits the
    key from the field at the first dot)."""
    return f"{index:09d}"


# ------------------------------------------------------------------------------------ JPEG

def _simplejpeg():
    if os.environ.get("VIDCONV_JPEG", "").lower() == "pillow":
        return None
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def jpeg_library() -> str:
    """The CPU JPEG library in use: "simplejpeg" or "pillow"."""
    return "simplejpeg" if _simplejpeg() is not None else "pillow"


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """uint8 RGB ``(H, W, 3)`` as baseline JPEG with 4:2:0 chroma at ``quality`` (1-100)."""
    sj = _simplejpeg()
    rgb = np.ascontiguousarray(rgb)
    if sj is not None:
        return sj.encode_jpeg(rgb, quality=quality, colorspace="RGB", colorsubsampling="420")
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


def decode_jpeg(data: bytes | memoryview, out: np.ndarray | None = None) -> np.ndarray:
    """A JPEG as uint8 RGB ``(H, W, 3)``, decoded into ``out`` when given (a C-contiguous
    uint8 array of that shape: saves a copy per frame).

    Raises:
        ValueError: the bytes are not a decodable JPEG, or not of ``out``'s shape.
    """
    return _decode_jpeg(_simplejpeg(), data, out)


def _decode_jpeg(sj: Any, data: bytes | memoryview, out: np.ndarray | None) -> np.ndarray:
    """:func:`decode_jpeg` with the library already chosen (``sj``: simplejpeg or None for
    Pillow), so that a clip's frames look it up once."""
    try:
        if sj is not None:
            if out is None:
                return sj.decode_jpeg(data, colorspace="RGB")
            # simplejpeg fills the buffer's first H*W*3 bytes with whatever size the image
            # has (and refuses a buffer too small for it): the shape is checked after, which
            # spares parsing every header twice.
            rgb = sj.decode_jpeg(data, colorspace="RGB", buffer=out)
            if rgb.shape != out.shape:
                raise _WrongSize(rgb.shape, out.shape)
            return out
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except _WrongSize as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # both libraries raise several kinds for corrupt data
        if sj is not None and out is not None and "too small" in str(exc):
            h, w = sj.decode_jpeg_header(data)[:2]
            raise ValueError(str(_WrongSize((h, w, 3), out.shape))) from None
        raise ValueError(f"not a decodable JPEG ({type(exc).__name__}: {exc})") from exc
    if out is None:
        return rgb
    if rgb.shape != out.shape:
        raise ValueError(str(_WrongSize(rgb.shape, out.shape)))
    out[...] = rgb
    return out


class _WrongSize(Exception):
    def __init__(self, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
        super().__init__(f"not a decodable JPEG of {expected[0]}x{expected[1]} (image is "
                         f"{got[0]}x{got[1]})")


# ------------------------------------------------------------------------- shard locations

def is_remote(location: str) -> bool:
    """Whether a shard location is a URL or a ``pipe:`` command rather than a local path."""
    return str(location).startswith(REMOTE_PREFIXES)


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """A shard list: a sequence as it is, or a string with brace ranges expanded
    (``"s3/shard-{000000..000011}.tar"``, zero padding kept; several ranges multiply) and
    whitespace-separated locations split."""
    if not isinstance(spec, str):
        return [str(s) for s in spec]
    out: list[str] = []
    for part in spec.split():
        m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if m is None:
            out.append(part)
            continue
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"shard range {m.group(0)!r} in {part!r} is empty")
        width = len(lo) if lo.startswith("0") else 0
        for n in range(int(lo), int(hi) + 1):
            out += expand_shards(part[:m.start()] + str(n).zfill(width) + part[m.end():])
    return out


def split_shards(shards: Sequence[str], rank: int | None = None, world: int | None = None,
                 ) -> list[str]:
    """This process's part of a shard list for streaming: ``shards[part::parts]`` where the
    parts are ranks (torch.distributed's rank and world size, else ``RANK`` / ``WORLD_SIZE``,
    which torchrun sets per node and process) times the DataLoader workers of this process.

    Raises:
        ValueError: fewer shards than parts (some part would read nothing).
    """
    if rank is None or world is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    part, parts = rank, world
    try:
        from torch.utils.data import get_worker_info

        worker = get_worker_info()
    except ImportError:
        worker = None
    if worker is not None:
        part, parts = rank * worker.num_workers + worker.id, world * worker.num_workers
    if len(shards) < parts:
        raise ValueError(f"{len(shards)} shard(s) cannot be split over {parts} readers "
                         f"(ranks x workers); prepare with a smaller shard size")
    return list(shards[part::parts])


def node_layout() -> tuple[int, int, int, int]:
    """(node, nodes, local rank, ranks per node) of this process: torch.distributed's rank and
    world size (else ``RANK`` / ``WORLD_SIZE``), with torchrun's ``LOCAL_WORLD_SIZE``,
    ``LOCAL_RANK`` and ``GROUP_RANK`` (the node); one node holding every rank without them.

    Raises:
        ValueError: the world size is not a multiple of the ranks per node.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local_world < 1 or world % local_world:
        raise ValueError(f"WORLD_SIZE ({world}) must be a multiple of LOCAL_WORLD_SIZE "
                         f"({local_world})")
    local_rank = int(os.environ.get("LOCAL_RANK", rank % local_world))
    node = int(os.environ.get("GROUP_RANK", rank // local_world))
    return node, world // local_world, local_rank, local_world


@contextmanager
def open_stream(location: str | Path, timeout: float = 60.0) -> Iterator[BinaryIO]:
    """A shard (or index) as a readable binary stream: a local path, ``file://`` or
    ``http(s)://`` URL, or ``pipe:COMMAND`` (run by the shell; a non-zero exit is an error).

    Raises:
        FileNotFoundError: the file or URL does not exist, or the command failed.
    """
    loc = str(location)
    if loc.startswith("pipe:"):
        cmd = loc[5:]
        proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        failure: BaseException | None = None
        try:
            yield proc.stdout  # type: ignore[misc]
        except BaseException as exc:
            failure = exc
        proc.stdout.close()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        # A reader that stopped early closes the pipe under the command (SIGPIPE): not its
        # failure. A command that failed by itself explains the reader's error.
        if rc not in (0, -13) and not isinstance(failure, GeneratorExit):
            raise FileNotFoundError(f"shard command {cmd!r} exited with status {rc}"
                                    + (f": {err[:200]}" if err else "")) from failure
        if failure is not None:
            raise failure
        return
    if loc.startswith(("http://", "https://", "file://")):
        try:
            response = urllib.request.urlopen(loc, timeout=timeout)  # noqa: S310
        except urllib.error.HTTPError as exc:
            raise FileNotFoundError(f"shard {loc!r}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FileNotFoundError(f"shard {loc!r} cannot be read: {reason}") from exc
        with response:
            yield response
        return
    path = Path(loc)
    if not path.is_file():
        raise FileNotFoundError(f"shard {loc!r} does not exist")
    with open(path, "rb") as f:
        yield f


def fetch(location: str, cache_dir: str | Path) -> Path:
    """A remote shard copied into ``cache_dir`` (once: an existing copy is reused), written
    under a temporary name and renamed when complete, so a killed copy is never taken as
    whole."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(location.encode()).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", location.rstrip("/").rsplit("/", 1)[-1])[-60:]
    dest = cache / f"{digest}-{tail}"
    if dest.is_file():
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open_stream(location) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


# ------------------------------------------------------------------------------- writing

def write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """One tar shard being written: under ``.NAME.tmp`` until :meth:`close` fsyncs and renames
    it, so a reader or a resumed prepare never takes a half shard for a whole one.

    Members are plain ustar files (mode 0444, mtime 0) so that a shard's bytes depend only on
    its samples.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples: list[dict[str, Any]] = []

    @property
    def bytes(self) -> int:
        """Bytes written so far."""
        return self._tar.offset

    def _add(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        before = self._tar.offset
        header = len(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
        self._tar.addfile(info, io.BytesIO(data))
        assert self._tar.offset - before >= header + len(data)
        return before + header

    def add(self, key: str, frames: Sequence[bytes], meta: dict[str, Any]) -> dict[str, Any]:
        """Append a sample (``meta`` as ``KEY.json``, then ``KEY.NNNNNN.jpg`` per frame);
        returns its entry for the frame table."""
        start = self._tar.offset
        self._add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        table = []
        for i, data in enumerate(frames):
            table.append([self._add(f"{key}.{i:06d}.jpg", data), len(data), zlib.crc32(data)])
        entry = dict(meta, key=key, start=start, end=self._tar.offset, frames=table)
        self.samples.append(entry)
        return entry

    def close(self) -> int:
        """Finish the tar (end blocks), fsync and rename it to its final name; returns its
        size in bytes."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size

    def abandon(self) -> None:
        """Drop the unfinished shard."""
        try:
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- reading

@dataclass
class DamagedShard:
    """A shard a sequential read could not finish: its location, why, and the last sample key
    read whole before the damage (None when none was)."""

    location: str
    reason: str
    last_key: str | None


def iter_samples(shards: Sequence[str], damaged: list[DamagedShard] | None = None,
                 ) -> Iterator[dict[str, Any]]:
    """Samples of WebDataset tar shards read sequentially (local paths, URLs or ``pipe:``),
    each a dict ``{"__key__": KEY, "__shard__": location, FIELD: bytes, ...}``.

    A shard that is damaged or truncated ends at the damage: the samples read whole before it
    are yielded, the one it cuts and those after it are skipped, and the shard goes into
    ``damaged`` (with a warning naming it when no list is given) instead of raising. A missing
    shard raises :class:`FileNotFoundError`.
    """
    import warnings

    for location in shards:
        sample: dict[str, Any] | None = None
        last: str | None = None
        try:
            with open_stream(location) as stream:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        base = member.name.rsplit("/", 1)[-1]
                        key, _, field = base.partition(".")
                        f = tar.extractfile(member)
                        data = f.read() if f is not None else b""
                        if len(data) != member.size:
                            raise tarfile.ReadError(f"member {member.name} cut short")
                        if sample is not None and sample["__key__"] != key:
                            last = sample["__key__"]
                            yield sample
                            sample = None
                        if sample is None:
                            sample = {"__key__": key, "__shard__": str(location)}
                        sample[field] = data
            if sample is not None:
                yield sample
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            record = DamagedShard(str(location), f"{type(exc).__name__}: {exc}", last)
            if damaged is not None:
                damaged.append(record)
            else:
                warnings.warn(f"vidconv.data: shard {location} is damaged ({record.reason}); "
                              f"samples after {last or 'its start'} skipped", stacklevel=2)


def read_index(location: str | Path) -> tuple[dict[str, Any], str]:
    """The index of a prepared dataset (a folder, its ``index.json``, or a URL / ``pipe:``
    to one) and the location shard names are relative to.

    Raises:
        FileNotFoundError: no index there; ValueError: not a prepared dataset's index, or the
            folder holds an unfinished prepare (shards but no index).
    """
    loc = str(location)
    if not is_remote(loc) and Path(loc).is_dir():
        folder = Path(loc)
        if not (folder / INDEX_NAME).is_file():
            if any(folder.glob("shard-*.tar")) or any(folder.glob(".shard-*.tar.tmp")):
                raise ValueError(f"{loc!r} is an unfinished vidconv prepare output (shards but "
                                 f"no {INDEX_NAME}); run vidconv prepare again to finish it")
            raise FileNotFoundError(f"{loc!r} holds no {INDEX_NAME}")
        loc = str(folder / INDEX_NAME)
    with open_stream(loc) as f:
        raw = f.read()
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{loc!r} is not valid JSON ({exc})") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{loc!r} is not a vidconv prepared-data index (expected "
                         f"format {FORMAT!r})")
    if index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{loc!r} has format version {index.get('version')!r}; this vidconv "
                         f"reads version {FORMAT_VERSION}")
    base = loc.rsplit("/", 1)[0] if "/" in loc else "."
    return index, base


class PreparedSource:
    """A prepared dataset presented as a video source (see the module docstring).

    Args:
        location: the ``vidconv prepare`` output folder, its index.json, or a URL /
            ``pipe:`` command giving the index.
        shards: where the shards are, in index order (a list or a brace pattern, see
            :func:`expand_shards`); default: beside the index, under their own names.
        cache_dir: where remote shards are copied (default ``VIDCONV_SHARD_CACHE`` or
            ``~/.cache/vidconv/shards``).
        per_node: split the shards across nodes (default: ``VIDCONV_SHARDS_PER_NODE=1`` in the
            environment): node ``n`` of ``N`` (see :func:`node_layout`) keeps only the videos
            of shards ``n::N``, so it fetches and caches only those, and
            :class:`~vidconv.data.ClipLoader` splits them among the node's ranks
            (:attr:`rank_split`) instead of among all ranks. Every video is still visited once
            per epoch by exactly one rank; clip parameters are drawn over the node's videos.

    Attributes:
        videos, classes: as for video sources, in the source's order (skipped videos left out).
        frame_size, fps, quality: the options the data was prepared with.
        skipped_at_prepare: the videos prepare could not use.
        damaged: per video index, why its bytes cannot be read (a truncated shard).
        rank_split: with ``per_node``, ``(local rank, ranks on this node)``, else None.

    Raises:
        FileNotFoundError: no index, or a local shard missing; ValueError: a bad index, or a
            shard list whose length differs from the index's.
    """

    def __init__(self, location: str | Path, shards: str | Sequence[str] | None = None,
                 cache_dir: str | Path | None = None, per_node: bool | None = None) -> None:
        self.index, base = read_index(location)
        self.location = Path(str(location)) if not is_remote(str(location)) else location
        self.frame_size = int(self.index["frame_size"])
        self.fps = self.index.get("fps")
        self.quality = self.index.get("quality")
        self.classes = list(self.index["classes"])
        self.skipped_at_prepare = list(self.index.get("skipped", []))
        names = [s["name"] for s in self.index["shards"]]
        if shards is None:
            join = (lambda n: f"{base}/{n}") if is_remote(base) else (
                lambda n: str(Path(base) / n))
            self._shards = [join(n) for n in names]
            self._tables = [join(s["table"]) for s in self.index["shards"]]
        else:
            self._shards = expand_shards(shards)
            if len(self._shards) != len(names):
                raise ValueError(f"shards lists {len(self._shards)} location(s), the index "
                                 f"{len(names)} shard(s)")
            # A frame table sits beside its shard, named after it.
            self._tables = [re.sub(r"\.tar$", ".json", s) if s.endswith(".tar") else s + ".json"
                            for s in self._shards]
        self.cache_dir = Path(cache_dir or os.environ.get("VIDCONV_SHARD_CACHE")
                              or Path.home() / ".cache" / "vidconv" / "shards")
        if per_node is None:
            per_node = os.environ.get("VIDCONV_SHARDS_PER_NODE", "0") not in ("", "0")
        mine = range(len(names))
        self.rank_split: tuple[int, int] | None = None
        if per_node:
            node, nodes, local_rank, local_world = node_layout()
            if len(names) < nodes:
                raise ValueError(f"{len(names)} shard(s) cannot be split over {nodes} nodes; "
                                 "prepare with a smaller shard size or unset "
                                 "VIDCONV_SHARDS_PER_NODE")
            mine = range(node, len(names), nodes)
            self.rank_split = (local_rank, local_world)
        for k in mine:
            loc = self._shards[k]
            if not is_remote(loc) and not Path(loc).is_file():
                raise FileNotFoundError(f"shard {loc!r} of prepared dataset {str(location)!r} "
                                        "does not exist")
        keep = set(mine)
        self._samples = [s for s in self.index["samples"] if s["shard"] in keep]
        self.videos = [VideoItem(Path(self._shard_label(s["shard"])) / s["key"], int(s["label"]))
                       for s in self._samples]
        self.damaged: dict[int, str] = {}
        sizes = {}
        for i, s in enumerate(self._samples):
            loc = self._shards[s["shard"]]
            if is_remote(loc):
                continue
            size = sizes.setdefault(s["shard"], Path(loc).stat().st_size)
            if s["end"] > size:
                self.damaged[i] = (f"shard {loc} is truncated ({size} bytes, index says "
                                   f"{self.index['shards'][s['shard']]['bytes']}): sample "
                                   f"{s['key']} ({s['source']}) lies past the cut")
        self._lock = threading.Lock()
        self._local: dict[int, Path] = {}
        self._frame_tables: dict[int, dict[str, list[list[int]]]] = {}
        self._dali: dict[str, DaliJpegDecoder] = {}

    def __getstate__(self) -> dict[str, Any]:
        # A loader's worker process gets a copy: no lock or DALI decoders of this process.
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_dali"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _shard_label(self, number: int) -> str:
        return str(self._shards[number])

    def __len__(self) -> int:
        return len(self.videos)

    def __repr__(self) -> str:
        return (f"PreparedSource({self.location!s}: {len(self.videos)} videos, "
                f"{len(self.classes)} classes, {len(self._shards)} shards, "
                f"{self.frame_size}px)")

    def videos_per_class(self) -> dict[str, int]:
        """Number of videos of every class, in class order."""
        counts: dict[int, int] = {}
        for v in self.videos:
            counts[v.label] = counts.get(v.label, 0) + 1
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    # ------------------------------------------------------------------- the loader's hooks

    def probe_video(self, index: int) -> VideoInfo | DecodeError:
        """What the loader's probe would say of the video: its frame count and size, or the
        damage that makes it unreadable (nothing is read from the shard)."""
        if index in self.damaged:
            return DecodeError(self.videos[index].path, self.damaged[index])
        s = self._samples[index]
        return VideoInfo(int(s["num_frames"]), self.frame_size, self.frame_size,
                         PREPARED_CODEC, 0, None)

    def _local_shard(self, number: int) -> Path:
        with self._lock:
            path = self._local.get(number)
        if path is None:
            loc = self._shards[number]
            path = fetch(loc, self.cache_dir) if is_remote(loc) else Path(loc)
            expected = self.index["shards"][number]["bytes"]
            if is_remote(loc) and path.stat().st_size != expected:
                # A transfer cut short must not become a permanently damaged cached copy:
                # drop it, so that a later read fetches the shard again.
                size = path.stat().st_size
                path.unlink(missing_ok=True)
                raise DecodeError(loc, f"shard arrived with {size} bytes, the index says "
                                  f"{expected}; the copy was discarded")
            with self._lock:
                self._local[number] = path
        return path

    def _table(self, number: int) -> dict[str, list[list[int]]]:
        with self._lock:
            table = self._frame_tables.get(number)
        if table is None:
            loc = self._tables[number]
            with open_stream(loc) as f:
                raw = f.read()
            try:
                table = {s["key"]: s["frames"] for s in json.loads(raw)["samples"]}
            except (ValueError, KeyError, TypeError) as exc:
                raise DecodeError(loc, f"frame table is damaged ({type(exc).__name__}: "
                                  f"{exc})") from exc
            with self._lock:
                self._frame_tables[number] = table
        return table

    def read_frames(self, index: int, frames: Sequence[int] | None = None) -> list[bytes]:
        """The JPEG bytes of frames ``frames`` (all when None) of video ``index``, each checked
        against its CRC-32.

        Raises:
            DecodeError: the shard is cut short or the bytes changed (naming shard, sample and
                frame); FileNotFoundError: the shard is missing.
        """
        return [bytes(v) for v in self._frame_data(index, frames)]

    def _frame_data(self, index: int, frames: Sequence[int] | None) -> list[memoryview]:
        """:meth:`read_frames` as views into as few reads as the frames' layout allows: the
        frames of a clip lie one after another in the shard (tar headers between), so a clip
        costs one ``pread`` instead of one per frame."""
        s = self._samples[index]
        try:
            table = self._table(s["shard"])[s["key"]]
        except DecodeError as exc:
            raise DecodeError(self.videos[index].path, exc.reason + f" ({exc.path})") from exc
        except KeyError as exc:
            raise DecodeError(self.videos[index].path, f"sample {s['key']} is missing from the "
                              f"frame table {self._tables[s['shard']]}") from exc
        path = self._local_shard(s["shard"])
        count = len(table)
        wanted = range(count) if frames is None else list(frames)
        entries = []
        for i in wanted:
            if not 0 <= i < count:
                raise DecodeError(self.videos[index].path, f"has no frame {i} ({count} frames)")
            entries.append(table[i])
        # Runs of frames close together in the file, each read at once: a gap up to
        # _READ_GAP bytes is read through rather than paid for with another system call.
        order = sorted(range(len(entries)), key=lambda k: entries[k][0])
        runs: list[list[int]] = []
        run_end = 0
        for k in order:
            offset, size, _ = entries[k]
            if runs and offset - run_end <= _READ_GAP:
                runs[-1].append(k)
                run_end = max(run_end, offset + size)
            else:
                runs.append([k])
                run_end = offset + size
        out: list[memoryview] = [memoryview(b"")] * len(entries)
        fd = os.open(path, os.O_RDONLY)
        try:
            for run in runs:
                lo = entries[run[0]][0]
                hi = max(entries[k][0] + entries[k][1] for k in run)
                data = memoryview(os.pread(fd, hi - lo, lo))
                for k in run:
                    offset, size, _ = entries[k]
                    out[k] = data[offset - lo:offset - lo + size]
        finally:
            os.close(fd)
        for k, i in enumerate(wanted):
            size, crc = entries[k][1], entries[k][2]
            if len(out[k]) != size or zlib.crc32(out[k]) != crc:
                what = "is cut short" if len(out[k]) != size else "does not match its CRC-32"
                raise DecodeError(self.videos[index].path,
                                  f"frame {i} of sample {s['key']} ({s['source']}) in shard "
                                  f"{self._shards[s['shard']]} {what}: the shard is damaged")
        return out

    def decode_video(self, index: int, frames: Sequence[int] | None = None,
                     device: Any = None, out: np.ndarray | None = None) -> Any:
        """Frames of video ``index`` as uint8 ``(K, S, S, 3)``: a NumPy array decoded on the
        CPU (``device`` None), or a torch tensor decoded by DALI on ``device``.

        Args:
            out: for CPU decoding, a C-contiguous uint8 ``(K, S, S, 3)`` array to decode into
                (returned): the loader passes its batch's slot, which saves a copy per clip.

        Raises:
            DecodeError: damaged bytes or an undecodable frame (named).
            ValueError: ``out`` of the wrong shape, dtype or layout.
        """
        blobs = self._frame_data(index, frames)
        if device is not None:
            key = str(device)
            with self._lock:
                dec = self._dali.get(key)
                if dec is None:
                    dec = self._dali[key] = DaliJpegDecoder(device)
            return dec.decode(blobs, name=str(self.videos[index].path))
        shape = (len(blobs), self.frame_size, self.frame_size, 3)
        if out is None:
            out = np.empty(shape, dtype=np.uint8)
        elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous uint8 array of shape {shape}, got "
                             f"{out.dtype} {out.shape}"
                             + ("" if out.flags.c_contiguous else " (not contiguous)"))
        sj = _simplejpeg()
        numbers = range(len(blobs)) if frames is None else list(frames)
        for k, data in enumerate(blobs):
            try:
                _decode_jpeg(sj, data, out[k])
            except ValueError as exc:
                number = numbers[k]
                raise DecodeError(self.videos[index].path, f"frame {number}: {exc}") from exc
        return out


class DaliJpegDecoder:
    """JPEG frames decoded by DALI: nvJPEG (and the GPU's hardware JPEG decoder where it has
    one) with ``device="cuda"`` (``fn.decoders.image(device="mixed")``), DALI's CPU decoder
    with ``device="cpu"``. One pipeline per decoder, batches of up to ``max_batch`` frames.

    DALI's ``fn.readers.webdataset`` reads whole samples with a fixed set of fields; a clip
    needs 10 of a video's hundreds of frames, picked per epoch by the loader's sampling
    rules, so the frames' bytes come from :meth:`PreparedSource.read_frames` through
    ``fn.external_source`` instead, and the GPU does the decoding.
    """

    def __init__(self, device: Any = "cuda", max_batch: int = 64, threads: int = 2) -> None:
        import torch

        from vidconv.data.dali import dali_available

        if not dali_available():
            raise ImportError("GPU JPEG decoding needs NVIDIA DALI: pip install "
                              "nvidia-dali-cuda130 (the wheel for torch's CUDA)")
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.threads = threads
        self._pipe = None
        self._lock = threading.Lock()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"

        @pipeline_def(batch_size=self.max_batch, num_threads=self.threads,
                      device_id=(self.device.index or 0) if gpu else None,
                      exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
        def jpeg_pipe():
            encoded = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                     output_type=types.RGB)

        pipe = jpeg_pipe()
        pipe.build()
        return pipe

    def decode(self, blobs: Sequence[bytes], name: str = "frames") -> Any:
        """uint8 ``(K, H, W, 3)`` torch tensor on this decoder's device.

        Raises:
            DecodeError: DALI cannot decode a frame (named by ``name``).
        """
        import torch

        parts = []
        with self._lock:
            for lo in range(0, len(blobs), self.max_batch):
                chunk = [np.frombuffer(b, dtype=np.uint8) for b in blobs[lo:lo + self.max_batch]]
                try:
                    if self._pipe is None:
                        self._pipe = self._build()
                    self._pipe.feed_input("jpegs", chunk)
                    (out,) = self._pipe.run()
                    parts.append(self._to_torch(out))
                except Exception as exc:  # DALI raises RuntimeError subclasses
                    self._pipe = None
                    detail = " ".join(str(exc).split())[:300]
                    raise DecodeError(name, f"DALI could not decode a JPEG frame "
                                      f"({type(exc).__name__}: {detail})") from exc
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _to_torch(self, out) -> Any:
        import torch

        tensor = out.as_tensor()
        if self.device.type != "cuda":
            return torch.from_numpy(np.array(tensor))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        result = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=self.device)
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(self.device))
        return result
