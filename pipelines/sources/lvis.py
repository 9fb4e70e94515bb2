"""``lvis``: LVIS v1 (1203 categories) as open-vocabulary segmentation (task ovseg; source_formats.md §6).

Layout (docs/contracts.md#data-root): ``img_ovseg/lvis/lvis_v1_{train,val}.json`` (``lvis_v0.5_*.json``
accepted), images from COCO: ``img_genseg/coco2017/<folder>/<file>`` where ``<folder>/<file>`` are the last
two parts of the image's ``coco_url`` (v1 has no ``file_name``; v1 *val* images live in ``train2017/`` too, so
the URL folder, not the split, decides). Without a ``coco_url``, a v0.5 ``file_name`` ``COCO_val2014_….jpg``
is looked up in ``img_genseg/coco2014/val2014/``. Overrides: ``annotations``, ``images``, ``images2014``.

Indexing never loads the file (a v1 train file is ≈1 GB): :func:`iter_coco_records` scans it once and the
records carry only where each annotation's JSON is in the file (byte offset and length); the conversion
worker that owns a record reads those bytes back and parses its polygons, so the driver never parses one.
Workers therefore need the annotation file at the same path (the data root is shared storage anyway). A file
rewritten after indexing changes the input hash (the next build redoes everything), and a worker that finds
something else than an annotation of its image at an offset skips the record (``annotation_file_changed``).

Prompts (recipe §2.2 machinery, LVIS semantics): positives are the image's annotated categories; negatives
come first from its verified-absent ``neg_category_ids``, then from the other categories, and never from
``not_exhaustive_category_ids`` (present, but not every instance is annotated). The phrase list is capped
(source option ``lvis_max_phrases``, default 100): an image with more positive categories than the
cap is split at index time into several records (keys ``…_p000``, ``…_p001``), each with a share of the
categories and all their annotations, so no annotation is lost. Train samples draw ``randint(0, cap - |pos|)``
negatives as genseg does; val samples fill the prompt up to the cap. Every annotation is an instance target
(LVIS has no ``iscrowd``); ``meta["not_exhaustive"]`` lists the prompted positives whose annotation is known
to be incomplete, for losses that want to forgive unmatched predictions on them.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence

from pipelines import masks
from pipelines.masks import MaskFormatError
from pipelines.schema import ImageRef, Sample
from pipelines.sources.base import (
    BuildOptions,
    ConvertContext,
    Shared,
    Skip,
    SkipRecord,
    SourceFiles,
    SourceNotFound,
)
from pipelines.sources.genseg import clean_category_name, genseg_conversation, mask_targets
from pipelines.sources.readers.coco_index import RawAnns, image_sort_id, iter_coco_records, read_spans

LVIS_ROOT = "img_ovseg/lvis"
COCO_ROOT = "img_genseg/coco2017"
COCO2014_ROOT = "img_genseg/coco2014"

_URL_FOLDER = re.compile(r"^(?:train|val|test|unlabeled)20\d\d$")
_FILE = re.compile(r"^[\w\-]+\.(?:jpg|jpeg|png)$", re.IGNORECASE)
_V05_FILE = re.compile(r"^COCO_(train|val|test)(20\d\d)_\d+\.jpg$")


def image_path(img: dict, images_dir: str, images2014_dir: str) -> tuple[str | None, str | None]:
    """``(path relative to the data root, None)`` or ``(None, reason detail)`` for an LVIS image entry."""
    url = img.get("coco_url")
    if isinstance(url, str) and url:
        # the last two path parts; split by hand, urllib.parse costs more than the rest of the index per image
        parts = url.split("?", 1)[0].split("#", 1)[0].rsplit("/", 2)
        if len(parts) == 3 and _URL_FOLDER.match(parts[1]) and _FILE.match(parts[2]):
            return f"{images_dir}/{parts[1]}/{parts[2]}", None
    name = img.get("file_name")
    if isinstance(name, str) and name:
        if m := _V05_FILE.match(name):
            return f"{images2014_dir}/{m[1]}{m[2]}/{name}", None
        folder, _, file = name.rpartition("/")
        if _URL_FOLDER.match(folder) and _FILE.match(file):
            return f"{images_dir}/{name}", None
    if url:
        return None, f"coco_url {url!r} has no recognisable <split><year>/<file>.jpg folder"
    return None, f"image {img.get('id')!r} has neither a coco_url nor a recognisable file_name"


def category_names(cats: Sequence[dict]) -> dict[int, str]:
    """Phrase per category id: ``synonyms[0]`` (else ``name``), cleaned as X-SAM cleans names.

    Cleaning drops parenthesised qualifiers ('bow_(weapon)' -> 'bow'), which makes a few LVIS names collide
    ('bow_(weapon)', 'bow_(decorative_ribbons)'); those keep their qualifier ('bow (weapon)') so that no
    two prompt phrases are the same words with different labels.
    """
    raw = {c["id"]: ((c.get("synonyms") or [None])[0] or c.get("name") or str(c["id"])) for c in cats}
    names = {i: clean_category_name(n) for i, n in raw.items()}
    counts = Counter(names.values())
    for i, n in raw.items():
        if counts[names[i]] > 1:
            names[i] = " ".join(n.replace("_", " ").lower().split())
    return names


def category_table(cats: Sequence[dict]) -> dict:
    """The :class:`Shared` data of a split (1203 entries for v1)."""
    cats = sorted(
        (c for c in cats if isinstance(c, dict) and isinstance(c.get("id"), int)), key=lambda c: c["id"]
    )
    names = category_names(cats)
    return {
        "category_ids": [c["id"] for c in cats],
        "category_names": {str(i): n for i, n in names.items()},
        "frequency": {str(c["id"]): c.get("frequency") for c in cats},
    }


def split_categories(pos: Sequence[int], cap: int) -> list[list[int]]:
    """Sorted positive ids in ``ceil(len/cap)`` contiguous, nearly equal parts of at most ``cap`` each."""
    n = max(1, -(-len(pos) // cap))
    size, extra = divmod(len(pos), n)
    parts, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        parts.append(list(pos[start:end]))
        start = end
    return parts


def sample_negatives(
    rng: random.Random,
    n: int,
    present: Sequence[int],
    verified: Sequence[int],
    not_exhaustive: Sequence[int],
    all_ids: Sequence[int],
) -> list[int]:
    """``n`` absent categories: verified negatives first, then other categories; never a present or
    non-exhaustive one (fewer than ``n`` if the vocabulary runs out)."""
    banned = set(present) | set(not_exhaustive)
    known = set(all_ids)
    first = sorted({c for c in verified if c in known and c not in banned})
    picked = rng.sample(first, min(n, len(first)))
    if len(picked) < n:
        rest = sorted(known - banned - set(first))
        picked += rng.sample(rest, min(n - len(picked), len(rest)))
    return picked


class Lvis:
    """LVIS v1 / v0.5 JSON + COCO images -> ovseg Samples, one per image (or per phrase-cap part)."""

    name = "lvis"
    path_roles = ("annotations", "images", "images2014")
    task = "ovseg"
    splits = ("train", "val")
    version = 1

    def locate(self, data_root: str, split: str, overrides: dict | None = None) -> SourceFiles:
        overrides = overrides or {}
        candidates = (
            [overrides["annotations"]]
            if overrides.get("annotations")
            else [
                os.path.join(data_root, LVIS_ROOT, f"lvis_v1_{split}.json"),
                os.path.join(data_root, LVIS_ROOT, f"lvis_v0.5_{split}.json"),
            ]
        )
        ann = next((p for p in candidates if os.path.isfile(p)), None)
        dirs = {
            "images": overrides.get("images") or COCO_ROOT,
            "images2014": overrides.get("images2014") or COCO2014_ROOT,
        }
        image_root = os.path.join(data_root, dirs["images"])
        if ann is None or not os.path.isdir(image_root):
            raise SourceNotFound(self.name, [*candidates, image_root])
        return SourceFiles(
            data_root=data_root,
            inputs={"annotations": ann},
            dirs=dirs,
            info={"annotation_file": os.path.basename(ann)},
        )

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        cap = options.extra.lvis_max_phrases
        known: set[int] = set()

        def categories(cats: list[dict]) -> dict:
            table = category_table(cats)
            known.update(table["category_ids"])
            return table

        def image_fields(img: dict) -> dict:
            path, error = image_path(img, files.dirs["images"], files.dirs["images2014"])
            return {
                "id": img.get("id"),
                "path": path,
                "path_error": error,
                "height": img.get("height"),
                "width": img.get("width"),
                "has_url": bool(img.get("coco_url")),
                "neg": img.get("neg_category_ids") or [],
                "not_exhaustive": img.get("not_exhaustive_category_ids") or [],
            }

        for item in iter_coco_records(
            files.inputs["annotations"],
            f"{self.name}/{split}",
            image_fields,
            None,
            categories=categories,
            raw=True,
        ):
            if isinstance(item, dict):
                yield from _records(item, known, cap)
            else:
                yield item

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        key, img = record["key"], record["image"]
        h, w = img["height"], img["width"]
        if not h or not w:
            raise SkipRecord("missing_image_size", f"image {img['id']} has no height/width")
        targets, seen = [], set()
        path = ctx.files.inputs["annotations"]
        for text in read_spans(path, list(zip(record["offsets"], record["lengths"], strict=True))):
            try:
                ann = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError):
                ann = None
            if not isinstance(ann, dict) or ann.get("image_id") != img["id"]:
                raise SkipRecord("annotation_file_changed", f"{path} changed since it was indexed")
            ann_id, cat = ann.get("id"), ann.get("category_id")
            seen.add(cat)  # present even if its mask turns out unusable: never a negative then
            akey = f"{key}/ann_{ann_id}"
            try:
                rle = masks.segmentation_to_rle(ann.get("segmentation"), h, w, ctx.part_dropper(akey))
            except MaskFormatError as e:
                ctx.drop(akey, e.reason, e.detail)
                continue
            if masks.area(rle) == 0:
                ctx.drop(akey, "empty_mask", "segmentation covers no pixel")
                continue
            targets.append((rle, cat, ann_id))
        if not targets:
            raise SkipRecord("no_usable_annotation", f"image {img['id']}: no annotation with a valid mask")
        rng = ctx.rng(key)
        pos = sorted({c for _, c, _ in targets})
        budget = max(ctx.options.extra.lvis_max_phrases - len(pos), 0)
        n_neg = budget if ctx.split == "val" else rng.randint(0, budget)
        present = seen.union(record.get("present", ()))
        negs = sample_negatives(
            rng, n_neg, present, record["neg"], record["not_exhaustive"], ctx.shared["category_ids"]
        )
        cat_ids = pos + negs
        rng.shuffle(cat_ids)
        slot = {c: i for i, c in enumerate(cat_ids)}
        names = ctx.shared["category_names"]
        phrases = [names[str(c)] for c in cat_ids]
        not_exhaustive, verified = set(record["not_exhaustive"]), set(record["neg"])
        return Sample(
            key=key,
            source=self.name,
            task=self.task,
            split=ctx.split,
            image=ImageRef(path=img["path"], width=w, height=h),
            conversation=genseg_conversation(rng, phrases, ctx.options.image_token),
            phrases=phrases,
            masks=mask_targets(targets, slot),
            meta={
                "image_id": img["id"],
                "ann_ids": [a for _, _, a in targets],
                "part": record["part"],
                "neg_category_ids": [c for c in negs if c in verified],
                "not_exhaustive": [c for c in pos if c in not_exhaustive],
            },
        )


def _records(item: dict, known: set[int], cap: int) -> Iterator[dict | Skip]:
    """One image's records (several when its positives exceed the cap), or the skips that replace them."""
    key, img = item["key"], item["image"]
    anns: RawAnns = item["anns"]
    if img["path_error"]:
        reason = "unrecognised_coco_url" if img["has_url"] else "missing_image_path"
        yield Skip(key, reason, img["path_error"])
        return
    ids, cats, offs, lens = anns
    if not all(c in known for c in cats):
        for i, c in zip(ids, cats, strict=True):
            if c not in known:
                yield Skip(
                    f"{key}/ann_{image_sort_id(i)}",
                    "unknown_category",
                    f"annotation {i}: category_id {c} not in categories[]",
                    level="annotation",
                )
        keep = [j for j, c in enumerate(cats) if c in known]
        ids, cats, offs, lens = ([col[j] for j in keep] for col in (ids, cats, offs, lens))
    if not ids:
        if anns.ids:
            yield Skip(key, "no_annotations", f"image {img['id']}: no annotation of a known category")
        else:  # LVIS has images with only negative labels: nothing to segment, and nothing wrong (a policy skip)
            yield Skip(
                key, "only_negative_labels", f"image {img['id']}: no annotations, only negative labels"
            )
        return
    present = sorted(set(cats))
    image = {k: img[k] for k in ("id", "path", "height", "width")}
    if len(present) <= cap:  # the common case: one record, no copying of the columns
        yield {
            "key": key,
            "image": image,
            "neg": img["neg"],
            "not_exhaustive": img["not_exhaustive"],
            "part": [0, 1],
            "offsets": offs,
            "lengths": lens,
        }
        return
    parts = split_categories(present, cap)
    for i, part in enumerate(parts):
        members = set(part)
        pick = [j for j, c in enumerate(cats) if c in members]
        yield {
            "key": f"{key}_p{i:03d}",
            "image": image,
            "neg": img["neg"],
            "not_exhaustive": img["not_exhaustive"],
            "part": [i, len(parts)],
            "present": present,  # the other parts' categories are present too: never negatives here
            # where each annotation's JSON is in the annotation file: the worker reads and parses its own
            "offsets": [offs[j] for j in pick],
            "lengths": [lens[j] for j in pick],
        }
