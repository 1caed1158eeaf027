"""Synthetic labelled videos: a small, reproducible stand-in for Sports-1M and UCF-101.

Every class is one object (a shape with a colour and a texture) following one motion. The class
catalogue is built so that the *cue* separating a class from its neighbours is known:

- ``kind="motion"``: a family of classes draws the *same* object (shape, colours, texture, size)
  and differs only in how it moves: direction, speed, periodicity (oscillation period, hops)
  or trajectory shape (straight line vs circle). A single frame of such a class is distributed
  exactly like a single frame of its siblings, so only a network that sees several frames can
  tell them apart (the paper's motion-aware fusion models). (No spinning in these families: a
  rotated object would show in a single frame; spinning appears only in "both" classes.)
- ``kind="appearance"``: a family shares one motion and differs only in shape, colour or
  texture: any single-frame network can separate them.
- ``kind="both"``: classes that differ in appearance *and* motion; the easy classes, first in
  :data:`DEFAULT_ORDER` so that a few-class dataset is learnable by any model.

Distractors are drawn independently of the class, so they carry no label information:

- camera motion: a global pan (constant drift) and/or jitter (per-frame shake) of the whole
  scene. The paper found its motion-aware networks did worse mostly on videos with camera
  motion; here a network has to learn the object's motion *relative* to the background.
- clutter: small, desaturated distractor shapes, some static, some moving;
- a textured background (smooth random Fourier texture) and per-pixel sensor noise.

Determinism and matching: video ``k`` of every class in a dataset uses the same random scene
(background, clutter, camera path, noise, the object's start position, phase and size jitter);
the class only decides the object's look and motion. The two classes of a motion-only pair
therefore have per-frame appearance statistics that agree up to which background pixels the
object hides. The scene is a torus (positions wrap around the frame edges, the background
texture is periodic) so that every motion keeps the whole object in view and every position is
equally likely at every frame: no motion class can be recognised from *where* its object is.

Horizontal flips: the loader flips training clips left-right at random (the paper's
augmentation), which would turn "moves left" into "moves right" and clockwise into
anticlockwise. Each video's motion is therefore mirrored left-right with probability 1/2, and
classes are defined only by flip-invariant properties (up vs down, straight vs circular, speed,
period, spinning or not). All shapes and textures are left-right symmetric for the same reason.

Files are real encoded videos written with PyAV (VP9 in WebM or H.264 in MP4, yuv420p) so the
loader's decode path is exercised, laid out as ``root/<class>/<class>_<k>.<ext>`` with a
``manifest.json`` in ``root`` recording the parameters; a later call with the same parameters
reuses the files.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Appearance", "Motion", "ClassSpec", "CATALOGUE", "PRETRAIN_CLASSES", "TRANSFER_CLASSES",
    "DEFAULT_ORDER", "KINDS", "SCALES", "BenchmarkScale", "CODECS", "MANIFEST", "render",
    "write_video", "write_dataset", "write_benchmark", "class_specs",
]

GENERATOR_VERSION = 1  # bump when the pixels change: old manifests then no longer match
MANIFEST = "manifest.json"
KINDS = ("motion", "appearance", "both")
SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond")
TEXTURES = ("flat", "stripes", "checker", "rings")
# codec -> (PyAV encoder, container format, file extension)
CODECS = {"vp9": ("libvpx-vp9", "webm", "webm"), "h264": ("libx264", "mp4", "mp4")}

# Saturated object colours; the background stays low-saturation so every object stands out.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45), "green": (30, 220, 60), "blue": (50, 90, 230),
    "yellow": (235, 205, 40), "magenta": (215, 55, 200), "cyan": (40, 200, 215),
    "orange": (245, 140, 35), "white": (240, 240, 240), "black": (25, 25, 25),
    "purple": (135, 60, 200), "lime": (160, 230, 50), "pink": (250, 140, 180),
    "teal": (20, 130, 130), "navy": (30, 35, 110),
}


@dataclass(frozen=True)
class Appearance:
    """How an object looks. ``size`` is its radius as a fraction of the frame side; ``accent``
    is the texture's second colour (unused for ``"flat"``)."""

    shape: str
    colour: str
    texture: str = "flat"
    accent: str = "white"
    size: float = 0.14

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("texture", self.texture, TEXTURES)
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("accent", self.accent, COLOURS)


@dataclass(frozen=True)
class Motion:
    """How an object moves, in frame sides per frame and frames.

    The offset from the start position is ``drift + path``: a straight drift of ``speed`` along
    ``angle`` (degrees, 0 = right, 90 = down, image axes), plus a periodic ``path``:
    ``"circle"`` (radius ``amplitude``), ``"oscillate"`` (sinusoid of ``amplitude`` along
    ``axis`` degrees) or ``"hop"`` (upward bounces of height ``amplitude``), each of ``period``
    frames; ``spin`` > 0 rotates the object once every ``spin`` frames.
    """

    speed: float = 0.0
    angle: float = 0.0
    path: str = "none"
    amplitude: float = 0.0
    period: float = 0.0
    axis: float = 90.0
    spin: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("path", self.path, ("none", "circle", "oscillate", "hop"))
        if self.path != "none" and not self.period > 0:
            raise ValueError(f"period must be > 0 for path={self.path!r}, got {self.period}")


@dataclass(frozen=True)
class ClassSpec:
    """One class: its name (the folder name), kind, group, and the object's look and motion."""

    name: str
    kind: str
    group: str
    appearance: Appearance
    motion: Motion

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, KINDS)


def _check_choice(name: str, value: object, choices: Sequence[str] | Mapping[str, Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


# ------------------------------------------------------------------------------------------
# The class catalogue
# ------------------------------------------------------------------------------------------

_UP, _DOWN, _RIGHT = -90.0, 90.0, 0.0
# "both" classes are the ones a few-class dataset uses (DEFAULT_ORDER): big objects make them
# learnable by a narrow network in a few dozen steps.
_BIG = 0.24


def _family(group: str, kind: str, members: Sequence[tuple[str, Appearance, Motion]]
            ) -> list[ClassSpec]:
    return [ClassSpec(name, kind, group, a, m) for name, a, m in members]


def _motion_family(group: str, look: Appearance, motions: Sequence[tuple[str, Motion]]
                   ) -> list[ClassSpec]:
    """Motion-only classes: one object, several motions."""
    return _family(group, "motion", [(name, look, m) for name, m in motions])


def _appearance_family(group: str, motion: Motion, looks: Sequence[tuple[str, Appearance]]
                       ) -> list[ClassSpec]:
    """Appearance-only classes: one motion, several objects."""
    return _family(group, "appearance", [(name, a, motion) for name, a in looks])


A, M = Appearance, Motion

# Pretrain set (the Sports-1M role). Within each group the first two members are the most
# distinct, since the small scales take groups' leading members.
PRETRAIN_CLASSES: list[ClassSpec] = [
    *_family("objects in motion", "both", [
        ("red_disk_rising", A("disk", "red", size=_BIG), M(speed=0.03, angle=_UP)),
        ("green_square_spinning", A("square", "green", size=_BIG), M(spin=12)),
        ("blue_triangle_hopping", A("triangle", "blue", size=_BIG),
         M(path="hop", amplitude=0.2, period=12)),
        ("yellow_cross_circling", A("cross", "yellow", size=_BIG),
         M(path="circle", amplitude=0.18, period=16)),
        ("magenta_ring_zigzag", A("ring", "magenta", size=_BIG),
         M(speed=0.03, angle=_RIGHT, path="oscillate", amplitude=0.1, period=10)),
        ("cyan_diamond_sinking", A("diamond", "cyan", size=_BIG), M(speed=0.02, angle=_DOWN)),
        ("white_checker_swaying", A("square", "white", "checker", "black", size=_BIG),
         M(path="oscillate", amplitude=0.15, period=14, axis=0.0)),
        ("black_disk_resting", A("disk", "black", size=_BIG), M()),
    ]),
    *_motion_family("trajectories", A("disk", "orange", "stripes", "white"), [
        ("orange_disk_up", M(speed=0.03, angle=_UP)),
        ("orange_disk_down", M(speed=0.03, angle=_DOWN)),
        ("orange_disk_circle", M(path="circle", amplitude=0.15, period=16)),
        ("orange_disk_sideways", M(speed=0.03, angle=_RIGHT)),
        ("orange_disk_still", M()),
        ("orange_disk_diagonal", M(speed=0.03, angle=45.0)),
    ]),
    *_motion_family("rhythms", A("square", "purple", "checker", "yellow"), [
        ("purple_square_slow_bob", M(path="oscillate", amplitude=0.12, period=20)),
        ("purple_square_fast_bob", M(path="oscillate", amplitude=0.12, period=7)),
        ("purple_square_sway", M(path="oscillate", amplitude=0.12, period=12, axis=0.0)),
        ("purple_square_hop", M(path="hop", amplitude=0.18, period=12)),
        ("purple_square_slow_drift", M(speed=0.012, angle=_RIGHT)),
        ("purple_square_fast_drift", M(speed=0.045, angle=_RIGHT)),
    ]),
    *_appearance_family("shapes", M(path="circle", amplitude=0.12, period=20), [
        ("lime_disk", A("disk", "lime")),
        ("lime_triangle", A("triangle", "lime")),
        ("lime_ring", A("ring", "lime")),
        ("lime_cross", A("cross", "lime")),
        ("lime_square", A("square", "lime")),
        ("lime_diamond", A("diamond", "lime")),
    ]),
    *_appearance_family("colours and textures", M(speed=0.02, angle=-45.0), [
        ("pink_disk_plain", A("disk", "pink", size=0.16)),
        ("teal_disk_plain", A("disk", "teal", size=0.16)),
        ("pink_disk_striped", A("disk", "pink", "stripes", "navy", size=0.16)),
        ("pink_disk_checked", A("disk", "pink", "checker", "navy", size=0.16)),
        ("teal_disk_ringed", A("disk", "teal", "rings", "white", size=0.16)),
        ("white_disk_plain", A("disk", "white", size=0.16)),
    ]),
]

# Transfer set (the UCF-101 role): new classes, new object/motion combinations, the same
# kinds of groups.
TRANSFER_CLASSES: list[ClassSpec] = [
    *_family("objects in motion", "both", [
        ("green_ring_hopper", A("ring", "green", size=_BIG),
         M(path="hop", amplitude=0.2, period=10)),
        ("red_cross_swinger", A("cross", "red", size=_BIG),
         M(path="oscillate", amplitude=0.15, period=12, axis=0.0)),
        ("blue_square_zigzagger", A("square", "blue", "stripes", "white", size=_BIG),
         M(speed=0.03, angle=_RIGHT, path="oscillate", amplitude=0.1, period=8)),
        ("yellow_diamond_sitter", A("diamond", "yellow", size=_BIG), M()),
    ]),
    *_motion_family("trajectories", A("triangle", "cyan", "stripes", "black"), [
        ("cyan_triangle_climbing", M(speed=0.03, angle=_UP)),
        ("cyan_triangle_falling", M(speed=0.03, angle=_DOWN)),
        ("cyan_triangle_orbiting", M(path="circle", amplitude=0.15, period=14)),
        ("cyan_triangle_resting", M()),
    ]),
    *_appearance_family("shapes", M(path="oscillate", amplitude=0.12, period=9), [
        ("magenta_disk_bobbing", A("disk", "magenta")),
        ("magenta_triangle_bobbing", A("triangle", "magenta")),
        ("magenta_cross_bobbing", A("cross", "magenta")),
        ("magenta_square_bobbing", A("square", "magenta")),
    ]),
]

del A, M

CATALOGUE: dict[str, ClassSpec] = {c.name: c for c in (*PRETRAIN_CLASSES, *TRANSFER_CLASSES)}
assert len(CATALOGUE) == len(PRETRAIN_CLASSES) + len(TRANSFER_CLASSES), "class names clash"


def _leading(specs: Sequence[ClassSpec], per_group: int | Mapping[str, int]) -> list[ClassSpec]:
    """The first members of each group, groups in catalogue order."""
    out: list[ClassSpec] = []
    taken: dict[str, int] = {}
    for s in specs:
        want = per_group.get(s.group, 0) if isinstance(per_group, Mapping) else per_group
        if taken.get(s.group, 0) < want:
            out.append(s)
            taken[s.group] = taken.get(s.group, 0) + 1
    return out


# write_dataset(classes=n) takes the first n: the "both" classes first (separable by any
# model), then motion-only and appearance-only pairs in turn, then the transfer classes.
DEFAULT_ORDER: list[str] = [s.name for s in PRETRAIN_CLASSES if s.kind == "both"]
for _i in range(0, 6, 2):
    for _g in ("trajectories", "shapes", "rhythms", "colours and textures"):
        DEFAULT_ORDER += [s.name for s in PRETRAIN_CLASSES if s.group == _g][_i:_i + 2]
DEFAULT_ORDER += [s.name for s in TRANSFER_CLASSES]
assert sorted(DEFAULT_ORDER) == sorted(CATALOGUE)


def class_specs(classes: int | Sequence[str] | Sequence[ClassSpec]) -> list[ClassSpec]:
    """Resolve ``classes``: a count (the first of :data:`DEFAULT_ORDER`), catalogue names, or
    :class:`ClassSpec` objects (custom classes)."""
    if isinstance(classes, bool) or not isinstance(classes, int | Sequence) or isinstance(
            classes, str):
        raise TypeError(f"classes must be an int or a sequence of class names, got "
                        f"{type(classes).__name__}")
    if isinstance(classes, int):
        if not 1 <= classes <= len(DEFAULT_ORDER):
            raise ValueError(f"classes must be between 1 and {len(DEFAULT_ORDER)}, got {classes}")
        return [CATALOGUE[n] for n in DEFAULT_ORDER[:classes]]
    specs = []
    for c in classes:
        if isinstance(c, ClassSpec):
            specs.append(c)
        elif c in CATALOGUE:
            specs.append(CATALOGUE[c])
        else:
            raise ValueError(f"classes: unknown class {c!r}; known: {', '.join(DEFAULT_ORDER)}")
    names = [s.name for s in specs]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"classes must be non-empty and unique, got {names}")
    return specs


# ------------------------------------------------------------------------------------------
# Rendering (numpy, vectorised over frames and pixels)
# ------------------------------------------------------------------------------------------

@dataclass
class _Scene:
    """Everything random about video k, drawn independently of its class."""

    camera: np.ndarray  # (T, 2) camera offset (x, y) in pixels
    bg_base: np.ndarray  # (3,)
    bg_freq: np.ndarray  # (K, 2) integer spatial frequencies (cycles per frame)
    bg_phase: np.ndarray  # (K,)
    bg_weight: np.ndarray  # (K, 3) per-channel amplitudes
    start: np.ndarray  # (2,) object start position, pixels
    phase: float  # object's motion phase, fraction of a period
    mirror: float  # +1 or -1: left-right mirror of the motion
    size_scale: float
    brightness: float
    clutter: list[dict[str, Any]] = field(default_factory=list)
    noise: np.ndarray | None = None  # (T, H, W, 1) float32


def _draw_scene(rng: np.random.Generator, frames: int, size: int, camera: float, clutter: int,
                noise: float) -> _Scene:
    # Draw order and counts depend only on the dataset's parameters, never on the class, so
    # that video k of every class gets the same scene.
    t = np.arange(frames, dtype=np.float64)
    has_camera = rng.random() < camera
    pan_on, jitter_on = rng.random() < 0.6, rng.random() < 0.6
    pan_speed, pan_angle = rng.uniform(0.01, 0.03) * size, rng.uniform(0, 2 * math.pi)
    jitter = rng.normal(0.0, 0.01 * size, (frames, 2))
    cam = np.zeros((frames, 2))
    if has_camera:
        if pan_on or not jitter_on:
            cam += pan_speed * t[:, None] * np.array([math.cos(pan_angle), math.sin(pan_angle)])
        if jitter_on:
            cam += jitter
    k = 10
    # Low frequencies for large blotches, a few higher ones for fine texture.
    radius = np.concatenate([rng.uniform(1, 3, k - 3), rng.uniform(5, 9, 3)])
    theta = rng.uniform(0, 2 * math.pi, k)
    freq = np.round(np.stack([radius * np.cos(theta), radius * np.sin(theta)], 1))
    bg_phase = rng.uniform(0, 2 * math.pi, k)
    grey = rng.uniform(75, 150)
    base = grey + rng.normal(0, 6, 3)
    lum = rng.uniform(10, 22) / np.sqrt(k / 2) / (1 + 0.3 * radius)
    chroma = rng.normal(0, 3, (k, 3))
    weight = lum[:, None] + chroma
    start = rng.uniform(0, size, 2)
    phase = float(rng.random())
    mirror = float(rng.choice([-1.0, 1.0]))
    size_scale = float(rng.uniform(0.9, 1.1))
    brightness = float(rng.uniform(0.9, 1.1))
    items = []
    n_items = int(rng.integers(0, clutter + 1)) if clutter > 0 else 0
    for i in range(clutter):
        grey_c = rng.uniform(60, 190)
        tint = np.array(COLOURS[str(rng.choice(list(COLOURS)))], dtype=np.float64)
        shape = str(rng.choice(SHAPES))
        item_radius = rng.uniform(0.04, 0.07) * size
        item_start = rng.uniform(0, size, 2)
        speed, heading = rng.uniform(0.01, 0.04) * size, rng.uniform(0, 2 * math.pi)
        moving = rng.random() < 0.5
        if i < n_items:
            items.append({
                "shape": shape, "radius": item_radius, "start": item_start,
                # desaturated: distractors, not look-alikes of the class objects
                "colour": grey_c + 0.35 * (tint - grey_c),
                "velocity": speed * moving * np.array([math.cos(heading), math.sin(heading)]),
            })
    noise_field = (rng.standard_normal((frames, size, size, 1), dtype=np.float32)
                   * np.float32(noise)) if noise > 0 else None
    return _Scene(cam, base, freq, bg_phase, weight, start,
                  phase, mirror, size_scale, brightness, items, noise_field)


def _background(scene: _Scene, frames: int, size: int) -> np.ndarray:
    """Periodic Fourier texture sampled at the camera's offset: (T, H, W, 3) float32."""
    px = (np.arange(size) + 0.5)[None, :] + scene.camera[:, 0:1]  # (T, W)
    py = (np.arange(size) + 0.5)[None, :] + scene.camera[:, 1:2]  # (T, H)
    w = 2 * math.pi / size
    ax = w * scene.bg_freq[:, 0][:, None, None] * px[None]  # (K, T, W)
    ay = w * scene.bg_freq[:, 1][:, None, None] * py[None] + scene.bg_phase[:, None, None]
    # cos(ax + ay) = cos ax cos ay - sin ax sin ay: a batched (H x K) @ (K x W) per frame.
    cx, sx = np.cos(ax).transpose(1, 0, 2), np.sin(ax).transpose(1, 0, 2)  # (T, K, W)
    cy, sy = np.cos(ay).transpose(1, 2, 0), np.sin(ay).transpose(1, 2, 0)  # (T, H, K)
    out = np.empty((frames, size, size, 3), dtype=np.float32)
    for c in range(3):
        wc = scene.bg_weight[:, c]
        out[..., c] = (cy * wc) @ cx - (sy * wc) @ sx
    out += scene.bg_base.astype(np.float32)
    return out


def _sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (in object radii, < 0 inside) to a shape of radius ~1 at the origin;
    v points down. Every shape is symmetric under u -> -u (see the module docstring)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "disk":
        return np.sqrt(u * u + v * v) - 1.0
    if shape == "square":
        return np.maximum(au, av) - 0.85
    if shape == "diamond":
        return (au + av - 1.2) * (1 / math.sqrt(2))
    if shape == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.72) - 0.3
    if shape == "cross":
        return np.minimum(np.maximum(au - 1.0, av - 0.34), np.maximum(au - 0.34, av - 1.0))
    if shape == "triangle":  # apex up
        return np.maximum(v - 0.7, (math.sqrt(3) * au - v) / 2 - 0.7)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """Weight of the accent colour in [0, 1] (None: flat)."""
    if texture == "flat":
        return None
    if texture == "stripes":
        wave = np.cos(2 * math.pi * 1.25 * v)
    elif texture == "checker":
        wave = np.cos(2 * math.pi * 0.9 * u) * np.cos(2 * math.pi * 0.9 * v)
    elif texture == "rings":
        wave = np.cos(2 * math.pi * 1.5 * np.sqrt(u * u + v * v))
    else:
        raise ValueError(f"texture must be one of {TEXTURES}, got {texture!r}")
    # A steep but smooth edge: crisp patterns that still anti-alias.
    return np.clip(0.5 + 2.0 * wave, 0.0, 1.0)


def _draw(canvas: np.ndarray, centre: np.ndarray, radius: float, shape: str, colour: np.ndarray,
          texture: str = "flat", accent: np.ndarray | None = None,
          rotation: np.ndarray | None = None) -> None:
    """Blend an anti-aliased object into canvas (T, H, W, 3) in place; centre (T, 2) in pixels
    (wrapped: the frame is a torus), rotation (T,) radians or None."""
    size = canvas.shape[1]
    grid = np.arange(size, dtype=np.float32) + 0.5
    half = size / 2
    dx = ((grid[None, :] - centre[:, :1].astype(np.float32) + half) % size - half) / radius
    dy = ((grid[None, :] - centre[:, 1:2].astype(np.float32) + half) % size - half) / radius
    u, v = dx[:, None, :], dy[:, :, None]  # (T, 1, W), (T, H, 1)
    if rotation is not None:
        c = np.cos(rotation).astype(np.float32)[:, None, None]
        s = np.sin(rotation).astype(np.float32)[:, None, None]
        u, v = c * u + s * v, c * v - s * u
    u, v = np.broadcast_arrays(u, v)
    alpha = np.clip(0.5 - _sdf(shape, u, v) * radius, 0.0, 1.0)[..., None]
    mix = _texture(texture, u, v)
    if mix is None:
        paint = colour.astype(np.float32)
    else:
        assert accent is not None
        paint = colour.astype(np.float32) + mix[..., None] * (accent - colour).astype(np.float32)
    canvas += alpha * (paint - canvas)


def _trajectory(m: Motion, frames: int, size: int, scene: _Scene
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """World-space centre (T, 2) in pixels and rotation (T,) or None."""
    t = np.arange(frames, dtype=np.float64)
    off = np.zeros((frames, 2))
    a = math.radians(m.angle)
    off += m.speed * size * t[:, None] * np.array([math.cos(a), math.sin(a)])
    if m.path != "none":
        ph = 2 * math.pi * (t / m.period + scene.phase)
        amp = m.amplitude * size
        if m.path == "circle":
            off += amp * np.stack([np.cos(ph), np.sin(ph)], 1)
        elif m.path == "oscillate":
            b = math.radians(m.axis)
            off += amp * np.sin(ph)[:, None] * np.array([math.cos(b), math.sin(b)])
        else:  # hop: |sin| bounces, upwards only (y points down)
            off[:, 1] -= amp * np.abs(np.sin(ph / 2))
    off[:, 0] *= scene.mirror
    rot = None
    if m.spin > 0:
        rot = scene.mirror * 2 * math.pi * (t / m.spin + scene.phase)
    return scene.start + off, rot


def render(cls: str | ClassSpec, *, frames: int = 32, size: int = 64, seed: int | Sequence[int] = 0,
           index: int = 0, camera: float = 0.2, clutter: int = 2, noise: float = 3.0
           ) -> np.ndarray:
    """Render video ``index`` of class ``cls`` as uint8 RGB frames (frames, size, size, 3).

    ``seed`` (an int or a sequence of ints) and ``index`` pick the random scene; the same
    (seed, index) gives the same scene for every class (see the module docstring).
    ``camera``: probability that the video has camera motion (pan and/or jitter);
    ``clutter``: at most this many distractor shapes; ``noise``: std of per-pixel luminance
    noise in 8-bit levels.
    """
    spec = class_specs([cls])[0]
    _check_int("frames", frames, 1)
    _check_int("size", size, 8)
    _check_int("index", index, 0)
    _check_int("clutter", clutter, 0)
    _check_distractors(camera, noise)
    entropy = [seed] if isinstance(seed, int) else list(seed)
    rng = np.random.default_rng([*entropy, index])
    scene = _draw_scene(rng, frames, size, camera, clutter, noise)
    canvas = _background(scene, frames, size)
    t = np.arange(frames)[:, None]
    for item in scene.clutter:
        centre = item["start"] + item["velocity"] * t - scene.camera
        _draw(canvas, centre, item["radius"], item["shape"], item["colour"])
    look = spec.appearance
    centre, rotation = _trajectory(spec.motion, frames, size, scene)
    colour = np.array(COLOURS[look.colour], dtype=np.float64) * scene.brightness
    accent = np.array(COLOURS[look.accent], dtype=np.float64) * scene.brightness
    _draw(canvas, centre - scene.camera, look.size * size * scene.size_scale, look.shape,
          colour, look.texture, accent, rotation)
    if scene.noise is not None:
        canvas += scene.noise
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def _check_distractors(camera: float, noise: float) -> None:
    if not 0.0 <= camera <= 1.0:
        raise ValueError(f"camera must be a probability in [0, 1], got {camera}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


# ------------------------------------------------------------------------------------------
# Encoding and datasets
# ------------------------------------------------------------------------------------------

def write_video(path: str | os.PathLike[str], frames: np.ndarray, *, codec: str = "vp9",
                fps: int = 25) -> Path:
    """Encode uint8 RGB frames (T, H, W, 3) to ``path`` (yuv420p), atomically: the file is
    written under a temporary name beside it and renamed when complete, so a reader never sees
    a half-written video. Single-threaded and bit-exact, so the bytes depend only on the frames.
    """
    import av

    _check_choice("codec", codec, CODECS)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames must have even height and width for yuv420p, got "
                         f"{frames.shape[1]}x{frames.shape[2]}")
    encoder, fmt, _ = CODECS[codec]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    # Quality high enough that decoded frames stay close to the rendered ones; fastest presets
    # because CI writes hundreds of these on 2 cores.
    options = ({"deadline": "realtime", "cpu-used": "8", "crf": "16", "b": "0", "row-mt": "0",
                "lag-in-frames": "0"} if codec == "vp9"
               else {"preset": "veryfast", "crf": "16", "tune": "zerolatency"})
    try:
        with av.open(str(tmp), "w", format=fmt, options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream(encoder, rate=fps, options=options)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.thread_count = 1
            stream.codec_context.flags |= av.codec.context.Flags.bitexact
            for f in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_one(job: tuple[Any, ...]) -> None:
    spec, k, path, frames, size, entropy, camera, clutter, noise, codec, fps = job
    video = render(spec, frames=frames, size=size, seed=entropy, index=k, camera=camera,
                   clutter=clutter, noise=noise)
    write_video(path, video, codec=codec, fps=fps)


def _manifest_params(specs: Sequence[ClassSpec], videos_per_class: int, frames: int, size: int,
                     codec: str, seed: Sequence[int], fps: int, camera: float, clutter: int,
                     noise: float) -> dict[str, Any]:
    return {"generator": "vidconv.data.synthetic", "version": GENERATOR_VERSION,
            "classes": [asdict(s) for s in specs], "videos_per_class": videos_per_class,
            "frames": frames, "size": size, "codec": codec, "seed": list(seed), "fps": fps,
            "camera": camera, "clutter": clutter, "noise": noise}


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_dataset(root: str | os.PathLike[str], *,
                  classes: int | Sequence[str] | Sequence[ClassSpec] = 4,
                  videos_per_class: int = 4, frames: int = 32, size: int = 64,
                  codec: str = "vp9", seed: int | Sequence[int] = 0, fps: int = 25,
                  camera: float = 0.2, clutter: int = 2, noise: float = 3.0,
                  workers: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Write a labelled video dataset ``root/<class>/<class>_<k>.<ext>`` and return its info.

    ``classes``: a count (the first of :data:`DEFAULT_ORDER`: up to 8 classes that differ in
    both appearance and motion, then motion-only and appearance-only pairs), catalogue names
    (see :data:`CATALOGUE`) or :class:`ClassSpec` objects. ``codec``: ``"vp9"`` (WebM) or
    ``"h264"`` (MP4). ``seed`` picks the scenes (different seeds: different videos, e.g. for
    train and test splits). ``camera``, ``clutter``, ``noise``: distractors (see :func:`render`).
    ``workers``: processes that render and encode (forked; None: 1 below 400 videos, else the
    CPU count, at most 8); the files do not depend on it. ``progress``: a tqdm bar.

    If ``root/manifest.json`` records the same parameters and every file exists, nothing is
    written. Otherwise every video is (re)written atomically and the manifest written last, so
    an interrupted run is redone; files a previous manifest listed that this dataset does not
    have are removed.

    Returns ``{"root", "classes" (sorted, the folder order loaders use), "kinds", "groups",
    "paths" (class -> list of Path), "videos" (list of {"path", "class", "label"}), "params",
    "reused"}``.
    """
    specs = class_specs(classes)
    for name, value, minimum in (("videos_per_class", videos_per_class, 1), ("frames", frames, 1),
                                 ("size", size, 8), ("fps", fps, 1), ("clutter", clutter, 0)):
        _check_int(name, value, minimum)
    _check_choice("codec", codec, CODECS)
    if size % 2:
        raise ValueError(f"size must be even (yuv420p), got {size}")
    _check_distractors(camera, noise)
    if workers is not None:
        _check_int("workers", workers, 1)
    entropy = [seed] if isinstance(seed, int) else [int(s) for s in seed]
    root = Path(root)
    params = _manifest_params(specs, videos_per_class, frames, size, codec, entropy, fps,
                              float(camera), clutter, float(noise))
    ext = CODECS[codec][2]
    names = sorted(s.name for s in specs)
    by_name = {s.name: s for s in specs}
    paths = {n: [root / n / f"{n}_{k:03d}.{ext}" for k in range(videos_per_class)]
             for n in names}
    info: dict[str, Any] = {
        "root": root, "classes": names,
        "kinds": {n: by_name[n].kind for n in names},
        "groups": {n: by_name[n].group for n in names},
        "paths": paths,
        "videos": [{"path": p, "class": n, "label": i} for i, n in enumerate(names)
                   for p in paths[n]],
        "params": params, "reused": False,
    }
    old = _read_manifest(root)
    if old is not None and old.get("params") == params and all(
            p.is_file() for ps in paths.values() for p in ps):
        info["reused"] = True
        return info
    if old is not None:
        keep = {str(p.relative_to(root)) for ps in paths.values() for p in ps}
        for rel in old.get("files", []):
            if rel not in keep and (root / rel).is_file():
                (root / rel).unlink()
                if (root / rel).parent.is_dir() and not any((root / rel).parent.iterdir()):
                    (root / rel).parent.rmdir()
        (root / MANIFEST).unlink()
    jobs = [(by_name[n], k, p, frames, size, entropy, camera, clutter, noise, codec, fps)
            for n in names for k, p in enumerate(paths[n])]
    for n in names:
        (root / n).mkdir(parents=True, exist_ok=True)
    if workers is None:
        # Worker start-up only pays off for big datasets; fork exists on Linux only.
        workers = (min(os.cpu_count() or 1, 8) if len(jobs) >= 400 and sys.platform == "linux"
                   else 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"writing {root}", unit="video")
    if workers == 1:
        for job in jobs:
            _write_one(job)
            if bar is not None:
                bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork, as torch's DataLoader does on Linux: no __main__ guard needed and no re-import;
        # the children only use numpy and PyAV. Every video depends only on its own job, so the
        # files are the same for any number of workers.
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            for _ in ex.map(_write_one, jobs, chunksize=4):
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    manifest = {"params": params, "classes": names, "kinds": info["kinds"],
                "groups": info["groups"],
                "files": [str(v["path"].relative_to(root)) for v in info["videos"]]}
    tmp = root / f".{MANIFEST}.part"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)
    return info


# ------------------------------------------------------------------------------------------
# The two-set benchmark: pretraining classes and transfer classes, each with train and test
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchmarkScale:
    """Sizes of one benchmark scale: classes per group, videos per class, frames, pixels."""

    pretrain_per_group: int
    transfer_per_group: int
    pretrain_videos: tuple[int, int]  # (train, test) per class
    transfer_videos: tuple[int, int]
    frames: int
    size: int
    camera: float
    clutter: int
    noise: float


# Frames >= 26: late fusion needs two frames 15 apart and early/slow fusion 10-frame clips,
# with room left for random clip positions.
SCALES: dict[str, BenchmarkScale] = {
    # 6 pretrain classes (2 both, 2 motion-only, 2 appearance-only), 4 transfer classes
    "tiny": BenchmarkScale(2, 2, (12, 4), (6, 3), 28, 64, 0.25, 2, 3.0),
    # 10 pretrain classes (2 per group), 6 transfer classes
    "quick": BenchmarkScale(2, 2, (12, 4), (6, 4), 32, 64, 0.3, 3, 4.0),
    # all 32 pretrain classes, all 12 transfer classes
    "full": BenchmarkScale(8, 4, (48, 12), (12, 8), 48, 128, 0.4, 4, 5.0),
}
# tiny: 2 "both", 2 motion-only, 2 appearance-only (colour: the easiest appearance cue)
# pretrain classes; 2 "both" and 2 motion-only transfer classes. The test suite trains on it
# for a few dozen steps only, so two thirds of the pretrain classes and half of the transfer
# classes are separable from a single frame.
_TINY_PRETRAIN = {"objects in motion": 2, "trajectories": 2, "colours and textures": 2}
_TINY_TRANSFER = {"objects in motion": 2, "trajectories": 2}


def _benchmark_classes(scale: str) -> tuple[list[ClassSpec], list[ClassSpec]]:
    s = SCALES[scale]
    if scale == "tiny":
        return _leading(PRETRAIN_CLASSES, _TINY_PRETRAIN), _leading(TRANSFER_CLASSES,
                                                                     _TINY_TRANSFER)
    return (_leading(PRETRAIN_CLASSES, s.pretrain_per_group),
            _leading(TRANSFER_CLASSES, s.transfer_per_group))


def write_benchmark(work_dir: str | os.PathLike[str], *, seed: int = 0, scale: str = "quick",
                    workers: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Write (or reuse) the two-set benchmark under ``work_dir/<scale>-seed<seed>/``.

    - ``"pretrain"`` (the Sports-1M role): more classes and videos; groups "objects in motion"
      (kind both), "trajectories" and "rhythms" (motion-only families), "shapes" and
      "colours and textures" (appearance-only families).
    - ``"transfer"`` (the UCF-101 role): new classes, disjoint from the pretrain ones, few
      videos per class, in groups "objects in motion", "trajectories", "shapes".

    Each set has a train and a test split drawn from different seed streams. ``scale``:
    ``"tiny"`` (the test suite), ``"quick"`` (CI: well under a minute to write on 2 cores),
    ``"full"`` (GPU runs; ~2,200 videos at 128x128, about 0.15 s each on one CPU core, so
    ``workers`` matters there). Returns ``{"root", "scale", "seed", "pretrain": {"train", "test",
    "classes", "kinds", "groups"}, "transfer": {...}}``.
    """
    _check_choice("scale", scale, SCALES)
    _check_int("seed", seed, 0)
    s = SCALES[scale]
    root = Path(work_dir) / f"{scale}-seed{seed}"
    out: dict[str, Any] = {"root": root, "scale": scale, "seed": seed}
    for set_id, (name, specs, videos) in enumerate(zip(
            ("pretrain", "transfer"), _benchmark_classes(scale),
            (s.pretrain_videos, s.transfer_videos), strict=True)):
        entry: dict[str, Any] = {}
        for split_id, (split, n) in enumerate(zip(("train", "test"), videos, strict=True)):
            # Separate seed streams per set and split: no scene is shared between them.
            info = write_dataset(root / name / split, classes=specs, videos_per_class=n,
                                 frames=s.frames, size=s.size, codec="vp9",
                                 seed=(seed, 1 + set_id, split_id), camera=s.camera,
                                 clutter=s.clutter, noise=s.noise, workers=workers,
                                 progress=progress)
            entry[split] = info["root"]
            entry["classes"], entry["kinds"], entry["groups"] = (
                info["classes"], info["kinds"], info["groups"])
        out[name] = entry
    return out
