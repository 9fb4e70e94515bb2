"""Memory-bounded indexing of COCO-style JSON (``images`` / ``annotations`` / ``categories``).

``pycocotools.COCO()`` / ``lvis.LVIS()`` load the whole file and build Python objects for every annotation
(≈3 GB for a 450 MB LVIS-scale file). Here the file is read **once** by
:mod:`pipelines.sources.readers.json_scan`, whatever the order of its top-level keys (LVIS puts ``images``
last), and nothing but ids and byte offsets is kept:

1. scan: categories are parsed (small); for every image its id, and for every annotation its image id, id,
   category id and the byte span of its JSON text in the file go into compact int64 columns (40 bytes per
   annotation, nothing parsed);
2. group: once every image id is known, images are ranked in key order and one stable numpy argsort lists
   each image's annotations together (file order within an image);
3. emit: records are yielded in key order; image entries, and annotations when the caller wants them parsed,
   are read back from the file through a memory map whose pages are released after each block of images.

So a process holds the id columns and one block, never the file. With ``raw=True`` the caller gets
:class:`RawAnns` (ids + byte spans) instead of parsed annotations and can leave reading and parsing to the
conversion workers (LVIS: the driver never builds a float nor copies a polygon). Used by the COCO, LVIS,
ADE20K (Mask2Former files), VGD and GCG sources.
"""

from __future__ import annotations

import json
import mmap
import os
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from pipelines.sources.base import Shared, Skip
from pipelines.sources.readers.json_scan import ANNOTATION, WITH_ID, Batch, iter_arrays, loads

IMAGE_BLOCK = 1000  # images read back per step; bounds the mapped pages resident at once
NO_INT = -(2**63)  # "not an int" in the int64 id columns (the annotation text still has the value)


class RawAnns(NamedTuple):
    """One image's annotations, unparsed, column by column: ids and category ids (None where not an int),
    and the byte offset and length of each annotation's JSON text in the annotation file."""

    ids: list
    category_ids: list
    offsets: list[int]
    lengths: list[int]


def read_spans(path: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes at each ``(offset, length)`` of a file: annotations' JSON texts, read back by a worker."""
    with open(path, "rb") as f:
        fd = f.fileno()
        return [os.pread(fd, length, offset) for offset, length in spans]


def image_sort_id(image_id: Any) -> str:
    """Key id for an image id: ints zero-padded to 12 digits (COCO file names) so string order is numeric."""
    if isinstance(image_id, int) or (isinstance(image_id, float) and image_id.is_integer()):
        return f"{int(image_id):012d}"
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in str(image_id))


def _id_value(text: bytes | None) -> Any:
    """A captured id: ``b'12'`` -> 12, ``b'"a"'`` -> "a", None -> None."""
    if not text:
        return None
    if text[0] in b"-0123456789":
        try:
            return int(text)
        except ValueError:
            pass
    return json.loads(text)


class _Scan:
    """What one pass over the file leaves behind: the category list and compact id/offset columns."""

    def __init__(self):
        self.ids: list = []  # image ids, file order, first occurrence only
        self.img_off, self.img_len = array("q"), array("q")  # where each image entry is in the file
        self.slots: dict[Any, int] = {}  # image id as written in annotations -> slot number
        # per annotation: image slot, id, category id (NO_INT where not an int), offset and length of its text
        self.ann_slot, self.ann_id, self.ann_cat, self.ann_off, self.ann_len = (array("q") for _ in range(5))
        self.categories: list[dict] = []


def _ints(values: list) -> list[int]:
    """Captured ints; :data:`NO_INT` where there was none (missing, a float, a string)."""
    try:
        return list(map(int, values))  # the common case, in C
    except (TypeError, ValueError):
        out = []
        for v in values:
            try:
                out.append(int(v))
            except (TypeError, ValueError):
                out.append(NO_INT)
        return out


def _int64s(values: list[int]) -> array:
    """``values`` as an int64 array; an id beyond int64 (an annotation file may hold any integer) becomes
    :data:`NO_INT`, so the record's own checks refuse it instead of the scan dying in an ``OverflowError``."""
    try:
        return array("q", values)
    except OverflowError:
        return array("q", [v if -(1 << 63) <= v < (1 << 63) else NO_INT for v in values])


def _scan_annotations(batch: Batch, scan: _Scan, key_prefix: str, path: str) -> Iterator[Skip]:
    aids, iids, cids = batch.captures
    offsets = batch.offsets
    lengths = np.fromiter(map(len, batch.elements), np.int64, len(batch.elements))
    try:
        image_ids = list(map(int, iids))
        ids, cats = _ints(aids), _ints(cids)
    except (TypeError, ValueError):  # string image ids (ADE20K files), or elements the regex did not read
        image_ids, ids, cats, keep = [], [], [], []
        for j, (raw, aid, iid, cid) in enumerate(zip(batch.elements, aids, iids, cids, strict=True)):
            fields = _ann_ids(raw, aid, iid, cid, path, int(offsets[j]))
            if fields is None:
                yield Skip(
                    f"{key_prefix}/ann_bad",
                    "bad_annotation_entry",
                    f"{raw[:80]!r} is not an object",
                    level="annotation",
                )
                continue
            ids.append(fields[0])
            image_ids.append(fields[1])
            cats.append(fields[2])
            keep.append(j)
        offsets, lengths = offsets[keep], lengths[keep]
    slots = scan.slots
    got = list(map(slots.get, image_ids))
    if None in got:  # image ids not seen before get the next slot numbers
        for j in [j for j, s in enumerate(got) if s is None]:
            s = slots.get(image_ids[j])
            if s is None:
                s = slots[image_ids[j]] = len(slots)
            got[j] = s
    scan.ann_slot.extend(got)
    scan.ann_id.extend(_int64s(ids))
    scan.ann_cat.extend(_int64s(cats))
    scan.ann_off.frombytes(offsets.astype(np.int64).tobytes())
    scan.ann_len.frombytes(lengths.tobytes())


def _scan(path: str, scan: _Scan, key_prefix: str) -> Iterator[Skip]:
    """Step 1: one pass over ``path`` filling ``scan`` (nothing but categories is parsed)."""
    seen: set = set()
    n_bad = 0
    for batch in iter_arrays(
        path,
        keys=("images", "annotations", "categories"),
        patterns={"annotations": ANNOTATION, "images": WITH_ID},
    ):
        if batch.key == "annotations":
            yield from _scan_annotations(batch, scan, key_prefix, path)
        elif batch.key == "images":
            for raw, off, id_text in zip(
                batch.elements, batch.offsets.tolist(), batch.captures[0], strict=True
            ):
                iid = _id_value(id_text)
                if iid is None:
                    iid = _image_id(raw, path, off)
                if iid is None or not isinstance(iid, int | float | str):
                    yield Skip(
                        f"{key_prefix}/bad_image_{n_bad:06d}",
                        "bad_image_entry",
                        f"image entry {raw[:80]!r} has no usable id",
                    )
                    n_bad += 1
                    continue
                if iid in seen:
                    yield Skip(
                        f"{key_prefix}/{image_sort_id(iid)}",
                        "duplicate_image_id",
                        f"image id {iid} listed twice; first kept",
                    )
                    continue
                seen.add(iid)
                scan.ids.append(iid)
                scan.img_off.append(off)
                scan.img_len.append(len(raw))
        else:
            scan.categories.extend(loads(raw, path) for raw in batch.elements)


def _image_id(raw: bytes, path: str, offset: int) -> Any:
    img = loads(raw, path, offset)
    return img.get("id") if isinstance(img, dict) else None


def _ann_ids(
    raw: bytes, aid: bytes | None, iid: bytes | None, cid: bytes | None, path: str, offset: int
) -> tuple | None:
    """``(id, image_id, category_id)`` of an annotation off the int fast path; ids not ints -> NO_INT."""
    if iid is not None and aid is not None and cid is not None:
        return int(aid), _id_value(iid), int(cid)  # a string image id (ADE20K files): no need to parse
    ann = loads(raw, path, offset)
    if not isinstance(ann, dict):
        return None
    aid, iid, cid = (ann.get(k) for k in ("id", "image_id", "category_id"))
    if not isinstance(iid, int | float | str):
        iid = repr(iid)  # null or unhashable: can match no image; reported as annotation_without_image
    return (aid if type(aid) is int else NO_INT), iid, (cid if type(cid) is int else NO_INT)


def _group(scan: _Scan, key_prefix: str) -> tuple[list, np.ndarray, np.ndarray, np.ndarray, Iterator[Skip]]:
    """Step 2: images in key order, and the annotation order that lists each image's annotations together.

    Returns ``(sorted_ids, image_rows, ann_order, starts, skips)``: image ``r`` (in key order) is row
    ``image_rows[r]`` of the image columns; its annotations are rows ``ann_order[starts[r]:starts[r + 1]]``
    of the annotation columns, in file order (a stable sort).
    """
    n = len(scan.ids)
    image_rows = np.array(sorted(range(n), key=lambda i: image_sort_id(scan.ids[i])), dtype=np.int64)
    sorted_ids = [scan.ids[i] for i in image_rows]
    rank_of = {iid: r for r, iid in enumerate(sorted_ids)}
    slot_rank = np.array([rank_of.get(iid, -1) for iid in scan.slots], dtype=np.int64)
    ann_rank = slot_rank[np.frombuffer(scan.ann_slot, dtype=np.int64)]
    orphans = np.flatnonzero(ann_rank < 0)
    slot_ids = list(scan.slots) if len(orphans) else []

    def skips() -> Iterator[Skip]:
        for j in orphans.tolist():
            aid = scan.ann_id[j] if scan.ann_id[j] != NO_INT else None
            iid = slot_ids[scan.ann_slot[j]]
            yield Skip(
                f"{key_prefix}/ann_{image_sort_id(aid)}",
                "annotation_without_image",
                f"annotation {aid} points at image {iid}, which is not in images[]",
                level="annotation",
            )

    order = np.argsort(ann_rank, kind="stable")[len(orphans) :]  # orphans (rank -1) sort first
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(ann_rank[ann_rank >= 0], minlength=n), out=starts[1:])
    return sorted_ids, image_rows, order, starts, skips()


def _with_nones(column: np.ndarray) -> list:
    """An int64 id column as a list, None where it held :data:`NO_INT` (an id that was not an int)."""
    values = column.tolist()
    if (column == NO_INT).any():
        return [None if v == NO_INT else v for v in values]
    return values


@contextmanager
def _mapped(path: str) -> Iterator[mmap.mmap | bytes]:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            yield m
        finally:
            m.close()


def _emit(
    path: str,
    scan: _Scan,
    key_prefix: str,
    sorted_ids: list,
    image_rows: np.ndarray,
    order: np.ndarray,
    starts: np.ndarray,
    image_fields: Callable[[dict], dict],
    ann_fields: Callable | None,
    ann_list_key: str,
    raw: bool,
) -> Iterator[dict]:
    """Step 3: records in key order, image entries (and annotations unless ``raw``) read back from the
    file."""
    n = len(sorted_ids)
    img_off, img_len = (np.frombuffer(c, dtype=np.int64) for c in (scan.img_off, scan.img_len))
    ann_id, ann_cat, ann_off, ann_len = (
        np.frombuffer(c, dtype=np.int64) for c in (scan.ann_id, scan.ann_cat, scan.ann_off, scan.ann_len)
    )
    with _mapped(path) as text:
        for b0 in range(0, n, IMAGE_BLOCK):
            b1 = min(b0 + IMAGE_BLOCK, n)
            rows = image_rows[b0:b1]
            img_rows = zip(img_off[rows].tolist(), img_len[rows].tolist(), strict=True)
            sel = order[starts[b0] : starts[b1]]
            ids, cats = _with_nones(ann_id[sel]), _with_nones(ann_cat[sel])
            offs, lens = ann_off[sel].tolist(), ann_len[sel].tolist()
            bounds = (starts[b0 : b1 + 1] - starts[b0]).tolist()
            for k, (i_off, i_len) in enumerate(img_rows):
                a, b = bounds[k], bounds[k + 1]
                if raw:
                    anns = RawAnns(ids[a:b], cats[a:b], offs[a:b], lens[a:b])
                else:
                    anns = [
                        loads(text[o : o + ln], path, o) for o, ln in zip(offs[a:b], lens[a:b], strict=True)
                    ]
                    if ann_fields is not None:
                        anns = [ann_fields(x) for x in anns]
                image = image_fields(loads(text[i_off : i_off + i_len], path, i_off))
                yield {
                    "key": f"{key_prefix}/{image_sort_id(sorted_ids[b0 + k])}",
                    "image": image,
                    ann_list_key: anns,
                }
            if isinstance(text, mmap.mmap):  # mapped pages count as resident memory: give back the ones read
                text.madvise(mmap.MADV_DONTNEED)


def iter_coco_records(
    path: str,
    key_prefix: str,
    image_fields: Callable[[dict], dict],
    ann_fields: Callable[[Any], Any] | None,
    ann_list_key: str = "anns",
    *,
    categories: Callable[[list[dict]], dict] | None = None,
    raw: bool = False,
) -> Iterator[dict | Skip | Shared]:
    """One record per image, in key order: ``{"key", "image": image_fields(img), ann_list_key: [...]}``.

    ``ann_fields`` receives each annotation as a dict (None: keep it as is); it and ``image_fields`` pick
    what a record keeps, so chunk files stay small. With ``categories``, ``Shared(categories(all category
    dicts))`` is yielded before the first record. Duplicate image ids (the second one) and annotations whose
    image is absent are yielded as :class:`Skip`.

    ``raw=True``: no annotation is read or parsed; ``ann_list_key`` holds a :class:`RawAnns` (ids and byte
    spans in ``path``; ``ann_fields`` must be None). Such a record is not JSON-able: the source's index turns
    it into one, and its workers read the spans with :func:`read_spans`.
    """
    if raw and ann_fields is not None:
        raise ValueError("ann_fields applies to parsed annotations; with raw=True, pass None")
    scan = _Scan()
    yield from _scan(path, scan, key_prefix)
    if categories is not None:
        yield Shared(categories(scan.categories))
    sorted_ids, image_rows, order, starts, skips = _group(scan, key_prefix)
    yield from skips
    yield from _emit(
        path,
        scan,
        key_prefix,
        sorted_ids,
        image_rows,
        order,
        starts,
        image_fields,
        ann_fields,
        ann_list_key,
        raw,
    )


def read_categories(path: str) -> list[dict]:
    """The ``categories`` array (the other arrays are scanned past, not parsed)."""
    return [loads(raw, path) for batch in iter_arrays(path, keys=("categories",)) for raw in batch.elements]
