"""The torch glue: a :class:`MixtureStream` served by ``torch.utils.data.DataLoader`` worker processes.

Micro-step ``m`` is served by worker lane ``m % L`` (``L`` = workers); PyTorch hands out worker results
round-robin, so the batches come back in micro-step order. Each worker's batches cross to this process through
its reused shared-memory arena (:mod:`pipelines.loader.transport`), not one new shared file per tensor. This
module imports torch (and OpenCV) at the top; the loader imports it only when it starts workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cv2
import torch.utils.data

from pipelines.errors import LoaderError
from pipelines.loader import transport
from pipelines.loader.stream import MixtureStream


class LaneDataset(torch.utils.data.IterableDataset):
    """Worker ``w`` of an iteration starting at micro-step ``m0`` serves lane ``(m0 + w) % L``."""

    def __init__(self, stream: MixtureStream, start: int):
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[tuple[dict, Any]]:
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        if n != self.stream.lanes:
            raise LoaderError(f"DataLoader has {n} workers but the stream was built for {self.stream.lanes}")
        arena = transport.Arena() if info else None
        transport.activate(arena)
        try:
            for meta, data in self.stream.iter_lane((self.start + w) % n, self.start + w):
                if arena is not None:
                    meta, data = {**meta, "arena": arena.token}, arena.pack(data)
                yield meta, data
        except LoaderError as e:  # handed over as an item: PyTorch would glue a traceback to the line
            yield {"error": str(e)}, None


def _passthrough(x):
    return x


def worker_batches(
    stream: MixtureStream,
    start: int,
    num_workers: int,
    opencv_threads: int | None,
    dataloader_kwargs: dict,
) -> Iterator[tuple[dict, Any]]:
    """``(meta, collated batch)`` of micro-steps ``start, start + 1, …`` from ``num_workers`` workers."""
    if opencv_threads is not None:
        # one core per worker: OpenCV's own pool would oversubscribe. It must be set here, before the fork —
        # cv2.setNumThreads inside a forked worker deadlocks on the parent's pool state.
        cv2.setNumThreads(opencv_threads)
    loader = torch.utils.data.DataLoader(
        LaneDataset(stream, start),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_passthrough,
        persistent_workers=False,
        **dataloader_kwargs,
    )
    return _unpacked(loader)


def _unpacked(loader: torch.utils.data.DataLoader, forget=transport.forget) -> Iterator[tuple[dict, Any]]:
    """The workers' ``(meta, Packed)`` as ``(meta, batch)`` (the pin-memory thread may have unpacked already);
    this process's mappings of a worker's chunks are dropped when the iteration ends (``forget`` is bound
    early: a generator closed at interpreter exit may find the module's globals gone)."""
    tokens: set[str] = set()
    try:
        for meta, data in loader:
            if "arena" in meta:
                tokens.add(meta["arena"])
            yield meta, data.unpack() if isinstance(data, transport.Packed) else data
    finally:
        for token in tokens:
            forget(token)
