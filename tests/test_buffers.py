"""BufferPool (CPU batch memory written again once nobody holds it) and the loader using it:
a batch anyone still refers to, in any form, is never written again."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_in_threads

from vidconv.clip import ClipSpec
from vidconv.data import ClipLoader
from vidconv.data.buffers import BufferPool
from vidconv.data.prepare import prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")
synthetic = pytest.importorskip("vidconv.data.synthetic")

SHAPE = (2, 3, 4)


def test_a_released_buffer_is_handed_out_again() -> None:
    pool = BufferPool(4)
    a = pool.take(SHAPE, torch.float32)
    b = pool.take(SHAPE, torch.float32)
    assert a.data_ptr() != b.data_ptr()
    where = a.data_ptr()
    del a
    c = pool.take(SHAPE, torch.float32)
    assert c.data_ptr() == where and c.shape == SHAPE and c.dtype == torch.float32
    assert (pool.reused, pool.allocated, len(pool)) == (1, 2, 2)


@pytest.mark.parametrize("hold", ["view", "numpy", "alias", "saved_for_backward", "dlpack",
                                  "storage", "typed_storage"])
def test_a_buffer_anyone_still_refers_to_is_not_handed_out(hold: str) -> None:
    pool = BufferPool(4)
    a = pool.take(SHAPE, torch.float32)
    where = a.data_ptr()
    weight = torch.ones(SHAPE, requires_grad=True)
    if hold == "view":
        keep: object = a[0]
    elif hold == "numpy":
        keep = a.numpy()
    elif hold == "alias":
        keep = a.view(-1)
    elif hold == "saved_for_backward":
        keep = (a * weight).sum()  # mul saves a for weight's gradient
    elif hold == "dlpack":
        keep = torch.utils.dlpack.to_dlpack(a)
    elif hold == "storage":
        keep = a.untyped_storage()  # the object the pool itself holds: its count tells
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is deprecated, not gone
            keep = a.storage()
    del a
    b = pool.take(SHAPE, torch.float32)
    assert b.data_ptr() != where
    del b, keep
    assert pool.take(SHAPE, torch.float32).data_ptr() == where


def test_shape_dtype_and_layout_must_match() -> None:
    pool = BufferPool(4)
    a = pool.take((2, 3, 4, 5, 6), torch.float32)
    where = a.data_ptr()
    del a
    for shape, dtype, fmt in [((2, 3, 4, 5, 7), torch.float32, torch.contiguous_format),
                              ((2, 3, 4, 5, 6), torch.float16, torch.contiguous_format),
                              ((2, 3, 4, 5, 6), torch.float32, torch.channels_last_3d)]:
        b = pool.take(shape, dtype, fmt)
        assert b.data_ptr() != where and b.shape == shape and b.dtype == dtype
        assert b.is_contiguous(memory_format=fmt)
    c = pool.take((2, 3, 4, 5, 6), torch.float32)
    assert c.data_ptr() == where


def test_memory_sent_to_another_process_leaves_the_pool() -> None:
    pool = BufferPool(4)
    a = pool.take(SHAPE, torch.float32)
    a.share_memory_()
    where = a.data_ptr()
    del a
    assert pool.take(SHAPE, torch.float32).data_ptr() != where
    assert len(pool) == 1


def test_a_resized_storage_leaves_the_pool() -> None:
    pool = BufferPool(4)
    a = pool.take((1000,), torch.float32)
    a.untyped_storage().resize_(16)  # the user freed the memory
    del a
    b = pool.take((1000,), torch.float32)
    assert b.untyped_storage().nbytes() == 4000 and len(pool) == 1


def test_buffers_are_plain_cpu_tensors_whatever_the_callers_mode() -> None:
    pool = BufferPool(4)
    with torch.inference_mode():
        a = pool.take(SHAPE, torch.float32)
    assert not a.is_inference()
    del a
    b = pool.take(SHAPE, torch.float32)  # reused outside inference mode: usable by autograd
    (b * torch.ones(SHAPE, requires_grad=True)).sum().backward()
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        assert pool.take((7,), torch.float32).device.type == "cpu"
    finally:
        torch.set_default_device(previous)


def test_capacity_bounds_what_is_kept() -> None:
    pool = BufferPool(2)
    held = [pool.take(SHAPE, torch.float32) for _ in range(5)]
    assert len(pool) == 2 and pool.allocated == 5
    del held
    # Full of free buffers of another shape: one makes room for the new shape.
    a = pool.take((7,), torch.float32)
    assert len(pool) == 2
    where = a.data_ptr()
    del a
    assert pool.take((7,), torch.float32).data_ptr() == where
    never = BufferPool(0)
    b = never.take(SHAPE, torch.float32)
    where = b.data_ptr()
    del b
    assert len(never) == 0 and never.reused == 0


def test_bad_capacity() -> None:
    with pytest.raises(ValueError, match="capacity must be an int >= 0, got -1"):
        BufferPool(-1)


def test_threads_never_share_a_live_buffer() -> None:
    pool = BufferPool(6)
    ids = iter(range(1000))

    def work() -> list[str]:
        k, errors = next(ids), []
        for i in range(300):
            t = pool.take(SHAPE, torch.int64)
            t.fill_(k)
            if i % 7 == 0:
                time.sleep(0)  # let another thread run while this one holds the buffer
            if not bool((t == k).all()):
                errors.append(f"thread {k}: buffer changed while held")
            del t
        return errors

    assert run_in_threads(work) == [[]] * 4 and pool.reused > 0


# ---- the loader -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("buffers")
    videos = root / "videos"
    synthetic.write_dataset(videos, classes=2, videos_per_class=3, frames=16, size=48, seed=3,
                            workers=1)
    prepare(videos, root / "prepared", workers=1, quality=90, frame_size=178)
    return {"videos": videos, "prepared": root / "prepared"}


def _spec(multires: bool) -> ClipSpec:
    return ClipSpec((0, 2, 4), 89 if multires else 170, multires=multires, frame_size=178)


def _tensors(inputs: object) -> list[torch.Tensor]:
    return list(inputs) if isinstance(inputs, tuple) else [inputs]  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["videos", "prepared"])
@pytest.mark.parametrize("multires", [False, True], ids=["full", "multires"])
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_reuses_released_batches_and_keeps_held_ones(sources: dict[str, Path], kind: str,
                                                            multires: bool,
                                                            workers: int) -> None:
    spec = _spec(multires)
    fresh = ClipLoader(sources[kind], spec, batch_size=2, seed=1, num_workers=workers,
                       cache_bytes=0, reuse_buffers=False)
    want = [[t.clone() for t in _tensors(b.inputs)] for e in range(3)
            for _ in [fresh.set_epoch(e)] for b in fresh]
    loader = ClipLoader(sources[kind], spec, batch_size=2, seed=1, num_workers=workers,
                        cache_bytes=0)
    # Released as a training loop does: each batch dropped when the next arrives.
    got = []
    for e in range(3):
        loader.set_epoch(e)
        for b in loader:
            got.append([t.clone() for t in _tensors(b.inputs)])
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(g, w, strict=True))
    pool = loader._buffers
    assert pool is not None and pool.reused > 0
    # Held: every batch kept (and one only as a view) stays as it was made.
    loader.set_epoch(0)
    held = [(_tensors(b.inputs)[0][:1], [t.clone() for t in _tensors(b.inputs)]) for b in loader]
    for view, copies in held:
        assert torch.equal(view, copies[0][:1])


def test_loader_without_reuse_or_on_cuda_has_no_pool(sources: dict[str, Path]) -> None:
    assert ClipLoader(sources["videos"], _spec(False), reuse_buffers=False)._buffers is None
    assert ClipLoader(sources["videos"], _spec(False))._buffers is not None
