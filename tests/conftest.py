"""Shared test matrix: devices and dtypes, the CUDA marker, and the real-world test videos."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import vidconv

HAS_CUDA = torch.cuda.is_available() and vidconv.build_info().has_cuda_kernels

# Every device-parametrised test also exists for CUDA; without a GPU it shows up as skipped.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Real-world files beside the project (see their README); absent in a user's fresh clone.
SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "videos"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    why = ("no CUDA device" if not torch.cuda.is_available()
           else "vidconv was built without CUDA kernels")
    skip = pytest.mark.skip(reason=f"needs CUDA: {why}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def session_conv_plan_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vidconv-cache")


@pytest.fixture(autouse=True)
def conv_plan_cache(session_conv_plan_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """st_conv3d's plan cache in a temporary directory (never the user's ~/.cache/vidconv), shared
    by the session so each layer shape is tuned once; no algorithm knob leaks in from the
    environment. tests/test_conv_plan.py gives each of its tests a fresh plan on top of this."""
    monkeypatch.setenv("VIDCONV_CACHE_DIR", str(session_conv_plan_cache))
    monkeypatch.delenv("VIDCONV_CONV_ALGO", raising=False)
    monkeypatch.delenv("VIDCONV_TUNE", raising=False)
    return session_conv_plan_cache


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def shared_videos() -> Path:
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"real-world test videos not present at {SHARED_VIDEOS}")
    return SHARED_VIDEOS


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): on CI's
    2 shared cores, two threads contend with the loader's decoding threads and make small
    networks several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_in_threads(work: Callable[[], object], count: int = 4) -> list[object]:
    """``work()`` in ``count`` threads started together; their results, in no set order.
    An exception in any thread is raised here, in the test's own thread."""
    results: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(work())
        except BaseException as exc:  # noqa: BLE001 - raised again by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
