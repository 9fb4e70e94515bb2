"""``coco_interactive``: PSALM's COCO-Interactive as interactive segmentation (task intseg; recipe §1.3,
§2.8).

Input (docs/contracts.md#data-root):
``img_intseg/coco_int/annotations/coco_interactive_{train,val}_psalm.json``, a list of ``{image,
image_info{id, file_name, height, width}, anns: [{id, category_id, bbox, iscrowd, segmentation,
{point,scribble,box,mask}_visual_prompt_mask}]}``; images in ``coco_int/coco2017/{split}2017`` (a link to
``img_genseg/coco2017``, also looked up directly).

One Sample per annotation **and** prompt type (X-SAM evaluates each type as its own dataset): one
``<p><region></p>``, the annotation's mask as the one target (label 0), the stored prompt mask as the region,
used as given except that point masks are dilated by a disk of radius 10 and scribbles by radius 5, as
X-SAM's loader does (``enhance_with_circles``). Keys ``<image id>_<annotation id>_<type>``; the loader selects
a type by ``regions[0].type`` (or the key suffix). An empty or missing prompt is a skip with a reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from pipelines import masks, vprompts
from pipelines.masks import MaskFormatError
from pipelines.schema import REGION, ImageRef, MaskTarget, Region, Sample
from pipelines.sources.base import (
    BuildOptions,
    ConvertContext,
    Shared,
    Skip,
    SkipRecord,
    SourceFiles,
    SourceNotFound,
)
from pipelines.sources.readers.coco_index import image_sort_id
from pipelines.sources.readers.jsonstream import iter_items
from pipelines.sources.vgd import COCO_ROOT, first_existing, sorted_by_key, vgd_conversation

INT_ROOT = "img_intseg/coco_int"
PROMPT_KEY = {t: f"{t}_visual_prompt_mask" for t in vprompts.PROMPT_TYPES}
DILATE = {"point": vprompts.DEFAULT_PARAMS.point_radius, "scribble": vprompts.DEFAULT_PARAMS.scribble_radius}


def _image_records(path: str, prefix: str) -> Iterator[dict | Skip]:
    """One spill item per list entry (image), keyed by image id; expanded per annotation after sorting."""
    for i, item in enumerate(iter_items(path, "item")):
        if not isinstance(item, dict):
            yield Skip(f"{prefix}/item_{i:09d}", "bad_record", f"list item {i} is a {type(item).__name__}")
            continue
        info = item.get("image_info") or {}
        image = {
            "id": info.get("id"),
            "file_name": item.get("image") or info.get("file_name"),
            "height": info.get("height"),
            "width": info.get("width"),
        }
        yield {
            "key": f"{prefix}/{image_sort_id(image['id'])}",
            "image": image,
            "anns": item.get("anns") or [],
        }


class CocoInteractive:
    """PSALM COCO-Interactive JSON -> one intseg Sample per (annotation, prompt type)."""

    name = "coco_interactive"
    task = "intseg"
    path_roles = ("annotations", "images")
    splits = ("train", "val")
    version = 1
    eval_image_guard_splits = ("train",)  # COCO train2017 images: RefCOCO/+/g eval images left out

    def locate(self, data_root: str, split: str, overrides: dict | None = None) -> SourceFiles:
        """Overrides: ``annotations`` (the PSALM JSON), ``images`` (folder relative to the data root)."""
        overrides = overrides or {}
        ann_rel = f"{INT_ROOT}/annotations/coco_interactive_{split}_psalm.json"
        ann = overrides.get("annotations") or os.path.join(data_root, ann_rel)
        image_dirs = [f"{INT_ROOT}/coco2017/{split}2017", f"{COCO_ROOT}/{split}2017"]
        images = overrides.get("images") or first_existing(data_root, image_dirs)
        if not os.path.exists(ann) or not images or not os.path.isdir(os.path.join(data_root, images)):
            raise SourceNotFound(self.name, [ann] + [os.path.join(data_root, d) for d in image_dirs])
        return SourceFiles(data_root=data_root, inputs={"annotations": ann}, dirs={"images": images})

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        prefix = f"{self.name}/{split}"
        skips: list[Skip] = []

        def only_records() -> Iterator[dict]:
            for r in _image_records(files.inputs["annotations"], prefix):
                if isinstance(r, Skip):
                    skips.append(r)
                else:
                    yield r

        last_image = last = None
        for rec in sorted_by_key(only_records()):
            if rec["key"] == last_image:
                yield Skip(
                    rec["key"],
                    "duplicate_image_id",
                    f"image id {rec['image']['id']} listed twice; first kept",
                )
                continue
            last_image = rec["key"]
            out = []
            for ann in rec["anns"]:
                aid = ann.get("id") if isinstance(ann, dict) else None
                base = f"{rec['key']}_{image_sort_id(aid)}"
                if not isinstance(ann, dict):
                    yield Skip(base, "bad_record", f"annotation is a {type(ann).__name__}")
                    continue
                fields = {k: ann.get(k) for k in ("id", "category_id", "iscrowd", "segmentation")}
                for kind in vprompts.PROMPT_TYPES:
                    key = f"{base}_{kind}"
                    if ann.get(PROMPT_KEY[kind]) is None:
                        yield Skip(
                            key, "missing_visual_prompt", f"annotation {aid} has no {PROMPT_KEY[kind]}"
                        )
                        continue
                    out.append(
                        {
                            "key": key,
                            "image": rec["image"],
                            "ann": fields,
                            "type": kind,
                            "prompt": ann[PROMPT_KEY[kind]],
                        }
                    )
            out.sort(key=lambda r: r["key"])
            for r in out:
                if r["key"] == last:
                    yield Skip(
                        r["key"], "duplicate_annotation_id", f"annotation id {r['ann']['id']} listed twice"
                    )
                    continue
                last = r["key"]
                yield r
        yield from skips

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        key, img, ann, kind = record["key"], record["image"], record["ann"], record["type"]
        h, w = img.get("height"), img.get("width")
        if not h or not w:
            raise SkipRecord("missing_image_size", f"image {img.get('id')} has no height/width")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise SkipRecord("missing_file_name", f"image {img.get('id')} has no file name")
        try:
            rle = masks.segmentation_to_rle(ann.get("segmentation"), h, w)
        except MaskFormatError as e:
            raise SkipRecord(e.reason, f"annotation {ann.get('id')}: {e.detail}") from None
        if masks.area(rle) == 0:
            raise SkipRecord("empty_mask", f"annotation {ann.get('id')}: segmentation covers no pixel")
        try:
            prompt = masks.segmentation_to_rle(record["prompt"], h, w)
        except MaskFormatError as e:
            raise SkipRecord(e.reason, f"annotation {ann.get('id')} {kind} prompt: {e.detail}") from None
        if masks.area(prompt) == 0:  # X-SAM drops empty prompts
            raise SkipRecord("empty_prompt", f"annotation {ann.get('id')}: the {kind} prompt covers no pixel")
        if kind in DILATE:
            prompt = vprompts.dilate_rle(prompt, DILATE[kind])
        rng = ctx.rng(key)
        cat = ann.get("category_id")
        return Sample(
            key=key,
            source=self.name,
            task="intseg",
            split=ctx.split,
            image=ImageRef(path=f"{ctx.files.dirs['images']}/{img['file_name']}", width=w, height=h),
            conversation=vgd_conversation(rng, 1, ctx.options.image_token),
            phrases=[REGION],
            masks=[
                MaskTarget(
                    rle=rle,
                    label=0,
                    category_id=cat,
                    iscrowd=int(bool(ann.get("iscrowd"))),
                    bbox=masks.bbox(rle),
                    area=float(masks.area(rle)),
                )
            ],
            regions=[Region(label=0, type=kind, rle=prompt)],
            meta={
                "image_id": img.get("id"),
                "ann_id": ann.get("id"),
                "category_id": cat,
                "prompt_type": kind,
            },
        )
