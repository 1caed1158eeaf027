"""Where the videos of a dataset are and which class each belongs to.

Two layouts: a folder per class (``root/<class>/<video>``, :class:`VideoFolder`) and a list file
in the UCF-101 split format (``relative/path.avi [label]`` lines plus a ``classInd.txt``,
:class:`VideoList`). Both give ``.videos`` (a list of :class:`VideoItem`) and ``.classes``.
Nothing is decoded here; :class:`vidconv.data.ClipLoader` probes the files.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".webm", ".mov")


@dataclass(frozen=True)
class VideoItem:
    """One video file and its class index (into the source's ``classes``)."""

    path: Path
    label: int


class _Source:
    videos: list[VideoItem]
    classes: list[str]

    def videos_per_class(self) -> dict[str, int]:
        """Number of videos of every class, in class order (zero for a class with none)."""
        counts = Counter(v.label for v in self.videos)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.videos)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.location!s}: {len(self.videos)} videos, "
                f"{len(self.classes)} classes)")

    @property
    def location(self) -> Path:
        raise NotImplementedError


class VideoFolder(_Source):
    """A dataset laid out as ``root/<class>/<video>``.

    Classes are the sub-folders of ``root`` in sorted order (hidden ones excepted), labels their
    index; videos are the entries with a video extension (mp4, avi, mkv, webm, mov, any case)
    directly inside a class folder, sorted by name (a folder or broken link so named is
    listed too; the loader reports it as unusable).

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: ``root`` holds no class folder or no video file.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise FileNotFoundError(f"dataset root {str(self.root)!r} {what}")
        class_dirs = sorted(p for p in self.root.iterdir()
                            if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise ValueError(f"dataset root {str(self.root)!r} holds no class folders "
                             "(expected root/<class>/<video>)")
        self.classes = [p.name for p in class_dirs]
        self.videos = [
            VideoItem(f, label)
            for label, d in enumerate(class_dirs)
            for f in sorted(d.iterdir())
            # Folders and broken links named like videos are kept, for the loader to report.
            if f.suffix.lower() in VIDEO_EXTENSIONS
            and (f.is_file() or f.is_dir() or (f.is_symlink() and not f.exists()))
        ]
        if not self.videos:
            raise ValueError(f"dataset root {str(self.root)!r} holds no video files (looked for "
                             f"{', '.join(VIDEO_EXTENSIONS)} in {len(class_dirs)} class folders)")

    @property
    def location(self) -> Path:
        return self.root


def read_class_index(path: str | Path) -> tuple[list[str], dict[int, int]]:
    """A UCF-101 ``classInd.txt`` (``<id> <name>`` lines, ids usually from 1).

    Returns:
        the class names in file order and a map from the file's ids to indices into them.
    """
    path = Path(path)
    names: list[str] = []
    ids: dict[int, int] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected '<id> <class name>', got {line!r}")
        cid = int(parts[0])
        if cid in ids or parts[1] in names:
            raise ValueError(f"{path}:{n}: class id {cid} or name {parts[1]!r} appears twice")
        ids[cid] = len(names)
        names.append(parts[1])
    if not names:
        raise ValueError(f"class index {str(path)!r} holds no classes")
    return names, ids


class VideoList(_Source):
    """A dataset given by a list file in the UCF-101 split format.

    Each non-empty line is ``relative/path.avi`` or ``relative/path.avi <label>``; paths are
    relative to ``root`` (default: the list file's folder).

    Class names and label numbering:
        - with a class index (``class_index``, else a ``classInd.txt`` beside the list file),
          ``<label>`` is an id of that file (UCF-101: 1-based) and a line without a label takes
          the class named by its first path component (UCF-101's test lists);
        - without one, labels are 0-based class indices and the classes are named "0", "1", ...
          up to the largest label; lines without labels then take their class from the first
          path component, classes being those folder names sorted (like :class:`VideoFolder`).
          Mixing lines with and without labels needs a class index.

    Raises:
        FileNotFoundError: the list file, the class index or ``root`` is missing.
        ValueError: a malformed line, an unknown label or class, or no line at all.
    """

    def __init__(self, list_file: str | Path, root: str | Path | None = None,
                 class_index: str | Path | None = None) -> None:
        self.list_file = Path(list_file)
        if not self.list_file.is_file():
            raise FileNotFoundError(f"list file {str(self.list_file)!r} does not exist")
        self.root = Path(root) if root is not None else self.list_file.parent
        if not self.root.is_dir():
            raise FileNotFoundError(f"video root {str(self.root)!r} of list file "
                                    f"{str(self.list_file)!r} does not exist")
        if class_index is None:
            beside = self.list_file.parent / "classInd.txt"
            class_index = beside if beside.is_file() and beside != self.list_file else None
        elif not Path(class_index).is_file():
            raise FileNotFoundError(f"class index {str(class_index)!r} does not exist")
        self.class_index = Path(class_index) if class_index is not None else None

        entries: list[tuple[str, int | None, int]] = []
        for n, line in enumerate(self.list_file.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2 or (len(parts) == 2 and not parts[1].lstrip("-").isdigit()):
                raise ValueError(f"{self.list_file}:{n}: expected 'relative/path [label]', "
                                 f"got {line!r}")
            entries.append((parts[0], int(parts[1]) if len(parts) == 2 else None, n))
        if not entries:
            raise ValueError(f"list file {str(self.list_file)!r} holds no videos")

        labelled = [e for e in entries if e[1] is not None]
        if self.class_index is not None:
            self.classes, ids = read_class_index(self.class_index)
            by_name = {name: i for i, name in enumerate(self.classes)}
        elif len(labelled) == len(entries):
            top = max(e[1] for e in entries if e[1] is not None)
            self.classes = [str(i) for i in range(top + 1)]
            ids = {i: i for i in range(top + 1)}
            by_name = {}
        elif not labelled:
            self.classes = sorted({Path(e[0]).parts[0] for e in entries})
            ids, by_name = {}, {name: i for i, name in enumerate(self.classes)}
        else:
            raise ValueError(f"list file {str(self.list_file)!r} mixes lines with and without "
                             "labels; give a class index (classInd.txt) to name the classes")

        self.videos = []
        for rel, label, n in entries:
            if label is not None:
                if label not in ids:
                    raise ValueError(f"{self.list_file}:{n}: label {label} is not a class id "
                                     f"(expected one of {min(ids)}..{max(ids)})")
                index = ids[label]
            else:
                head = Path(rel).parts[0]
                if head not in by_name:
                    raise ValueError(f"{self.list_file}:{n}: class folder {head!r} of {rel!r} "
                                     "is not in the class index")
                index = by_name[head]
            self.videos.append(VideoItem(self.root / rel, index))

    @property
    def location(self) -> Path:
        return self.list_file


def _is_prepared(location: Any) -> bool:
    """Whether ``location`` is ``vidconv prepare`` output: a folder with an index.json or
    shards, an index.json, or a URL / ``pipe:`` command (which only prepared data can be)."""
    text = str(location)
    if text.startswith(("http://", "https://", "file://", "pipe:")):
        return True
    path = Path(text)
    if path.is_dir():
        return (path / "index.json").is_file() or any(path.glob("shard-*.tar"))
    return path.name == "index.json" and path.is_file()


def open_source(path_or_list: str | Path | _Source, root: str | Path | None = None) -> _Source:
    """A dataset as a source: a folder is a :class:`VideoFolder`, a file a :class:`VideoList`
    (``root`` = its video root), ``vidconv prepare`` output (its folder, index.json, or a URL /
    ``pipe:`` command giving the index) a :class:`vidconv.data.shards.PreparedSource`. A source
    object is returned as it is.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: ``root`` given with a folder, or the dataset is empty.
    """
    if isinstance(path_or_list, _Source) or hasattr(path_or_list, "videos"):
        return path_or_list  # type: ignore[return-value]
    if _is_prepared(path_or_list):
        from vidconv.data.shards import PreparedSource

        if root is not None:
            raise ValueError(f"root is only for list files; {str(path_or_list)!r} is prepared "
                             f"data (vidconv prepare output), got root={str(root)!r}")
        return PreparedSource(path_or_list)  # type: ignore[return-value]
    path = Path(path_or_list)
    if path.is_dir():
        if root is not None and Path(root).resolve() != path.resolve():
            raise ValueError(f"root is only for list files; {str(path)!r} is a folder "
                             f"(root/<class>/<video>), got root={str(root)!r}")
        return VideoFolder(path)
    if path.is_file():
        return VideoList(path, root)
    raise FileNotFoundError(f"dataset {str(path)!r} does not exist (expected a folder "
                            "root/<class>/<video> or a list file)")
