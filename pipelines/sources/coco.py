"""``coco_panoptic`` and ``coco_instance``: COCO 2017 as generic segmentation (task genseg).

Layout (docs/contracts.md#data-root):
``img_genseg/coco2017/annotations/{panoptic,instances}_{train,val}2017.json``,
``panoptic_{train,val}2017/*.png``, images in ``{train,val}2017/``.

Targets are standard: every non-crowd segment is a mask labelled by its category's phrase index (not
X-SAM's stage-1 quirk of one segment per category). Crowd regions are not targets; their category still
counts as present (recipe §1.3) and their union is stored in the Sample's ``ignore`` RLE.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from pipelines import masks, validate
from pipelines.images import read_panoptic_png
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
    relpath,
)
from pipelines.sources.genseg import genseg_conversation, mask_targets, prompt_categories
from pipelines.sources.readers.coco_index import RawAnns, iter_coco_records, read_spans
from pipelines.sources.vocabulary import category_phrases

COCO_ROOT = "img_genseg/coco2017"


def _image_fields(img: dict) -> dict:
    file_name = img.get("file_name") or os.path.basename(img.get("coco_url", ""))  # recipe §1.3 fallback
    return {"id": img["id"], "file_name": file_name, "height": img.get("height"), "width": img.get("width")}


def _category_table(source: str, categories: list[dict], extra) -> dict:
    """Ids in id order and their phrases (:func:`pipelines.sources.vocabulary.category_phrases`, the
    ``coco_category_names`` option of ``extra``)."""
    cats = sorted(categories, key=lambda c: c["id"])
    phrases = category_phrases(source, extra, [c["id"] for c in cats], {c["id"]: c["name"] for c in cats})
    return {
        "category_ids": [c["id"] for c in cats],
        "category_names": {str(c): n for c, n in phrases.items()},
        "category_raw_names": {str(c["id"]): c["name"] for c in cats},
        "isthing": {str(c["id"]): int(c.get("isthing", 1)) for c in cats},
    }


def _image_hw(img: dict) -> tuple[int, int]:
    """The annotation's ``(height, width)`` of an image, checked to be positive ints of a sane size."""
    if not img.get("height") or not img.get("width"):
        raise SkipRecord("missing_image_size", f"image {img['id']} has no height/width")
    h = validate.check_int(img["height"], f"image {img['id']} height", 1, validate.MAX_SIDE, "bad_image_size")
    w = validate.check_int(img["width"], f"image {img['id']} width", 1, validate.MAX_SIDE, "bad_image_size")
    return h, w


def _segments(ann: dict, image_id) -> list[dict]:
    """A panoptic entry's ``segments_info``: a non-empty list of objects with an int id and a category id."""
    segments = ann.get("segments_info")
    if not isinstance(segments, list):
        raise SkipRecord(
            "wrong_type", f"image {image_id}: segments_info is {type(segments).__name__}, not a list"
        )
    if not segments:
        raise SkipRecord("no_usable_segment", f"image {image_id}: empty segments_info")
    for i, seg in enumerate(segments):
        what = f"image {image_id} segments_info[{i}]"
        validate.check_int(validate.require(seg, "id", int, what), f"{what}.id", 0, (1 << 24) - 1)
        validate.require(seg, "category_id", (int, str), what)
    return segments


def _locate(name: str, data_root: str, split: str, kind: str, overrides: dict | None) -> SourceFiles:
    overrides = overrides or {}
    ann = overrides.get("annotations") or os.path.join(
        data_root, COCO_ROOT, "annotations", f"{kind}_{split}2017.json"
    )
    image_dir = overrides.get("images") or f"{COCO_ROOT}/{split}2017"
    dirs = {"images": image_dir}
    looked = [ann, os.path.join(data_root, image_dir)]
    if kind == "panoptic":
        dirs["panoptic"] = overrides.get("panoptic") or f"{COCO_ROOT}/panoptic_{split}2017"
        looked.append(os.path.join(data_root, dirs["panoptic"]))
    if not all(os.path.exists(p) for p in looked):
        raise SourceNotFound(name, looked)
    return SourceFiles(data_root=data_root, inputs={"annotations": ann}, dirs=dirs)


def _genseg_sample(
    source: str,
    record: dict,
    ctx: ConvertContext,
    targets: list[tuple[dict, int, int]],
    crowd: list[tuple[dict, int]],
) -> Sample:
    """Render the Sample from decoded targets ``(rle, category_id, ann_or_segment_id)`` and crowd RLEs."""
    key = record["key"]
    img = record["image"]
    if not targets:
        raise SkipRecord("no_usable_segment", f"image {img['id']}: no non-crowd segment with a valid mask")
    shared = ctx.shared
    rng = ctx.rng(key)
    present = [c for _, c, _ in targets] + [c for _, c in crowd]
    if ctx.split == "train":
        cat_ids = prompt_categories(rng, present, shared["category_ids"], ctx.options.genseg_num_class)
    else:  # X-SAM's evaluation prompt: the whole vocabulary in id order, never sub-sampled or shuffled
        cat_ids = list(shared["category_ids"])
    slot = {c: i for i, c in enumerate(cat_ids)}
    phrases = [shared["category_names"][str(c)] for c in cat_ids]

    ignore = masks.merge_rles([r for r, _ in crowd]) if crowd else None
    return Sample(
        key=key,
        source=source,
        task="genseg",
        split=ctx.split,
        image=ImageRef(
            path=relpath(ctx.files.dirs["images"], img["file_name"]), width=img["width"], height=img["height"]
        ),
        conversation=genseg_conversation(rng, phrases, ctx.options.image_token),
        phrases=phrases,
        masks=mask_targets(targets, slot),
        ignore=ignore,
        meta={"image_id": img["id"], "ann_ids": [a for _, _, a in targets], "num_crowd": len(crowd)},
    )


class CocoInstance:
    """COCO instances JSON (polygons, crowd RLE) -> genseg Samples, one per image."""

    name = "coco_instance"
    task = "genseg"
    path_roles = ("annotations", "images")
    splits = ("train", "val")
    version = 1
    eval_image_guard_splits = ("train",)  # RefCOCO/+/g eval images left out (pipelines/build/eval_guard.py)

    def locate(self, data_root: str, split: str, overrides: dict | None = None) -> SourceFiles:
        return _locate(self.name, data_root, split, "instances", overrides)

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        # one pass over the file; annotations stay unparsed in the driver: a record carries their byte
        # spans and the worker converting it reads and parses only its own (COCO train: ~860k polygons)
        for item in iter_coco_records(
            files.inputs["annotations"],
            f"{self.name}/{split}",
            _image_fields,
            None,
            categories=lambda c: _category_table(self.name, c, options.extra),
            raw=True,
        ):
            if isinstance(item, dict):
                raw: RawAnns = item.pop("anns")
                item["ann_spans"] = [[o, n] for o, n in zip(raw.offsets, raw.lengths, strict=True)]
            yield item

    def _annotations(self, record: dict, ctx: ConvertContext) -> Iterator[tuple[str, dict]]:
        """``(annotation key, annotation)`` of each parsed annotation; one that cannot be used (too deep,
        not an object, no id, segmentation or category) is dropped with its reason."""
        path = ctx.files.inputs["annotations"]
        spans = [tuple(s) for s in record["ann_spans"]]
        for text, (off, _) in zip(read_spans(path, spans), spans, strict=True):
            akey = f"{record['key']}/ann_at_{off}"
            try:
                ann = validate.loads(text, f"{path} byte {off}")
                ann_id = validate.check_id(
                    validate.require(ann, "id", (int, str), "annotation"), "annotation id"
                )
                akey = f"{record['key']}/ann_{ann_id}"
                validate.require(ann, "category_id", (int, str), "annotation")
                validate.require(ann, "segmentation", (list, dict), "annotation")
            except SkipRecord as e:
                ctx.drop(akey, e.reason, f"{path} byte {off}: {e.detail}")
                continue
            yield akey, ann

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        img = record["image"]
        h, w = _image_hw(img)
        names = ctx.shared["category_names"]
        targets, crowd = [], []
        for akey, ann in self._annotations(record, ctx):
            if str(ann["category_id"]) not in names:
                ctx.drop(akey, "unknown_category", f"category_id {ann['category_id']} not in categories[]")
                continue
            try:
                rle = masks.segmentation_to_rle(ann["segmentation"], h, w, ctx.part_dropper(akey))
            except MaskFormatError as e:
                ctx.drop(akey, e.reason, e.detail)
                continue
            if ann.get("iscrowd"):
                crowd.append((rle, ann["category_id"]))
            elif masks.area(rle) == 0:
                ctx.drop(akey, "empty_mask", "segmentation covers no pixel")
            else:
                targets.append((rle, ann["category_id"], ann["id"]))
        return _genseg_sample(self.name, record, ctx, targets, crowd)


class CocoPanoptic:
    """COCO panoptic JSON + PNGs -> genseg Samples; each PNG decoded once for all its segments."""

    name = "coco_panoptic"
    task = "genseg"
    path_roles = ("annotations", "images", "panoptic")
    splits = ("train", "val")
    version = 1
    eval_image_guard_splits = ("train",)  # RefCOCO/+/g eval images left out (pipelines/build/eval_guard.py)

    def locate(self, data_root: str, split: str, overrides: dict | None = None) -> SourceFiles:
        return _locate(self.name, data_root, split, "panoptic", overrides)

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        yield from iter_coco_records(
            files.inputs["annotations"],
            f"{self.name}/{split}",
            _image_fields,
            lambda a: {"file_name": a.get("file_name"), "segments_info": a.get("segments_info") or []},
            categories=lambda c: _category_table(self.name, c, options.extra),
        )

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        img = record["image"]
        h, w = _image_hw(img)
        if not record["anns"]:
            raise SkipRecord("no_panoptic_annotation", f"image {img['id']} has no entry in annotations[]")
        if len(record["anns"]) > 1:
            raise SkipRecord(
                "duplicate_annotation", f"image {img['id']} has {len(record['anns'])} panoptic entries"
            )
        ann = record["anns"][0]
        segments = _segments(ann, img["id"])
        png_name = ann.get("file_name") or os.path.splitext(img["file_name"])[0] + ".png"
        rel = relpath(ctx.files.dirs["panoptic"], png_name)
        png = ctx.read_bytes(
            rel, missing_reason="missing_panoptic_png", max_bytes=ctx.options.max_image_bytes
        )
        id_map = read_panoptic_png(png, rel, ctx.options.max_image_pixels, "corrupt_panoptic_png")
        if id_map.shape != (h, w):
            raise SkipRecord(
                "rle_size_mismatch", f"{png_name} is {id_map.shape[0]}x{id_map.shape[1]}, image is {h}x{w}"
            )
        names = ctx.shared["category_names"]
        usable = []
        for seg in segments:
            skey = f"{record['key']}/seg_{seg['id']}"
            if str(seg["category_id"]) not in names:
                ctx.drop(skey, "unknown_category", f"category_id {seg['category_id']} not in categories[]")
            else:
                usable.append(seg)
        rles = masks.id_map_to_rles(id_map, [s["id"] for s in usable])
        areas = np.asarray([masks.area(r) for r in rles]) if rles else np.zeros(0)
        targets, crowd = [], []
        for seg, rle, a in zip(usable, rles, areas, strict=True):
            if a == 0:
                ctx.drop(
                    f"{record['key']}/seg_{seg['id']}",
                    "empty_segment",
                    f"segment id {seg['id']} not in {png_name}",
                )
            elif seg.get("iscrowd"):
                crowd.append((rle, seg["category_id"]))
            else:
                targets.append((rle, seg["category_id"], seg["id"]))
        return _genseg_sample(self.name, record, ctx, targets, crowd)
