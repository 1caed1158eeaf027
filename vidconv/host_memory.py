"""Huge pages for big CPU tensors, so that fresh tensors do not cost a page fault per 4 KiB.

Every training step on the CPU allocates the same big tensors afresh: the FC layers' weight
gradients (103 MB for multires fc1 at width 0.5), activations, the loader's normalised
batches. glibc serves blocks of 32 MiB and more (and, once its heap shrinks, smaller ones) with
a fresh ``mmap``, and the kernel then zero-fills them 4 KiB page by page on first touch. On the
2-core VM this project is developed on that cost 0.4-0.5 ms per MB: a fresh 64 MiB tensor took
16,384 page faults; writing a 103 MB weight gradient took 70-79 ms against 21-27 ms into memory
already mapped; the loader's ``crop_normalize`` spent most of its time faulting in its output.

PyTorch's CPU allocator can ask the kernel for transparent huge pages for tensors of 2 MiB and
more (``THP_MEM_ALLOC_ENABLE=1``, read once, at the process's first CPU tensor of any size):
one fault per 2 MiB. Measured there: the fresh 64 MiB tensor 553 faults instead of 16,384; the
103 MB gradient 32 ms instead of 79; allocating and filling 103 MB 12 ms instead of 54.
Memory is still given back to the kernel when freed.

:func:`use_huge_pages` turns that on for the process. It is process-wide and must come before
the first CPU tensor, so the library never calls it on import (which allocates none): the
``vidconv`` command and the benchmarks call it at start (``VIDCONV_HUGE_PAGES=0`` turns it off; a
``THP_MEM_ALLOC_ENABLE`` already in the environment is left as the user set it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "VIDCONV_HUGE_PAGES"
TORCH_ENV = "THP_MEM_ALLOC_ENABLE"
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_HUGE = 2 << 20
_PAGE = 4096


def use_huge_pages() -> str | None:
    """Ask PyTorch to back CPU tensors of 2 MiB and more with transparent huge pages.

    Returns:
        None when it is in effect in this process, else why not (a sentence): turned off by
        ``VIDCONV_HUGE_PAGES=0`` or ``THP_MEM_ALLOC_ENABLE=0``, not Linux, the kernel's
        transparent huge pages set to "never", or a CPU tensor was allocated before the call
        (PyTorch reads the setting once; the environment is then left as it was).
    """
    setting = os.environ.get(ENV, "1").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return f"turned off by {ENV}={os.environ[ENV]}"
    if not sys.platform.startswith("linux"):
        return f"needs Linux (this is {sys.platform})"
    mode = _kernel_mode()
    if mode == "never":
        return f"the kernel's transparent huge pages are off ({_THP_SETTING}: never)"
    before = os.environ.get(TORCH_ENV)
    if before is not None and before.strip() == "0":
        return f"turned off by {TORCH_ENV}=0"
    os.environ[TORCH_ENV] = "1"
    if not huge_pages_in_effect():
        if before is None:
            del os.environ[TORCH_ENV]  # not to change what child processes do either
        else:
            os.environ[TORCH_ENV] = before
        return ("too late: this process allocated a CPU tensor before the call, and PyTorch "
                f"reads {TORCH_ENV} once, at the first (call it first, or set {TORCH_ENV}=1 "
                "before starting Python)")
    return None


def huge_pages_in_effect() -> bool:
    """Whether PyTorch asks for huge pages for this process's big CPU tensors.

    It then starts each on a page boundary (to advise the kernel on whole pages), where glibc
    alone aligns to 64 bytes: three probe tensors of 2-4 MiB all page-aligned say so (by chance
    one in 64**3)."""
    import torch

    probes = [torch.empty(_HUGE + k * 4160, dtype=torch.uint8) for k in range(3)]
    return all(t.data_ptr() % _PAGE == 0 for t in probes)


def _kernel_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), None if unknown."""
    try:
        text = _THP_SETTING.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None
