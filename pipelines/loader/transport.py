"""Worker → main hand-off of collated batches through shared memory that each worker reuses.

torch's DataLoader moves every tensor of a worker's batch through a shared-memory file of its own: the worker
creates and zero-fills fresh pages for each tensor of each batch (~30 MB a sample at SAM 1024: the image,
every mask), one file descriptor per tensor crosses a socket, and the main process unmaps and frees the pages
when the batch dies. Measured on ``bench/loader.py --small`` that cost more than making the sample (a worker
fed 0.4x the samples per CPU-second of the same processor in process).

Here each worker keeps an :class:`Arena` of shared-memory chunks. While a micro-batch is built,
``XSamProcessor`` allocates its large tensors in the arena (:func:`current`), and :meth:`Arena.pack` copies
the batch's other tensors (token ids, labels: a few KB) in, so a batch crosses the process boundary as
:class:`Packed`: the tree of the batch with each tensor replaced by (chunk, byte offset, dtype, shape,
stride); a chunk's file descriptor crosses once, the first time the chunk is used. The main process
(:meth:`Packed.unpack`) rebuilds the same tensors as views of its own mapping of the chunks. A chunk's first
byte says whether the main process may still read it: the worker sets it when the chunk leaves, the main
process clears it when the last tensor viewing that batch's part of it dies (a ``weakref.finalize`` on the
array its views share), and the worker re-uses only cleared chunks — a batch the consumer keeps is never
written over; if none is free, the worker makes a new chunk.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data._utils.pin_memory import pin_memory

CHUNK_BYTES = 64 << 20  # the largest chunk made for small tensors (a batch of 4 at SAM 1024 fills about two)
KEEP_IDLE_BYTES = 1 << 30  # idle chunks a worker keeps for reuse beyond this are given back
_HEADER = 64  # byte 0: 1 while the main process may read the chunk; allocations start after it
_ALIGN = 64

_active: Arena | None = None  # the arena of this DataLoader worker (None elsewhere)


def current() -> Arena | None:
    """The arena a batch being built in this process should allocate from (None outside a worker lane)."""
    return _active


def activate(arena: Arena | None) -> None:
    global _active
    _active = arena


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _mib(n: int) -> int:
    return -(-n // (1 << 20)) * (1 << 20)


@dataclass(eq=False)  # identity: `in` must not compare tensors
class _Chunk:
    id: int
    flat: torch.Tensor  # uint8, shared memory
    top: int = _HEADER  # next free byte while the chunk serves the batch being built
    sent: bool = False  # the main process holds its descriptor

    @property
    def free(self) -> bool:
        return int(self.flat[0]) == 0


@dataclass(frozen=True)
class _Ref:
    """A tensor of a packed batch: ``shape``/``stride`` (elements) of ``dtype`` at ``offset`` bytes in
    ``chunk``."""

    chunk: int
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _Empty:
    dtype: torch.dtype
    shape: tuple[int, ...]


class Arena:
    """One worker's reusable shared-memory chunks (bump allocation per batch)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, keep_idle_bytes: int = KEEP_IDLE_BYTES):
        self.chunk_bytes, self.keep_idle_bytes = chunk_bytes, keep_idle_bytes
        self.token = f"{os.getpid()}-{os.urandom(4).hex()}"  # names this worker's chunks in the main process
        self.chunks: list[_Chunk] = []
        self.batch: list[_Chunk] = []  # the chunks of the batch being built
        self.dropped: list[int] = []  # chunks given back since the last batch (the main process unmaps them)
        self.created = 0
        self.batch_bytes = 0  # the largest batch so far: new chunks hold one (up to chunk_bytes)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor in this batch's chunks."""
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        c = self._room(n)
        off, c.top = c.top, _align(c.top + n)
        return c.flat[off : off + n].view(dtype).view(shape)

    def _room(self, n: int) -> _Chunk:
        for c in self.batch:
            if c.top + n <= c.flat.numel():
                return c
        idle = [c for c in self.chunks if c not in self.batch and c.free]
        fits = [c for c in idle if _HEADER + n <= c.flat.numel()]
        if fits:
            c = min(fits, key=lambda c: c.flat.numel())
        else:
            # shared memory is zero-filled when made: a small model's batches get small chunks
            size = max(_mib(_HEADER + n), min(self.chunk_bytes, _mib(self.batch_bytes)))
            storage = torch.UntypedStorage._new_shared(size)
            c = _Chunk(self.created, torch.empty(0, dtype=torch.uint8).set_(storage))
            self.created += 1
            self.chunks.append(c)
        c.top = _HEADER
        self.batch.append(c)
        return c

    def pack(self, data: Any) -> Packed:
        """``data`` (dicts, lists, tuples of tensors and plain values) as a :class:`Packed` batch; ends the
        batch."""
        tree = self._pack(data)
        self.batch_bytes = max(self.batch_bytes, sum(c.top for c in self.batch))
        new = {}
        for c in self.batch:
            if not c.sent:
                new[c.id], c.sent = c.flat, True
            c.flat[0] = 1  # the main process may read it until its views of this batch die
        packed = Packed(self.token, new, [c.id for c in self.batch], self.dropped, tree)
        self.batch, self.dropped = [], []
        self._trim()
        return packed

    def _pack(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.layout == torch.strided:
            return self._ref(x)
        if type(x) is dict:
            return {k: self._pack(v) for k, v in x.items()}
        if type(x) in (list, tuple):
            return type(x)(self._pack(v) for v in x)
        return x  # str, numbers, other objects (and any other kind of tensor): pickled as they are

    def _ref(self, t: torch.Tensor) -> _Ref | _Empty:
        if t.numel() == 0:
            return _Empty(t.dtype, tuple(t.shape))
        ptr = t.untyped_storage().data_ptr()
        owner = next((c for c in self.batch if c.flat.data_ptr() == ptr), None)
        if owner is None:  # made outside the arena (token ids, labels): copied in
            dst = self.empty(tuple(t.shape), t.dtype)
            dst.copy_(t)
            return self._ref(dst)
        off = t.data_ptr() - owner.flat.data_ptr()
        return _Ref(owner.id, off, t.dtype, tuple(t.shape), tuple(t.stride()))

    def _trim(self) -> None:
        """Give back idle chunks beyond ``keep_idle_bytes`` (largest first)."""
        idle = sorted((c for c in self.chunks if c.free), key=lambda c: -c.flat.numel())
        extra = sum(c.flat.numel() for c in idle) - self.keep_idle_bytes
        for c in idle:
            if extra <= 0:
                break
            extra -= c.flat.numel()
            self.chunks.remove(c)
            if c.sent:
                self.dropped.append(c.id)


# ---------------------------------------------------------------------------------------------- main process
_mapped: dict[str, dict[int, torch.Tensor]] = {}  # token → chunk id → this process's mapping of the chunk
_lock = threading.Lock()  # unpack may run in the DataLoader's pin-memory thread


@dataclass
class Packed:
    """A worker's batch on its way to the main process (see the module docstring)."""

    token: str
    new: dict[int, torch.Tensor]  # chunks sent for the first time (their descriptors cross with them)
    used: list[int]
    dropped: list[int]
    tree: Any = field(repr=False)

    def unpack(self) -> Any:
        """The batch as the worker's collate returned it (same tensors, values, dtypes, shapes, strides)."""
        with _lock:
            chunks = _mapped.setdefault(self.token, {})
            chunks.update(self.new)
            for i in self.dropped:
                chunks.pop(i, None)
            used = {i: chunks[i] for i in self.used}
        views = {i: _batch_view(flat) for i, flat in used.items()}
        return _unpack(self.tree, views)

    def pin_memory(self) -> Any:
        """What the DataLoader's pin-memory thread calls: unpack, then pin as it pins any batch."""
        return pin_memory(self.unpack())


def forget(token: str) -> None:
    """Drop this process's mappings of a finished worker's chunks (batches still alive keep theirs)."""
    with _lock:
        _mapped.pop(token, None)


def _release(flat: torch.Tensor) -> None:
    flat[0] = 0


def _batch_view(flat: torch.Tensor) -> np.ndarray:
    """This batch's view of a chunk: a fresh array over the mapping, whose death (the last tensor of the batch
    in that chunk gone: each holds a slice of it) clears the chunk's in-use byte for the worker."""
    arr = flat.numpy()
    weakref.finalize(arr, _release, flat).atexit = False  # nothing to tell a worker at interpreter exit
    return arr


def _unpack(x: Any, views: dict[int, np.ndarray]) -> Any:
    if isinstance(x, _Ref):
        # a storage of its own over its bytes, as a tensor that came through torch's own hand-off has (so
        # torch.save of a batch, or a tensor's untyped_storage(), sees that tensor alone, not the chunk)
        itemsize = torch.empty(0, dtype=x.dtype).element_size()
        span = (1 + sum((n - 1) * s for n, s in zip(x.shape, x.stride, strict=True))) * itemsize
        own = torch.from_numpy(views[x.chunk][x.offset : x.offset + span])
        return own.view(x.dtype).as_strided(x.shape, x.stride)
    if isinstance(x, _Empty):
        return torch.empty(x.shape, dtype=x.dtype)
    if type(x) is dict:
        return {k: _unpack(v, views) for k, v in x.items()}
    if type(x) in (list, tuple):
        return type(x)(_unpack(v, views) for v in x)
    return x
