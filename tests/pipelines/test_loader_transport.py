"""Batches through DataLoader workers (XSamProcessor + collate in the workers, the trainer's path) cross to
the main process through each worker's reused shared-memory arena (pipelines.loader.transport) and equal the
in-process batches: same keys, same tensors (dtype, shape, values), same order; a batch the consumer keeps is
never written over."""

from __future__ import annotations

import gc
import io

import pytest
import torch

from pipelines.build import mixture_weights
from pipelines.loader import MixtureLoader, transport

pytest.importorskip("xsam_model.builder")


@pytest.fixture(scope="module")
def demo_mix(demo_root, tmp_path_factory):
    """Demo sources of every kind of item mixed into stage 3: genseg, refseg, interactive regions, vgdseg with
    prompt pools (batch-time draws), reasoning, text-only (ADE20K's 150-category prompts exceed the debug
    processor's max_length)."""
    from pipelines.build.driver import build
    from pipelines.sources.base import BuildOptions

    out = tmp_path_factory.mktemp("transport_shards")
    sources = ["coco_panoptic", "coco_instance", "refcoco", "coco_interactive", "coco_vgd", "lisa_reasonseg"]
    res = build(
        str(demo_root),
        str(out),
        sources=sources + ["llava_instruct"],
        options=BuildOptions(samples_per_shard=8),
    )
    names = sorted({r.source for r in res if r.samples})
    mixture_weights.write(str(out), mixture_weights.compute(str(out), stages={3: names}))
    return str(out)


@pytest.fixture(scope="module")
def processor():
    from xsam_model.builder import build_processor

    return build_processor("debug")


def _loader(shards, processor, workers, **kw):
    return MixtureLoader(
        shards,
        stage=3,
        batch_size=2,
        seed=5,
        num_workers=workers,
        transform=processor,
        collate=processor.collate,
        **kw,
    )


def _batches(loader, n, keep=lambda k: True):
    out = []
    for k, b in enumerate(loader):
        out.append(b if keep(k) else None)
        if len(out) == n:
            return out
    raise AssertionError("loader ended early")


def assert_same(a, b, where="batch"):
    """Deep equality: tensors by dtype, shape and values; everything else by ==."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.timeout(300)
def test_two_workers_give_the_in_process_batches(demo_mix, processor):
    n = 24
    ref = _batches(_loader(demo_mix, processor, 0), n)
    got = _batches(_loader(demo_mix, processor, 2), n)
    assert {b.task for b in ref} >= {"genseg", "vgdseg"}  # masks, regions and batch-time prompt draws covered
    for r, g in zip(ref, got, strict=True):
        assert (g.step, g.micro_step, g.source, g.keys) == (r.step, r.micro_step, r.source, r.keys)
        assert_same(r.data, g.data, f"micro-step {r.micro_step}")


@pytest.mark.timeout(300)
def test_chunks_are_reused_and_a_kept_batch_is_never_written_over(demo_mix, processor):
    """Every third batch is kept to the end, the others dropped at once: the worker re-uses the dropped
    batches' chunks (a handful for 30 batches) and never the kept ones' (they still equal the reference)."""
    n = 30
    ref = _batches(_loader(demo_mix, processor, 0), n)
    loader, kept, chunks = _loader(demo_mix, processor, 1), [], set()
    for k, b in enumerate(loader):
        kept.append(b if k % 3 == 0 else None)
        del b
        gc.collect()
        chunks |= {(tok, i) for tok, m in transport._mapped.items() for i in m}
        if len(kept) == n:
            break
    assert 0 < len(chunks) <= n // 3 + 6  # one chunk per kept batch, a few in flight; not one per batch
    for r, g in zip(ref, kept, strict=True):
        if g is not None:
            assert_same(r.data, g.data, f"kept micro-step {r.micro_step}")


def test_arena_pack_unpack_and_release():
    """In one process: a packed batch unpacks to equal tensors viewing the chunk; its chunk is busy while any
    of them lives and free after, and the next batch re-uses it."""
    arena = transport.Arena(chunk_bytes=1 << 20)
    x = arena.empty((3, 4), torch.float32)
    x.copy_(torch.arange(12.0).view(3, 4))
    data = {
        "x": x,
        "row": x[1],
        "ids": torch.arange(5),
        "none": torch.zeros(0, 7),
        "task": "genseg",
        "l": [x.T],
    }
    batch = arena.pack(data).unpack()
    assert_same(data, batch)
    assert batch["l"][0].stride() == x.T.stride()
    # each tensor on a storage of its own (torch.save of a batch works, as with torch's own hand-off)
    assert batch["ids"].untyped_storage().nbytes() == 5 * 8
    torch.save(batch, io.BytesIO())
    (chunk,) = arena.chunks
    assert not chunk.free
    keep = batch["row"]
    del batch, data, x
    gc.collect()
    assert not chunk.free  # one view still alive
    del keep
    gc.collect()
    assert chunk.free
    arena.pack({"y": arena.empty((2,), torch.int64)})
    assert arena.created == 1


def test_the_pin_memory_thread_unpacks(monkeypatch):
    """The DataLoader's pin thread calls ``Packed.pin_memory`` on a worker's ``(meta, Packed)``: it gets the
    batch unpacked, every tensor pinned (pinning itself needs CUDA: here a copy stands in for it)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t.shape) or t.clone())
    arena = transport.Arena(chunk_bytes=1 << 20)
    x = arena.empty((2, 3), torch.float32)
    x.copy_(torch.ones(2, 3))
    data = {"x": x, "masks": [torch.arange(4, dtype=torch.uint8)], "task": "genseg"}
    meta, batch = pin_memory(({"micro_step": 0}, arena.pack(data)))
    assert meta == {"micro_step": 0}
    assert_same(data, batch)
    assert len(pinned) == 2
    del batch
    gc.collect()
    assert arena.chunks[0].free  # the unpacked views died once pinned copies were made


@pytest.mark.gpu
def test_pinned_batches_through_workers(demo_mix, processor):
    """With pin_memory (a GPU run) the pin thread unpacks: same batches, pinned."""
    ref = _batches(_loader(demo_mix, processor, 0), 6)
    got = _batches(_loader(demo_mix, processor, 2, pin_memory=True), 6)
    for r, g in zip(ref, got, strict=True):
        assert g.data["extra_pixel_values"].is_pinned()
        assert_same(r.data, g.data)
