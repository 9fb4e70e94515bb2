"""Length grouping within a step's source, world-size-free (X-SAM's length grouping).

X-SAM groups samples of similar length so a micro-batch pads little. Our loader draws one dataset per global
step and takes the next ``G`` positions (``G`` = global batch) of that dataset's global stream
(:mod:`pipelines.loader.order`); grouping permutes positions inside a group of global batches, with nothing
in it that depends on the ranks, DataLoader workers or the micro-batch × accumulation split:

- A **group** is ``L`` (``length_group``) consecutive global batches of a dataset's stream, counted from
  the first global batch that starts in each epoch ``e`` of the stream, ``T_e = ceil(e·N / G)`` (``N``
  samples): group ``k`` of epoch ``e`` is global batches ``[T_e + k·L, min(T_e + (k+1)·L, T_{e+1}))``, so a
  group never mixes two epochs beyond the one global batch that straddles an epoch end.
- Every position is resolved at the JSON level (the stream's sample, or the replacement drawn for it when it
  is unreadable, filtered or lacks its image — :meth:`pipelines.loader.order.WindowOrder.candidate`), re-drawn
  for its epoch, and measured with :func:`text_length`.
- The group's positions are sorted by ``(length, position)``, cut into ``L`` global batches of ``G`` in
  sorted order, and the global batches handed out in an order drawn from ``(seed, dataset, e, k)``: the
  group's ``i``-th global batch is chunk ``i`` of that order. Inside it the length order is kept, so
  micro-batch ``j`` (``j = a·W + r``) gets ``B`` neighbours in length.

Cost: every rank — and every DataLoader worker that serves one of the group's micro-batches — needs the
lengths of the whole group, so it reads all ``L·G`` samples of each group it serves (a global batch of them at
a time, one ranged read per run of consecutive stored samples), checks each against the sha256 in its shard's
member index *before* parsing its JSON, and re-draws them. The sha256 covers JSON and image, so the image
bytes are read too (and dropped at once: at most ``G`` samples' bytes are held). A rank trains on ``L·G / W``
of those samples, so it reads ``W`` samples (up to ``W ×`` its workers) per sample it trains on — e.g.
``G = 64``, ``L = 8`` on 8 ranks: 512 sample reads per group for 64 samples trained on. Only positions,
lengths and attempt numbers are kept (a few ints per position). A changed member is a ``digest_mismatch``
failure at measuring time, the same on every rank, and the position takes its replacement as any unusable
one does; bytes that do not match their digest are never parsed (a crafted member cannot crash a rank).

``L = 1`` (or ``G = 1``) is the ungrouped stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipelines.loader.order import rng
from pipelines.schema import Sample

_TAG_GROUP = 3  # keeps the chunk-order stream apart from the order's window/inner/replacement draws


def text_length(sample: Sample) -> int:
    """The sort key: characters of the conversation (a cheap proxy for its token count, read before any
    tokenizer runs; the image tokens are the same for every sample of a source)."""
    return sum(len(t.text) for t in sample.conversation)


def chunk_order(lengths: Sequence[int], size: int, gen: np.random.Generator) -> list[list[int]]:
    """Indices of ``len(lengths)`` items → chunks of ``size`` (the last may be shorter), each holding
    neighbours in ``(length, index)`` order and kept in that order; the chunks in an order drawn from
    ``gen``."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    return [chunks[int(j)] for j in gen.permutation(len(chunks))]


@dataclass
class Resolved:
    """A position resolved at the JSON level: the first attempt that parsed and passed the checks, and the
    failures (``(kind, reason, key, detail)``) of the attempts before it — counted by the rank that trains on
    the position, not by every rank that only measured it."""

    attempt: int
    length: int
    failures: list[tuple[str, str, str | None, str]] = field(default_factory=list)


@dataclass
class _Group:
    key: tuple[int, int]  # (epoch, group within the epoch)
    first: int  # its first global batch
    chunks: list[list[int]]  # stream positions of each global batch of the group, in hand-out order
    resolved: dict[int, Resolved]


class LengthGroups:
    """One process's length groups, the current one per dataset (``resolve`` measures positions)."""

    def __init__(self, seed: int, global_batch: int, length_group: int):
        self.seed, self.global_batch, self.length_group = int(seed), int(global_batch), int(length_group)
        self._groups: dict[str, _Group] = {}

    def bounds(self, n: int, t: int) -> tuple[int, int, int]:
        """``(epoch, group, its first global batch, one past its last)`` for global batch ``t`` of
        a dataset of ``n`` samples — groups restart with each epoch of the stream (see the module doc)."""
        g, size = self.global_batch, self.length_group
        epoch = t * g // n
        first_of_epoch = -(-epoch * n // g)  # T_e: the first global batch starting inside epoch e
        end_of_epoch = -(-(epoch + 1) * n // g)
        k = (t - first_of_epoch) // size
        lo = first_of_epoch + k * size
        return epoch, k, lo, min(lo + size, end_of_epoch)

    def global_batch_positions(
        self, name: str, tag: int, n: int, t: int, resolve: Callable[[list[int]], list[Resolved]]
    ) -> tuple[list[int], dict[int, Resolved]]:
        """The stream positions of global batch ``t`` of dataset ``name`` (``n`` samples), in length order,
        and how each was resolved; ``resolve`` measures a list of positions at the JSON level."""
        epoch, k, lo, hi = self.bounds(n, t)
        group = self._groups.get(name)
        if group is None or group.key != (epoch, k):
            self._groups.pop(name, None)  # at most one group per dataset held
            g = self.global_batch
            positions = list(range(lo * g, hi * g))
            resolved = resolve(positions)
            chunks = chunk_order([r.length for r in resolved], g, rng(self.seed, _TAG_GROUP, tag, epoch, k))
            group = _Group(
                (epoch, k),
                lo,
                [[positions[i] for i in c] for c in chunks],
                dict(zip(positions, resolved, strict=True)),
            )
            self._groups[name] = group
        chunk = group.chunks[t - group.first]
        return chunk, {p: group.resolved[p] for p in chunk}
