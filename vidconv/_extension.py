"""Loading the compiled extension and saying how it was built."""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    from vidconv import _C
except ImportError as err:  # pragma: no cover - only on a broken install
    raise ImportError(
        "vidconv's compiled extension (vidconv._C) could not be loaded. Build it with "
        "`pip install --no-build-isolation .` against the torch you run with "
        f"(torch {torch.__version__}). Original error: {err}"
    ) from err


@dataclass(frozen=True)
class BuildInfo:
    """How vidconv._C was built."""

    cuda: str | None
    """CUDA version of the kernels ("13.0"), or None for a CPU-only build."""
    archs: tuple[str, ...]
    """CUDA targets compiled in (e.g. ("8.0", "9.0a")); empty for a CPU-only build."""
    torch_cuda: str | None
    """CUDA version of the torch in use."""

    @property
    def has_cuda_kernels(self) -> bool:
        return self.cuda is not None


def _cuda_string(version: int | None) -> str | None:
    if version is None:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


def build_info() -> BuildInfo:
    """Return how the extension was built: its CUDA version and targets, beside torch's."""
    archs = tuple(a for a in str(_C.cuda_archs).replace(",", ";").split(";") if a)
    return BuildInfo(cuda=_cuda_string(_C.cuda_version()), archs=archs,
                     torch_cuda=torch.version.cuda)


def _check_cuda_match() -> None:
    info = build_info()
    if info.cuda is None or info.torch_cuda is None:
        return
    if info.cuda.split(".")[0] != info.torch_cuda.split(".")[0]:
        raise ImportError(
            f"vidconv was built with CUDA {info.cuda} but torch uses CUDA {info.torch_cuda}; "
            "rebuild vidconv with `pip install --no-build-isolation --force-reinstall .`"
        )


_check_cuda_match()
