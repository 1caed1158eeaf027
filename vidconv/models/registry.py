"""The model registry: each architecture file registers its layer table here."""

from __future__ import annotations

from dataclasses import dataclass

from vidconv.models.tower import ConvLayer

# The paper's two fully connected layers (FC(4096)-FC(4096)) before the classifier.
FC_UNITS = (4096, 4096)


@dataclass(frozen=True)
class Architecture:
    """A network of the paper: the frames it reads and its tower's layer table.

    frame_offsets: which frames of the clip the network sees (see vidconv.clip.ClipSpec).
    layers: the tower, conv1 ... conv5, at full width and full resolution. The multires
        variant is derived from it (last pooling removed, two 89x89 streams).
    summary: one line for listings.
    """

    name: str
    frame_offsets: tuple[int, ...]
    layers: tuple[ConvLayer, ...]
    summary: str
    fc_units: tuple[int, int] = FC_UNITS


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.name in _REGISTRY:
        raise ValueError(f"model {arch.name!r} is already registered")
    _REGISTRY[arch.name] = arch
    return arch


def list_models() -> list[str]:
    """Registered model names, in the paper's order."""
    return list(_REGISTRY)


def get_architecture(name: str) -> Architecture:
    """The layer table registered under `name`; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model name {name!r}; known models: {', '.join(list_models())}"
        ) from None
