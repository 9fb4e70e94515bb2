"""Length grouping within a step's source: a window sort of micro-batches by text length (issue 16 item 5).

X-SAM groups samples of similar length so a micro-batch pads little. Our loader draws one source per global
step (every micro-batch of a step comes from that dataset), so grouping happens inside one dataset's stream of
one consumer (rank × lane):

- A **group** is the next ``G·B`` usable samples of the consumer's stream from position ``p0`` (``G`` =
  ``length_group`` micro-batches, ``B`` = batch size), parsed and re-drawn but not yet transformed (only JSON and
  image bytes are held: a few MB). A group stops at the end of the slice's epoch (in whole micro-batches), so
  every pass over the slice still holds each sample once.
- They are sorted by :func:`text_length` (ties by stream order), cut into ``G`` micro-batches of ``B``, and the
  micro-batches are handed out in an order drawn from ``(seed, dataset, consumer, p0)``, so the k-th
  micro-batch of a group is not always its shortest.
- The loader state keeps ``p0`` and ``k`` (micro-batches of the group already handed out) per dataset and lane;
  a resumed run re-reads the group from ``p0`` — the same samples, the same sort — and continues at ``k``.
- A sample whose transform fails (corrupt image) is replaced by the nearest sample in the sorted group that
  transforms, so the micro-batch keeps ``B`` samples (the replacement is used twice; the skip is counted);
  a group with no sample that transforms is a :class:`LoaderError`.

``G = 1`` (or ``B = 1``) is the ungrouped stream of ``main``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.errors import LoaderError
from pipelines.schema import Sample

_TAG_GROUP = 3  # keeps the chunk-order stream apart from the loader's window/inner shuffles


def text_length(sample: Sample) -> int:
    """The sort key: characters of the conversation (a cheap proxy for its token count, read before any
    tokenizer runs; the image tokens are the same for every sample of a source)."""
    return sum(len(t.text) for t in sample.conversation)


def chunk_order(lengths: Sequence[int], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Indices of ``len(lengths)`` samples → micro-batches of ``batch_size`` (the last may be shorter), each
    holding neighbours in length order; the micro-batches in a random order drawn from ``rng``."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [chunks[int(j)] for j in rng.permutation(len(chunks))]


@dataclass
class Group:
    """One consumer's current group of a dataset: start and end positions, the prepared samples (sorted
    order is ``chunks``)."""

    start: int
    stop: int
    prepared: list[tuple[Sample, bytes | None, str]]  # (sample, image bytes, key) in stream order
    chunks: list[list[int]]


def collect(
    start: int,
    count: int,
    prepare: Callable[[int], tuple[Sample, bytes | None, str] | None],
    max_bad: int,
    name: str,
) -> tuple[list[tuple[Sample, bytes | None, str]], int]:
    """The next ``count`` usable prepared samples from stream position ``start``; returns them and the
    position after the last one. ``max_bad`` unusable samples in a row is a :class:`LoaderError`."""
    out, bad, position = [], 0, start
    while len(out) < count:
        got = prepare(position)
        position += 1
        if got is None:
            bad += 1
            if bad >= max_bad:
                raise LoaderError(
                    f"{name}: no usable sample in {bad} consecutive positions from {position - bad}"
                )
            continue
        bad = 0
        out.append(got)
    return out, position


def fill(
    group: Group,
    k: int,
    transform: Callable[[Sample, bytes | None, str], Any | None],
    name: str,
) -> list[Any]:
    """Transformed items of the group's ``k``-th micro-batch; a failed transform is replaced by the nearest
    sample (in sorted order) of the group that transforms."""
    sorted_all = sorted(range(len(group.prepared)), key=lambda i: (text_length(group.prepared[i][0]), i))
    rank_of = {i: r for r, i in enumerate(sorted_all)}
    items, missing = [], 0
    for i in group.chunks[k]:
        item = transform(*group.prepared[i])
        if item is None:
            missing += 1
        else:
            items.append(item)
    if missing:
        members = set(group.chunks[k])
        centre = rank_of[group.chunks[k][0]]
        by_distance = sorted(
            (r for r in range(len(sorted_all)) if sorted_all[r] not in members),
            key=lambda r: (abs(r - centre), r),
        )
        for r in by_distance:
            if missing == 0:
                break
            item = transform(*group.prepared[sorted_all[r]])
            if item is not None:
                items.append(item)
                missing -= 1
        if missing:
            raise LoaderError(f"{name}: no sample of a length group from position {group.start} transforms")
    return items


def take(stream: Any, cur: Any, position: int, k: int, stats: dict) -> tuple[list[Any], int, int]:
    """The ``k``-th micro-batch of the group that starts at ``position`` of cursor ``cur`` (a
    ``pipelines.loader.stream._Cursor``) of ``stream`` (a ``MixtureStream``); returns ``(items, position,
    k)`` for the next call: the same ``position`` and ``k + 1`` inside the group, the group's end and 0 after
    its last micro-batch."""
    group = getattr(cur, "group", None)
    if group is None or group.start != position:
        # re-built mid-group only on a resume: its skips were counted before the checkpoint
        count_in = stats if k == 0 else copy.deepcopy(stats)

        def prepare(p: int):
            raw = cur.get(p)
            sample = stream.prepare(raw, cur.d, count_in, p // cur.length)
            return None if sample is None else (sample, raw.image, raw.key)

        # a group ends with the slice's epoch (as far as whole micro-batches allow), so a pass over the slice
        # still holds each sample once
        b = stream.batch_size
        left = cur.length - position % cur.length
        prepared, stop = collect(
            position,
            max(b, min(stream.length_group * b, left // b * b)),
            prepare,
            cur.length + stream.batch_size,
            cur.d.name,
        )
        rng = np.random.default_rng([stream.seed & 0xFFFFFFFF, _TAG_GROUP, cur.tag, cur.consumer, position])
        chunks = chunk_order([text_length(s) for s, _, _ in prepared], stream.batch_size, rng)
        group = cur.group = Group(position, stop, prepared, chunks)
    items = fill(group, k, lambda s, img, key: stream.transform_one(s, img, key, stats), cur.d.name)
    stats["samples"] += len(items)
    if k + 1 < len(group.chunks):
        return items, position, k + 1
    cur.group = None
    return items, group.stop, 0
