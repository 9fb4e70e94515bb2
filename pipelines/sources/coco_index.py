"""Memory-bounded indexing of COCO-style JSON (``images`` / ``annotations`` / ``categories``).

``pycocotools.COCO()`` / ``lvis.LVIS()`` load the whole file and build Python objects for every annotation
(≈3 GB for a 450 MB LVIS-scale file). Here the file is read **once** by :mod:`pipelines.sources.json_scan`,
whatever the order of its top-level keys (LVIS puts ``images`` last):

1. scan: categories are kept (small); image entries and annotations go, unparsed, into two spill files and
   only their ids stay in memory (40 bytes per annotation: image slot, id, category id, offset, length);
2. group: once every image id is known, images are ranked in key order and one stable numpy argsort lists
   each image's annotations together (file order within an image);
3. emit: records are yielded in key order, reading entries and texts back from the (memory-mapped) spills.

So a process holds the id columns and one record, never the file. Annotations are parsed (``json.loads``)
only in step 3 and only when the caller wants dicts; with ``raw_anns=True`` the caller gets
:class:`RawAnn` (ids + raw text) and can leave parsing to the conversion workers (LVIS polygons: the driver
never builds a float). Used by the COCO, LVIS, ADE20K (Mask2Former files) and GCG sources.
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from pipelines.sources.base import Shared, Skip
from pipelines.sources.json_scan import ANNOTATION, WITH_ID, iter_arrays, loads

IMAGE_BLOCK = 1000  # images read back per step; bounds the spill pages resident at once


class RawAnn(NamedTuple):
    """An annotation as scanned: the ids the index needs, and the element's JSON text, unparsed."""

    id: Any
    category_id: Any
    text: bytes

    def parse(self) -> Any:
        return json.loads(self.text)


def image_sort_id(image_id: Any) -> str:
    """Key id for an image id: ints zero-padded to 12 digits (COCO file names) so string order is numeric."""
    if isinstance(image_id, int) or (isinstance(image_id, float) and image_id.is_integer()):
        return f"{int(image_id):012d}"
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in str(image_id))


def _id_value(text: bytes) -> Any:
    """A captured id: ``b'12'`` -> 12, ``b'"a"'`` -> "a", ``b''`` -> None."""
    if not text:
        return None
    if text[0] in b"-0123456789":
        try:
            return int(text)
        except ValueError:
            pass
    return json.loads(text)


def _int_or_value(text: bytes) -> Any:
    try:
        return int(text)  # the common case, without a call to _id_value
    except ValueError:
        return _id_value(text)


NO_INT = -(2**63)  # "not an int" in the int64 id columns (the annotation text still has the value)
_COLS = 5  # per annotation: image slot, id, category id, offset and length of its text in the spill


class _Scan:
    """What one pass over the file leaves behind: spill files plus compact per-annotation columns.

    Per annotation 40 bytes stay in memory (:data:`_COLS` int64s); texts and image entries stay on disk.
    1.27M LVIS annotations: ≈51 MB.
    """

    def __init__(self, tmp: str):
        self.images_path = os.path.join(tmp, "images.json")
        self.anns_path = os.path.join(tmp, "anns.json")
        self.ids: list = []  # image ids, file order, first occurrence only
        self.img_cols = array("q")  # per image: offset, length of its entry in the images spill
        self.slots: dict[Any, int] = {}  # image id as written in annotations -> slot number
        self.ann_cols = array("q")  # per annotation: _COLS values, interleaved
        self.categories: list[dict] = []


class _Spill:
    """An append-only file written in large pieces; ``add`` returns the offset of what it appended."""

    def __init__(self, f):
        self.f, self.parts, self.pending, self.pos = f, [], 0, 0

    def add(self, data: bytes) -> int:
        off = self.pos
        self.parts.append(data)
        self.pos += len(data)
        self.pending += len(data)
        if self.pending > 1 << 22:
            self.flush()
        return off

    def flush(self) -> None:
        self.f.write(b"".join(self.parts))
        self.parts, self.pending = [], 0


def _scan(path: str, scan: _Scan, key_prefix: str) -> Iterator[Skip]:
    """Step 1: one pass over ``path``: image entries and annotation texts to spill files, ids to columns."""
    seen: set = set()
    n_bad = 0
    slots, cols = scan.slots, scan.ann_cols
    with open(scan.images_path, "wb") as fi, open(scan.anns_path, "wb") as fa:
        images, texts = _Spill(fi), _Spill(fa)
        for key, batch in iter_arrays(
            path, keys=("images", "annotations", "categories"), patterns={"annotations": ANNOTATION, "images": WITH_ID}
        ):
            if key == "annotations":
                for raw, aid, iid, cid in batch:
                    try:
                        aid = int(aid) if aid else NO_INT
                        cid = int(cid) if cid else NO_INT
                        iid = int(iid)
                    except (TypeError, ValueError):  # missing, a string, or delimited by the fallback walker
                        fields = _ann_ids(raw, aid, iid, cid, path)
                        if fields is None:
                            yield Skip(f"{key_prefix}/ann_bad", "bad_annotation_entry", f"{raw[:80]!r} is not an object",
                                       level="annotation")
                            continue
                        aid, iid, cid = fields
                    slot = slots.get(iid)
                    if slot is None:
                        slot = slots[iid] = len(slots)
                    cols.extend((slot, aid, cid, texts.add(raw), len(raw)))
            elif key == "images":
                for raw, iid in batch:
                    iid = _int_or_value(iid) if iid else _image_id(raw, path)
                    if iid is None or not isinstance(iid, int | float | str):
                        yield Skip(f"{key_prefix}/bad_image_{n_bad:06d}", "bad_image_entry",
                                   f"image entry {raw[:80]!r} has no usable id")
                        n_bad += 1
                        continue
                    if iid in seen:
                        yield Skip(f"{key_prefix}/{image_sort_id(iid)}", "duplicate_image_id",
                                   f"image id {iid} listed twice; first kept")
                        continue
                    seen.add(iid)
                    scan.ids.append(iid)
                    scan.img_cols.extend((images.add(raw), len(raw)))
            else:
                scan.categories.extend(loads(raw, path) for raw, *_ in batch)
        images.flush()
        texts.flush()


def _image_id(raw: bytes, path: str) -> Any:
    img = loads(raw, path)
    return img.get("id") if isinstance(img, dict) else None


def _ann_ids(raw: bytes, aid: Any, iid: Any, cid: Any, path: str) -> tuple[int, Any, int] | None:
    """``(id, image_id, category_id)`` of an annotation off the int fast path; ids not ints -> NO_INT."""
    if isinstance(iid, bytes) and iid.startswith(b'"') and type(aid) is int and type(cid) is int:
        return aid, _id_value(iid), cid  # a string image id (ADE20K files): no need to parse the rest
    ann = loads(raw, path)
    if not isinstance(ann, dict):
        return None
    aid, iid, cid = (ann.get(k) for k in ("id", "image_id", "category_id"))
    if not isinstance(iid, int | float | str):
        iid = repr(iid)  # null or unhashable: can match no image; reported as annotation_without_image
    return (aid if type(aid) is int else NO_INT), iid, (cid if type(cid) is int else NO_INT)


def _group(scan: _Scan, key_prefix: str) -> tuple[list, np.ndarray, np.ndarray, np.ndarray, Iterator[Skip]]:
    """Step 2: images in key order, and the annotation order that lists each image's annotations together.

    Returns ``(sorted_ids, image_rows, ann_order, starts, skips)``: image ``r`` (in key order) is row
    ``image_rows[r]`` of the image spill; its annotations are ``ann_order[starts[r]:starts[r + 1]]``, in
    file order (a stable sort).
    """
    n = len(scan.ids)
    image_rows = np.array(sorted(range(n), key=lambda i: image_sort_id(scan.ids[i])), dtype=np.int64)
    sorted_ids = [scan.ids[i] for i in image_rows]
    rank_of = {iid: r for r, iid in enumerate(sorted_ids)}
    slot_rank = np.array([rank_of.get(iid, -1) for iid in scan.slots], dtype=np.int64)
    cols = np.frombuffer(scan.ann_cols, dtype=np.int64).reshape(-1, _COLS)
    ann_rank = slot_rank[cols[:, 0]]
    orphans = np.flatnonzero(ann_rank < 0)
    slot_ids = list(scan.slots) if len(orphans) else []

    def skips() -> Iterator[Skip]:
        for j in orphans.tolist():
            aid = int(cols[j, 1]) if cols[j, 1] != NO_INT else None
            iid = slot_ids[cols[j, 0]]
            yield Skip(f"{key_prefix}/ann_{image_sort_id(aid)}", "annotation_without_image",
                       f"annotation {aid} points at image {iid}, which is not in images[]", level="annotation")

    order = np.argsort(ann_rank, kind="stable")[len(orphans):]  # orphans (rank -1) sort first
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(ann_rank[ann_rank >= 0], minlength=n), out=starts[1:])
    return sorted_ids, image_rows, order, starts, skips()


def _emit(scan: _Scan, key_prefix: str, sorted_ids: list, image_rows: np.ndarray, order: np.ndarray,
          starts: np.ndarray, image_fields: Callable[[dict], dict], ann_fields: Callable | None, ann_list_key: str,
          raw_anns: bool) -> Iterator[dict]:
    """Step 3: records in key order, reading image entries and annotation texts from the spill files."""
    n = len(sorted_ids)
    img_cols = np.frombuffer(scan.img_cols, dtype=np.int64).reshape(-1, 2)
    cols = np.frombuffer(scan.ann_cols, dtype=np.int64).reshape(-1, _COLS)
    new = tuple.__new__
    with _mapped(scan.images_path) as imgs, _mapped(scan.anns_path) as texts:
        for b0 in range(0, n, IMAGE_BLOCK):
            b1 = min(b0 + IMAGE_BLOCK, n)
            img_rows = img_cols[image_rows[b0:b1]].tolist()
            ann_rows = cols[order[starts[b0]:starts[b1]], 1:].tolist()  # id, category id, offset, length
            bounds = (starts[b0:b1 + 1] - starts[b0]).tolist()
            for k, (i_off, i_len) in enumerate(img_rows):
                rows = ann_rows[bounds[k]:bounds[k + 1]]
                if raw_anns:
                    anns = [new(RawAnn, (None if a == NO_INT else a, None if c == NO_INT else c, texts[o:o + ln]))
                            for a, c, o, ln in rows]
                else:
                    anns = [json.loads(texts[o:o + ln]) for _, _, o, ln in rows]
                if ann_fields is not None:
                    anns = [ann_fields(a) for a in anns]
                image = image_fields(json.loads(imgs[i_off:i_off + i_len]))
                yield {"key": f"{key_prefix}/{image_sort_id(sorted_ids[b0 + k])}", "image": image, ann_list_key: anns}
            for m in (imgs, texts):  # mapped pages count as resident memory: give back the ones read
                if isinstance(m, mmap.mmap):
                    m.madvise(mmap.MADV_DONTNEED)


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


def iter_coco_records(
    path: str,
    key_prefix: str,
    image_fields: Callable[[dict], dict],
    ann_fields: Callable[[Any], Any] | None,
    ann_list_key: str = "anns",
    *,
    categories: Callable[[list[dict]], dict] | None = None,
    raw_anns: bool = False,
) -> Iterator[dict | Skip | Shared]:
    """One record per image, in key order: ``{"key", "image": image_fields(img), ann_list_key: [...]}``.

    ``ann_fields`` receives each annotation as a dict, or as a :class:`RawAnn` with ``raw_anns=True`` (None:
    keep it as is); it and
    ``image_fields`` pick what a record keeps, so spill and chunk files stay small. With ``categories``,
    ``Shared(categories(all category dicts))`` is yielded before the first record. Duplicate image ids
    (the second one) and annotations whose image is absent are yielded as :class:`Skip`.
    """
    with tempfile.TemporaryDirectory(prefix="xsam-index-") as tmp:
        scan = _Scan(tmp)
        yield from _scan(path, scan, key_prefix)
        if categories is not None:
            yield Shared(categories(scan.categories))
        sorted_ids, image_rows, order, starts, skips = _group(scan, key_prefix)
        yield from skips
        yield from _emit(scan, key_prefix, sorted_ids, image_rows, order, starts, image_fields, ann_fields,
                         ann_list_key, raw_anns)


def read_categories(path: str) -> list[dict]:
    """The ``categories`` array (the other arrays are scanned past, not parsed)."""
    return [loads(raw, path) for _, batch in iter_arrays(path, keys=("categories",)) for raw, *_ in batch]
