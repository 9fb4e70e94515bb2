"""``ade20k_panoptic``, ``ade20k_semantic``, ``ade20k_instance``: ADE20K SceneParsing-150 (task ovseg).

Read straight from the raw ADEChallengeData2016 files (renamed ``img_ovseg/ade20k``; source_formats.md §5),
without X-SAM's prep scripts (they crash as shipped)::

    images/{training,validation}/ADE_*.jpg
    annotations/{training,validation}/ADE_*.png           uint8: 0 = other (ignored), 1..150 = classes
    annotations_instance/{training,validation}/ADE_*.png  RGB: R = Instance100 class (1-based, 0 = void),
                                                           G = instance id (0 = void)

or, when that is what the user has, from Mask2Former's prepared files under the same root:
``ade20k_panoptic_{train,val}.json`` + ``ade20k_panoptic_{train,val}/`` (string image ids, 0-based
categories), ``annotations_detectron2/{training,validation}/`` (0..149, 255 = ignore) and
``ade20k_instance_{train,val}.json`` (COCO-style RLEs). The raw layout wins when both are there; the
override ``layout`` ("raw" / "mask2former") forces one, and every folder is overridable by its role name.

Both layouts give the same Samples (tests check it): ``category_id`` is the 0-based ADE-150 id (raw value
− 1), as in Mask2Former's and X-SAM's files; phrases are LISA's class names (``data/ade20k_classes.json``);
an instance's class is its Instance100 class mapped through Mask2Former's table
(``data/ade20k_instance_catid_mapping.txt``), whose semantic ids are also the "thing" classes.

- panoptic: stuff segments from the semantic PNG (non-thing classes), then thing instances from the
  instance PNG pasted over them (Mask2Former's ``prepare_ade20k_pan_seg.py``); unlabelled pixels → ``ignore``.
- semantic: one mask per class present; label 0 (raw) / 255 (detectron2) → ``ignore``.
- instance: one mask per instance; the vocabulary is the thing classes only (X-SAM's instance split).

Train samples list categories as genseg does (:func:`pipelines.sources.genseg.prompt_categories`, with
``genseg_num_class``); val samples list the whole vocabulary in id order (150 for panoptic and semantic).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipelines import masks
from pipelines.errors import BuildConfigError
from pipelines.images import DECODER_ERRORS, guarded_decode, image_size, png_header, read_panoptic_png
from pipelines.masks import MaskFormatError, label_map_rles
from pipelines.schema import ImageRef, Sample
from pipelines.sources.base import (
    BuildOptions,
    ConvertContext,
    Shared,
    Skip,
    SkipRecord,
    SourceFiles,
    SourceNotFound,
    key_id,
)
from pipelines.sources.genseg import (
    clean_category_name,
    genseg_conversation,
    mask_targets,
    paper_category_name,
    prompt_categories,
)
from pipelines.sources.readers.coco_index import image_sort_id, iter_coco_records

ADE_ROOT = "img_ovseg/ade20k"
SPLIT_DIRS = {"train": "training", "val": "validation"}
NUM_CLASSES = 150
DATA = Path(__file__).parent / "data"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_THING_BASE = 1000  # panoptic id-map values: stuff = class + 1 (1..150), thing = _THING_BASE + instance id


@cache
def class_names() -> tuple[str, ...]:
    """The 150 ADE class names (LISA's table), index = 0-based class id."""
    names = json.loads((DATA / "ade20k_classes.json").read_text())
    if len(names) != NUM_CLASSES:
        raise RuntimeError(
            f"{DATA / 'ade20k_classes.json'} lists {len(names)} classes, expected {NUM_CLASSES}"
        )
    return tuple(names)


@cache
def xsam_class_names() -> tuple[str, ...]:
    """The 150 names X-SAM's panoptic/semantic evaluation prompts with (Mask2Former's synonym lists, through
    the archive's ``tag_categories``), index = 0-based class id."""
    names = json.loads((DATA / "ade20k_classes_xsam.json").read_text())
    if len(names) != NUM_CLASSES:
        raise RuntimeError(
            f"{DATA / 'ade20k_classes_xsam.json'} lists {len(names)} classes, expected {NUM_CLASSES}"
        )
    return tuple(paper_category_name(n) for n in names)


@cache
def instance_to_class() -> dict[int, int]:
    """Instance100 class (1-based, the R value of an instance PNG) -> 0-based ADE-150 class id."""
    out = {}
    for line in (DATA / "ade20k_instance_catid_mapping.txt").read_text().splitlines()[1:]:
        if line.strip():
            ins, sem, _ = line.split()
            out[int(ins)] = int(sem) - 1
    return out


@cache
def thing_classes() -> tuple[int, ...]:
    return tuple(sorted(set(instance_to_class().values())))


def category_table(vocabulary: tuple[int, ...], naming: str = "lisa") -> dict:
    """Ids, phrases and thing flags; ``naming``: ``xsam`` (:func:`xsam_class_names`) or ``lisa``."""
    things = set(thing_classes())
    if naming == "xsam":
        phrases = {str(i): xsam_class_names()[i] for i in vocabulary}
    else:
        phrases = {str(i): clean_category_name(class_names()[i]) for i in vocabulary}
    return {
        "category_ids": list(vocabulary),
        "category_names": phrases,
        "isthing": {str(i): int(i in things) for i in vocabulary},
    }


# ---------------------------------------------------------------------------------------------- PNG reading
def _image_size(ctx: ConvertContext, rel: str) -> tuple[int, int]:
    """``(height, width)`` from the image header (the writer reads and checks the whole file later)."""
    try:
        return image_size(
            ctx.read_bytes(rel, missing_reason="missing_image", max_bytes=ctx.options.max_image_bytes)
        )
    except DECODER_ERRORS as e:
        raise SkipRecord("corrupt_image", f"{rel}: {e}") from None


def _read_png(ctx: ConvertContext, rel: str, modes: tuple[str, ...], missing: str, bad: str) -> np.ndarray:
    """``HxW`` (L, P) or ``HxWxC`` in OpenCV's B, G, R(, A) order (RGB, RGBA) uint8 pixels of a PNG."""
    data = ctx.read_bytes(rel, missing_reason=missing, max_bytes=ctx.options.max_image_bytes)
    _, _, mode = png_header(data, rel, ctx.options.max_image_pixels, bad)  # the pixel limit before decoding
    if mode not in modes:
        raise SkipRecord(bad, f"{rel} is mode {mode}, expected one of {modes}")
    # P must go through PIL (indices); libpng through OpenCV decodes about twice as fast as PIL for RGB
    arr = guarded_decode(_decode_palette if mode == "P" else _decode_cv2, data, rel, bad)
    if arr.dtype != np.uint8:
        raise SkipRecord(bad, f"{rel} holds {arr.dtype}, expected uint8")
    return arr


def _decode_palette(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def _decode_cv2(data: bytes) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def _check_size(arr: np.ndarray, h: int, w: int, rel: str, reason: str) -> None:
    if arr.shape[:2] != (h, w):
        raise SkipRecord(reason, f"{rel} is {arr.shape[0]}x{arr.shape[1]}, image is {h}x{w}")


def _histogram(arr: np.ndarray, channels: list[int], bins: list[int]) -> np.ndarray:
    """Pixel counts of uint8 channel values (``cv2.calcHist``: ~10x faster than ``np.bincount`` here)."""
    ranges = [0, 256] * len(channels)
    return cv2.calcHist([arr], channels, None, bins, ranges).astype(np.int64)


def read_semantic(ctx: ConvertContext, rel: str, h: int, w: int, detectron2: bool) -> np.ndarray:
    """The ``HxW`` uint8 label map, checked: raw PNGs hold 0..150 (0 = other), detectron2 ones 0..149 +
    255."""
    label = _read_png(ctx, rel, ("L", "P"), "missing_semantic_png", "bad_semantic_png")
    _check_size(label, h, w, rel, "label_size_mismatch")
    counts = _histogram(label, [0], [256]).ravel()
    first = NUM_CLASSES if detectron2 else NUM_CLASSES + 1
    bad = counts[first:255] if detectron2 else counts[first:]
    if bad.any():
        values = (np.flatnonzero(bad) + first).tolist()
        raise SkipRecord("label_value_out_of_range", f"{rel} holds class values {values[:8]} outside ADE-150")
    return label


def read_instances(
    ctx: ConvertContext, key: str, rel: str, h: int, w: int
) -> tuple[np.ndarray, dict[int, int]]:
    """Instance PNG -> ``(HxW uint8 instance-id map (G), {instance id: 0-based class})``.

    An instance whose pixels carry several R values, or an R value outside the Instance100 table, cannot be
    classed: it is dropped (its pixels become 0) and noted with ``ctx.drop``.
    """
    bgr = _read_png(ctx, rel, ("RGB", "RGBA"), "missing_instance_png", "bad_instance_png")
    _check_size(bgr, h, w, rel, "instance_size_mismatch")
    # (instance id G, class R) pairs present, sorted by G then R: one 2-D histogram, no np.unique
    gs, rs = np.nonzero(_histogram(bgr, [1, 2], [256, 256])[1:])
    inst, cls = (gs + 1).tolist(), rs.tolist()
    mapping = instance_to_class()
    classes: dict[int, int] = {}
    bad: list[int] = []
    for k, (i, c) in enumerate(zip(inst, cls, strict=True)):
        if (k and inst[k - 1] == i) or (k + 1 < len(inst) and inst[k + 1] == i):
            if i not in bad:
                bad.append(i)
                ctx.drop(
                    f"{key}/inst_{i}",
                    "ambiguous_instance_class",
                    f"instance {i} in {rel} has several R values",
                )
        elif c not in mapping:
            bad.append(i)
            ctx.drop(
                f"{key}/inst_{i}",
                "unknown_instance_class",
                f"instance {i} in {rel} has R={c}, not an Instance100 class",
            )
        else:
            classes[i] = mapping[c]
    g = np.ascontiguousarray(bgr[..., 1])
    if bad:
        g[np.isin(g, bad)] = 0
    return g, classes


# ---------------------------------------------------------------------------------------------- locate /
# index
def _exists(data_root: str, rel: str) -> bool:
    return os.path.exists(os.path.join(data_root, rel))


class _Ade20k:
    """What the three ADE20K sources share: layouts, listing, Sample assembly."""

    name: str
    kind: str  # panoptic | semantic | instance
    task = "ovseg"
    path_roles = (
        "root",
        "layout",
        "images",
        "annotations",
        "instances",
        "panoptic_json",
        "panoptic",
        "annotations_detectron2",
        "instance_json",
    )
    splits = ("train", "val")
    version = 1

    def vocabulary(self) -> tuple[int, ...]:
        return thing_classes() if self.kind == "instance" else tuple(range(NUM_CLASSES))

    def layouts(self, root: str, split: str, ov: dict) -> dict[str, dict[str, str]]:
        """Per layout, role -> path relative to the data root (what that layout needs for this source)."""
        sd = SPLIT_DIRS[split]
        images = ov.get("images") or f"{root}/images/{sd}"
        raw = {"images": images}
        if self.kind in ("panoptic", "semantic"):
            raw["annotations"] = ov.get("annotations") or f"{root}/annotations/{sd}"
        if self.kind in ("panoptic", "instance"):
            raw["instances"] = ov.get("instances") or f"{root}/annotations_instance/{sd}"
        prepared = {"images": images}
        if self.kind == "panoptic":
            prepared["panoptic_json"] = ov.get("panoptic_json") or f"{root}/ade20k_panoptic_{split}.json"
            prepared["panoptic"] = ov.get("panoptic") or f"{root}/ade20k_panoptic_{split}"
        elif self.kind == "semantic":
            prepared["annotations"] = (
                ov.get("annotations_detectron2") or f"{root}/annotations_detectron2/{sd}"
            )
        else:
            prepared["instance_json"] = ov.get("instance_json") or f"{root}/ade20k_instance_{split}.json"
        return {"raw": raw, "mask2former": prepared}

    def locate(self, data_root: str, split: str, overrides: dict | None = None) -> SourceFiles:
        ov = overrides or {}
        layouts = self.layouts(ov.get("root") or ADE_ROOT, split, ov)
        wanted = ov.get("layout")
        if wanted is not None and wanted not in layouts:
            raise BuildConfigError(f"--path {self.name}.layout={wanted}: not one of {sorted(layouts)}")
        looked: list[str] = []
        for layout in [wanted] if wanted else list(layouts):
            roles = layouts[layout]
            looked += [os.path.join(data_root, p) for p in roles.values()]
            if all(_exists(data_root, p) for p in roles.values()):
                inputs = {r: os.path.join(data_root, p) for r, p in roles.items() if r != "images"}
                dirs = {r: p for r, p in roles.items() if not p.endswith(".json")}
                return SourceFiles(data_root=data_root, inputs=inputs, dirs=dirs, info={"layout": layout})
        raise SourceNotFound(self.name, looked)

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        # The set's phrases as its evaluation prompts them (pipelines.sources.vocabulary.naming, which imports
        # this module): X-SAM's instance names equal LISA's; panoptic/semantic follow ade20k_category_names.
        naming = "lisa" if self.kind == "instance" else options.extra.ade20k_category_names
        yield Shared(category_table(self.vocabulary(), naming))
        prefix = f"{self.name}/{split}"
        layout = files.info["layout"]
        if layout == "mask2former" and self.kind != "semantic":
            yield from self._index_json(files, prefix)
        else:
            yield from self._index_folders(
                files, prefix, label_roles=[r for r in ("annotations", "instances") if r in files.dirs]
            )

    def _index_folders(
        self, files: SourceFiles, prefix: str, label_roles: list[str]
    ) -> Iterator[dict | Skip]:
        """One record per image file, in key order; a missing label PNG is a skip, a label without an image
        an annotation-level skip."""

        def listing(role: str, exts: tuple[str, ...]) -> dict[str, str]:
            folder = os.path.join(files.data_root, files.dirs[role])
            return {
                os.path.splitext(e.name)[0]: e.name
                for e in os.scandir(folder)
                if e.is_file() and e.name.lower().endswith(exts)
            }

        images = listing("images", IMAGE_EXTS)
        labels = {role: listing(role, (".png",)) for role in label_roles}
        reasons = {"annotations": "missing_semantic_png", "instances": "missing_instance_png"}
        by_key: dict[str, str] = {}
        for stem in images:
            k = f"{prefix}/{key_id(stem)}"
            if k in by_key:
                yield Skip(
                    k, "duplicate_image_id", f"{images[stem]} and {images[by_key[k]]} give the same key"
                )
                continue
            by_key[k] = stem
        for role, found in labels.items():
            for stem in sorted(set(found) - set(images)):
                yield Skip(
                    f"{prefix}/{key_id(stem)}",
                    "label_without_image",
                    f"{files.dirs[role]}/{found[stem]} has no image in {files.dirs['images']}",
                    level="annotation",
                )
        for k in sorted(by_key):
            stem = by_key[k]
            missing = [role for role in label_roles if stem not in labels[role]]
            if missing:
                yield Skip(k, reasons[missing[0]], f"{images[stem]}: no {files.dirs[missing[0]]}/{stem}.png")
                continue
            rec = {"key": k, "image_id": stem, "file": f"{files.dirs['images']}/{images[stem]}"}
            for role in label_roles:
                rec[role] = f"{files.dirs[role]}/{labels[role][stem]}"
            yield rec

    def _index_json(self, files: SourceFiles, prefix: str) -> Iterator[dict | Skip]:
        def image_fields(img: dict) -> dict:
            return {k: img.get(k) for k in ("id", "file_name", "height", "width")}

        if self.kind == "panoptic":
            path = files.inputs["panoptic_json"]

            def ann_fields(a: dict) -> dict:
                return {"file_name": a.get("file_name"), "segments_info": a.get("segments_info") or []}

        else:
            path = files.inputs["instance_json"]

            def ann_fields(a: dict) -> dict:
                return {k: a.get(k) for k in ("id", "category_id", "iscrowd", "segmentation")}

        for item in iter_coco_records(path, prefix, image_fields, ann_fields):
            if isinstance(item, dict):
                img = item["image"]
                item["image_id"] = img["id"]
                item["file"] = f"{files.dirs['images']}/{img['file_name']}"
            yield item

    # ------------------------------------------------------------------------------------------ convert
    def sample(
        self,
        record: dict,
        ctx: ConvertContext,
        h: int,
        w: int,
        targets: list[tuple[dict, int, int]],
        ignore: dict | None,
    ) -> Sample:
        """Assemble the Sample from ``(rle, class, segment/instance id)`` targets and an ignore RLE."""
        key = record["key"]
        if not targets:
            raise SkipRecord("no_usable_segment", f"{record['image_id']}: no labelled segment")
        rng = ctx.rng(key)
        vocab = ctx.shared["category_ids"]
        if ctx.split == "train":
            cat_ids = prompt_categories(rng, [c for _, c, _ in targets], vocab, ctx.options.genseg_num_class)
        else:
            cat_ids = list(vocab)  # evaluation: the whole vocabulary, in id order
        slot = {c: i for i, c in enumerate(cat_ids)}
        phrases = [ctx.shared["category_names"][str(c)] for c in cat_ids]
        return Sample(
            key=key,
            source=self.name,
            task=self.task,
            split=ctx.split,
            image=ImageRef(path=record["file"], width=w, height=h),
            conversation=genseg_conversation(rng, phrases, ctx.options.image_token),
            phrases=phrases,
            masks=mask_targets(targets, slot),
            ignore=ignore if ignore is not None and masks.area(ignore) else None,
            meta={"image_id": record["image_id"], "segment_ids": [s for _, _, s in targets]},
        )

    def record_size(self, record: dict, ctx: ConvertContext) -> tuple[int, int]:
        img = record.get("image")
        if img and img.get("height") and img.get("width"):  # Mask2Former JSONs carry the size
            return img["height"], img["width"]
        return _image_size(ctx, record["file"])


class Ade20kPanoptic(_Ade20k):
    """Raw semantic + instance PNGs (or Mask2Former's panoptic JSON + PNGs) -> panoptic ovseg Samples."""

    name = "ade20k_panoptic"
    kind = "panoptic"

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        h, w = self.record_size(record, ctx)
        if "anns" in record:
            return self._from_panoptic_png(record, ctx, h, w)
        label = read_semantic(ctx, record["annotations"], h, w, detectron2=False)
        inst, inst_class = read_instances(ctx, record["key"], record["instances"], h, w)
        # stuff first (its raw label value 1..150; 0 stays void), then things pasted over them as
        # _THING_BASE + instance id, as Mask2Former's converter does
        stuff_lut = np.arange(256, dtype=np.uint16)
        stuff_lut[[c + 1 for c in thing_classes()]] = 0
        stuff_lut[NUM_CLASSES + 1 :] = 0
        seg = np.where(inst > 0, inst.astype(np.uint16) + _THING_BASE, stuff_lut[label])
        rles = label_map_rles(seg)  # sorted: stuff by class, then things by instance id
        ignore = rles.pop(0, None)
        targets = [(r, i - 1 if i < _THING_BASE else inst_class[i - _THING_BASE], i) for i, r in rles.items()]
        return self.sample(record, ctx, h, w, targets, ignore)

    def _from_panoptic_png(self, record: dict, ctx: ConvertContext, h: int, w: int) -> Sample:
        anns = record["anns"]
        if len(anns) != 1:
            raise SkipRecord(
                "no_panoptic_annotation" if not anns else "duplicate_annotation",
                f"{record['image_id']} has {len(anns)} entries in annotations[]",
            )
        ann = anns[0]
        png_name = ann.get("file_name") or f"{record['image_id']}.png"
        rel = f"{ctx.files.dirs['panoptic']}/{png_name}"
        png = ctx.read_bytes(
            rel, missing_reason="missing_panoptic_png", max_bytes=ctx.options.max_image_bytes
        )
        id_map = read_panoptic_png(png, rel, ctx.options.max_image_pixels, "bad_panoptic_png")
        _check_size(id_map, h, w, rel, "label_size_mismatch")
        usable = []
        for seg in ann["segments_info"]:
            if seg.get("category_id") not in range(NUM_CLASSES):
                ctx.drop(
                    f"{record['key']}/seg_{seg.get('id')}",
                    "unknown_category",
                    f"category_id {seg.get('category_id')} is not an ADE-150 id (0..149)",
                )
            else:
                usable.append(seg)
        rles = label_map_rles(id_map)
        ignore = rles.pop(0, None)
        # Mask2Former lists a stuff segment even when things pasted over all of it: such a segment has no
        # pixel
        targets = [(rles[s["id"]], s["category_id"], s["id"]) for s in usable if s["id"] in rles]
        return self.sample(record, ctx, h, w, targets, ignore)


class Ade20kSemantic(_Ade20k):
    """Raw (or detectron2-shifted) label PNGs -> semantic ovseg Samples, one mask per class present."""

    name = "ade20k_semantic"
    kind = "semantic"

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        h, w = self.record_size(record, ctx)
        detectron2 = ctx.files.info["layout"] == "mask2former"
        label = read_semantic(ctx, record["annotations"], h, w, detectron2)
        rles = label_map_rles(label)
        ignore = rles.pop(255 if detectron2 else 0, None)
        shift = 0 if detectron2 else 1
        return self.sample(record, ctx, h, w, [(r, v - shift, v - shift) for v, r in rles.items()], ignore)


class Ade20kInstance(_Ade20k):
    """Raw instance PNGs (or Mask2Former's instance JSON) -> instance ovseg Samples over the thing classes."""

    name = "ade20k_instance"
    kind = "instance"

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        h, w = self.record_size(record, ctx)
        if "anns" in record:
            targets = []
            for ann in record["anns"]:
                akey = f"{record['key']}/ann_{image_sort_id(ann.get('id'))}"
                if ann.get("category_id") not in set(thing_classes()):
                    ctx.drop(
                        akey,
                        "unknown_category",
                        f"category_id {ann.get('category_id')} is not an ADE thing class",
                    )
                    continue
                try:
                    rle = masks.segmentation_to_rle(ann.get("segmentation"), h, w, ctx.part_dropper(akey))
                except MaskFormatError as e:
                    ctx.drop(akey, e.reason, e.detail)
                    continue
                if masks.area(rle):
                    targets.append((rle, ann["category_id"], ann.get("id")))
                else:
                    ctx.drop(akey, "empty_mask", "segmentation covers no pixel")
            return self.sample(record, ctx, h, w, targets, None)
        inst, inst_class = read_instances(ctx, record["key"], record["instances"], h, w)
        rles = label_map_rles(inst)
        rles.pop(0, None)
        return self.sample(record, ctx, h, w, [(r, inst_class[i], i) for i, r in rles.items()], None)
