"""Video datasets and clip loaders.

- Sources: :class:`VideoFolder` (``root/<class>/<video>``), :class:`VideoList` (UCF-101 split
  format) and :func:`open_source`, which picks one.
- :class:`ClipLoader`: clips sampled as the models need them (random for training, evenly
  spaced with crop/flip views for evaluation), decoded with PyAV or NVIDIA DALI, preprocessed
  with vidconv's fused ops on the target device, sharded across ranks, bad files skipped and
  reported (see :mod:`vidconv.data.loader` for the exact rules); batches made ahead by worker
  threads or processes (:mod:`vidconv.data.workers`).
- :mod:`vidconv.data.synthetic`: small labelled datasets of real encoded videos.
- :func:`vidconv.data.prepare.prepare` (``vidconv prepare``): videos decoded once into
  WebDataset tar shards of JPEG frames; :class:`PreparedSource` reads them back through
  :func:`open_source`, with the same clip rules (:mod:`vidconv.data.shards`).
"""

from vidconv.data.decode import DecodeError, VideoInfo, decode_frames, probe
from vidconv.data.loader import (
    VIEWS,
    BadVideoWarning,
    Batch,
    ClipLoader,
    LoaderReport,
    SkippedVideo,
)
from vidconv.data.shards import PreparedSource
from vidconv.data.sources import (
    VIDEO_EXTENSIONS,
    VideoFolder,
    VideoItem,
    VideoList,
    open_source,
    read_class_index,
)
from vidconv.data.workers import WorkerError

__all__ = [
    "VIDEO_EXTENSIONS",
    "VIEWS",
    "BadVideoWarning",
    "Batch",
    "ClipLoader",
    "DecodeError",
    "LoaderReport",
    "PreparedSource",
    "SkippedVideo",
    "VideoFolder",
    "VideoInfo",
    "VideoItem",
    "VideoList",
    "WorkerError",
    "decode_frames",
    "open_source",
    "probe",
    "read_class_index",
]
