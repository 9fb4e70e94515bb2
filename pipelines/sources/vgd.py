"""``coco_vgd``: visual grounded segmentation on COCO (task vgdseg; recipe §1.3, §2.7, §2.10).

Inputs, in order of preference (docs/contracts.md#data-root, ``img_vgdseg/coco_vgd/``):

* **released**: X-SAM's prompt JSON ``annotations/img_vgdseg_coco_{train,val}.json`` (``[archive]`` name
  ``coco_vgdseg_{train,val}.json``): a list of images, each with its non-crowd COCO annotations plus
  ``visual_prompts: {point,scribble,box,mask}_visual_prompt`` RLEs. The prompts are used as given, each one
  checked against its image size;
* **generated**: COCO ``instances_{train,val}2017.json`` (``coco_vgd/coco2017/annotations/`` or
  ``img_genseg/coco2017/annotations/``), prompts drawn at conversion time by :mod:`pipelines.vprompts`,
  seeded by ``(seed, sample key, annotation id)``.

One Sample per image: one ``<p><region></p>`` per category present (shuffled for train, in id order for
val as X-SAM evaluates), every non-crowd instance of those categories a target labelled by its region slot,
and each region's prompt taken from one instance of its category (chosen with the sample's RNG; train draws
the prompt type uniformly among the ones that instance has, each val split fixes it). Crowd instances go to
``ignore``. Instances whose masks are too small for any prompt stay targets while another instance of their
category can give the prompt; a category with no promptable instance is dropped (counted, per annotation).

Train samples also carry ``prompt_pool``: every prompt type of every kept instance (compressed RLEs, the
released prompts as given or all four generated ones). The stored conversation and ``regions`` are use 0's
rendering (same-image prompts, as above, so previews and schema checks read them as before); at batch time the
processor re-draws each slot's prompt among all instances of its category in the micro-batch, from any image,
and adds X-SAM ``[archive]``'s negatives (absent categories whose prompts come from other images of the batch,
no target) — :mod:`pipelines.loader.vgd_draw`. ``meta["slot_category_ids"]`` gives every slot's category.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from pipelines import masks, templates, vprompts
from pipelines.masks import MaskFormatError
from pipelines.schema import REGION, ImageRef, MaskTarget, PoolPrompt, Region, Sample, Turn
from pipelines.sources.base import (
    BuildOptions,
    ConvertContext,
    Shared,
    Skip,
    SkipRecord,
    SourceFiles,
    SourceNotFound,
)
from pipelines.sources.genseg import clean_category_name
from pipelines.sources.readers.coco_index import image_sort_id, iter_coco_records, read_categories
from pipelines.sources.readers.jsonstream import iter_items

VGD_ROOT = "img_vgdseg/coco_vgd"
COCO_ROOT = "img_genseg/coco2017"
VAL_SPLITS = {f"val_{t}": t for t in vprompts.PROMPT_TYPES}  # one eval split per prompt type
RELEASED_KEY = {t: f"{t}_visual_prompt" for t in vprompts.PROMPT_TYPES}


# ----------------------------------------------------------------------------- shared with coco_interactive
def vgd_conversation(rng, n_regions: int, image_token: str) -> list[Turn]:
    """One user turn listing ``n_regions`` ``<p><region></p>`` slots, one answer with one ``<SEG>``."""
    question = templates.pick(rng, templates.VGD_QUESTIONS).format(
        regions=templates.join_tags([REGION] * n_regions)
    )
    return [
        Turn("user", templates.with_image(question, image_token)),
        Turn("assistant", templates.pick(rng, templates.SEG_ANSWERS)),
    ]


def sorted_by_key(records: Iterable[dict]) -> Iterator[dict]:
    """Records of a list file in key order, holding only ``(key, offset, length)`` per record in memory.

    Released list files are not guaranteed to be in image-id order (X-SAM writes them from an unordered
    process pool), so records are spilled as JSON lines to a local temporary file and read back sorted.
    Equal keys come out in file order (the caller decides what a duplicate is).
    """
    with tempfile.TemporaryFile(prefix="xsam-sort-") as f:
        index: list[tuple[str, int, int, int]] = []
        for i, rec in enumerate(records):
            data = json.dumps(rec, separators=(",", ":")).encode()
            index.append((rec["key"], i, f.tell(), len(data)))
            f.write(data)
        index.sort()
        for _, _, offset, length in index:
            f.seek(offset)
            yield json.loads(f.read(length))


def first_existing(data_root: str, candidates: list[str]) -> str | None:
    return next((c for c in candidates if os.path.exists(os.path.join(data_root, c))), None)


def _names(cats: list[dict]) -> dict[str, str]:
    return {str(c["id"]): clean_category_name(c["name"]) for c in cats}


def category_table(path: str | None) -> dict:
    """``{"category_names": {str(id): cleaned name}}`` from a COCO instances file, or {} without one."""
    return {"category_names": _names(read_categories(path))} if path else {}


# ----------------------------------------------------------------------------- the source
def _image_fields(img: dict) -> dict:
    file_name = img.get("file_name") or os.path.basename(img.get("coco_url", ""))
    return {
        "id": img.get("id"),
        "file_name": file_name,
        "height": img.get("height"),
        "width": img.get("width"),
    }


def _released_records(path: str, prefix: str, kinds: tuple[str, ...]) -> Iterator[dict | Skip]:
    """X-SAM's prompt list -> one record per image (unsorted); only the prompt types in ``kinds`` are kept."""
    for i, item in enumerate(iter_items(path, "item")):
        if not isinstance(item, dict):
            yield Skip(f"{prefix}/item_{i:09d}", "bad_record", f"list item {i} is a {type(item).__name__}")
            continue
        info = item.get("image_info") or {}
        size = item.get("image_size") or [None, None]
        image = {
            "id": info.get("id", item.get("image_id")),
            "file_name": info.get("file_name") or item.get("image_file"),
            "height": info.get("height", size[0]),
            "width": info.get("width", size[1]),
        }
        anns = []
        for a in item.get("annotations") or []:
            vp = a.get("visual_prompts") or {}
            anns.append(
                {
                    "id": a.get("id"),
                    "category_id": a.get("category_id"),
                    "iscrowd": a.get("iscrowd", 0),
                    "segmentation": a.get("segmentation"),
                    "prompts": {t: vp[RELEASED_KEY[t]] for t in kinds if vp.get(RELEASED_KEY[t]) is not None},
                }
            )
        yield {"key": f"{prefix}/{image_sort_id(image['id'])}", "image": image, "anns": anns}


def _dedup(records: Iterable[dict | Skip]) -> Iterator[dict | Skip]:
    """Records sorted by key; a repeated key becomes a ``duplicate_image_id`` skip (the first one is kept)."""
    last = None
    skips: list[Skip] = []

    def only_records() -> Iterator[dict]:
        for r in records:
            if isinstance(r, Skip):
                skips.append(r)
            else:
                yield r

    for rec in sorted_by_key(only_records()):
        if rec["key"] == last:
            yield Skip(
                rec["key"], "duplicate_image_id", f"image id {rec['image']['id']} listed twice; first kept"
            )
            continue
        last = rec["key"]
        yield rec
    yield from skips


class CocoVgd:
    """COCO-VGD: X-SAM's released prompt JSON, or prompts generated from COCO instances."""

    name = "coco_vgd"
    task = "vgdseg"
    path_roles = ("annotations", "instances", "images")
    splits = ("train", *VAL_SPLITS)
    version = 3  # 2: train samples carry prompt_pool; 3: a mask's area is X-SAM's (polygon area)
    eval_image_guard_splits = ("train",)  # RefCOCO/+/g eval images left out (pipelines/build/eval_guard.py)

    def locate(self, data_root: str, split: str, overrides: dict | None = None) -> SourceFiles:
        """Overrides: ``annotations`` (released prompt JSON), ``instances`` (COCO instances), ``images``."""
        overrides = overrides or {}
        base = "train" if split == "train" else "val"
        released = [
            f"{VGD_ROOT}/annotations/img_vgdseg_coco_{base}.json",
            f"{VGD_ROOT}/annotations/coco_vgdseg_{base}.json",
        ]
        instances = [
            f"{VGD_ROOT}/coco2017/annotations/instances_{base}2017.json",
            f"{COCO_ROOT}/annotations/instances_{base}2017.json",
        ]
        image_dirs = [f"{VGD_ROOT}/coco2017/{base}2017", f"{COCO_ROOT}/{base}2017"]
        ann = overrides.get("annotations") or first_existing(data_root, released)
        inst = overrides.get("instances") or first_existing(data_root, instances)
        images = overrides.get("images") or first_existing(data_root, image_dirs)
        looked = [os.path.join(data_root, p) for p in (released + instances + image_dirs)]
        if ann and not os.path.isabs(ann):
            ann = os.path.join(data_root, ann)
        if inst and not os.path.isabs(inst):
            inst = os.path.join(data_root, inst)
        found = ann or inst
        if (
            not images
            or not found
            or not os.path.exists(found)
            or not os.path.isdir(os.path.join(data_root, images))
        ):
            raise SourceNotFound(self.name, looked)
        inputs = {"annotations": ann} if ann else {"instances": inst}
        if ann and inst:
            inputs["categories"] = inst  # category names for meta only
        return SourceFiles(
            data_root=data_root,
            inputs=inputs,
            dirs={"images": images},
            info={"prompts": "released" if ann else "generated"},
        )

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        prefix = f"{self.name}/{split}"
        kinds = (VAL_SPLITS[split],) if split in VAL_SPLITS else vprompts.PROMPT_TYPES
        if "annotations" in files.inputs:
            yield Shared({**category_table(files.inputs.get("categories")), "form": "released"})
            yield from _dedup(_released_records(files.inputs["annotations"], prefix, kinds))
            return
        keep = ("id", "category_id", "iscrowd", "segmentation")
        yield from iter_coco_records(  # one pass: the category table arrives as Shared before the records
            files.inputs["instances"],
            prefix,
            _image_fields,
            lambda a: {k: a.get(k) for k in keep},
            categories=lambda cats: {"category_names": _names(cats), "form": "generated"},
        )

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        return vgd_sample(self.name, record, ctx, VAL_SPLITS.get(ctx.split))


def _targets(
    record: dict, ctx: ConvertContext, h: int, w: int, pending: list
) -> tuple[list[dict], list[dict]]:
    """Decoded non-crowd targets ``{"ann", "rle", "prompts"}`` and crowd RLEs; bad parts noted in
    ``pending``."""
    names = ctx.shared.get("category_names")
    targets, crowd = [], []
    for ann in record["anns"]:
        akey = f"{record['key']}/ann_{ann.get('id')}"
        cat = ann.get("category_id")
        if not isinstance(cat, int) or isinstance(cat, bool) or (names is not None and str(cat) not in names):
            pending.append(
                (akey, "unknown_category", f"category_id {ann.get('category_id')} not in categories[]")
            )
            continue
        try:
            rle = masks.segmentation_to_rle(
                ann.get("segmentation"), h, w, lambda r, d, k=akey: pending.append((k, r, d))
            )
        except MaskFormatError as e:
            pending.append((akey, e.reason, e.detail))
            continue
        if ann.get("iscrowd"):
            crowd.append(rle)
            continue
        if masks.area(rle) == 0:
            pending.append((akey, "empty_mask", "segmentation covers no pixel"))
            continue
        prompts, bad = {}, {}
        for kind, raw in (ann.get("prompts") or {}).items():  # released form only
            try:
                p = masks.segmentation_to_rle(raw, h, w)
            except MaskFormatError as e:
                pending.append((f"{akey}/{kind}", e.reason, f"{kind} prompt: {e.detail}"))
                bad[kind] = e.reason
                continue
            if masks.area(p) > 0:  # X-SAM drops empty prompts
                prompts[kind] = p
        targets.append({"ann": ann, "rle": rle, "prompts": prompts, "bad": bad})
    return targets, crowd


def _pick_prompt(
    key: str, cands: list[dict], kind: str | None, ctx: ConvertContext, rng, failures: Counter
) -> tuple[dict, str, dict] | None:
    """``(target, type, prompt RLE)`` from the first usable instance of ``cands`` (already shuffled)."""
    for t in cands:
        ann_id = t["ann"].get("id")
        if ctx.shared.get("form") == "released":
            avail = [kind] if kind else [k for k in vprompts.PROMPT_TYPES if k in t["prompts"]]
            avail = [k for k in avail if k in t["prompts"]]
            if not avail:  # the reason of an unreadable prompt if there is one, else "none stored"
                failures[t["bad"].get(kind) or next(iter(t["bad"].values()), "no_visual_prompt")] += 1
                continue
            k = avail[rng.randrange(len(avail))]
            return t, k, t["prompts"][k]
        inst = _analysed(t)
        if inst is None:
            failures[vprompts.PromptTooSmall.reason] += 1
            continue
        k = kind or vprompts.PROMPT_TYPES[rng.randrange(len(vprompts.PROMPT_TYPES))]
        return t, k, vprompts.prompt_rle(inst, k, seed=ctx.options.seed, key=key, ann_id=ann_id)
    return None


def _analysed(t: dict) -> vprompts.InstanceMask | None:
    """The target's mask reduced for prompt drawing (None: too small for any prompt), computed once."""
    if "inst" not in t:
        try:
            t["inst"] = vprompts.analyse(masks.decode(t["rle"]), bbox=masks.bbox(t["rle"]))
        except vprompts.PromptTooSmall:
            t["inst"] = None
    return t["inst"]


def _prompt_pool(key: str, kept: list[dict], ctx: ConvertContext) -> list[PoolPrompt]:
    """Every prompt type of every kept instance (train): what the batch-time draw picks from. The generated
    prompts are seeded as the stored region's (``(seed, key, ann id, type)``), so the region is one of them;
    an instance too small for any prompt has no entry (it stays a target)."""
    pool = []
    for t in kept:
        ann_id = t["ann"].get("id")
        if ctx.shared.get("form") == "released":
            prompts = {k: t["prompts"][k] for k in vprompts.PROMPT_TYPES if k in t["prompts"]}
        else:
            inst = _analysed(t)
            drawn = (
                {}
                if inst is None
                else vprompts.prompt_rles(
                    inst, vprompts.PROMPT_TYPES, seed=ctx.options.seed, key=key, ann_id=ann_id
                )
            )
            prompts = {k: r for k, r in drawn.items() if masks.area(r) > 0}  # as the released form's
        if prompts:
            pool.append(PoolPrompt(category_id=t["ann"]["category_id"], ann_id=ann_id, prompts=prompts))
    return pool


def _choose_prompts(
    key: str, image_id: Any, targets: list[dict], kind: str | None, ctx: ConvertContext, rng, pending: list
) -> dict[int, tuple[dict, str, dict]]:
    """category -> (instance, prompt type, prompt RLE) for each category with an instance that can hold a
    prompt; the instances of a category without one join ``pending`` drops; none at all skips the record."""
    by_cat: dict[int, list[dict]] = {}
    for t in targets:
        by_cat.setdefault(t["ann"]["category_id"], []).append(t)
    chosen: dict[int, tuple[dict, str, dict]] = {}
    failures: Counter = Counter()
    for cat in sorted(by_cat):
        cands = by_cat[cat]
        pick = _pick_prompt(key, rng.sample(cands, len(cands)), kind, ctx, rng, failures)
        if pick is None:
            what = f"no instance of category {cat} can give a {kind or 'visual'} prompt"
            reason = failures.most_common(1)[0][0]
            pending += [(f"{key}/ann_{t['ann'].get('id')}", reason, what) for t in cands]
        else:
            chosen[cat] = pick
    if not chosen:
        reason = failures.most_common(1)[0][0]
        detail = ", ".join(f"{r}: {n}" for r, n in sorted(failures.items()))
        example = next((f"; {k}: {d}" for k, r, d in pending if r == reason), "")
        raise SkipRecord(reason, f"image {image_id}: no instance gives a prompt ({detail}){example}")
    return chosen


def _mask_target(t: dict, label: int) -> MaskTarget:
    rle = t["rle"]
    return MaskTarget(
        rle=rle,
        label=label,
        category_id=t["ann"]["category_id"],
        iscrowd=0,
        bbox=masks.bbox(rle),
        area=_xsam_area(t["ann"].get("segmentation"), rle),
    )


def _xsam_area(segmentation, rle: dict) -> float:
    """The ``area`` X-SAM's ``convert_to_coco_dict`` writes into its VGD ground truth (what COCOeval's area
    ranges read under the ``paper`` protocol): a polygon instance's shoelace area, an RLE's pixel count."""
    if isinstance(segmentation, list):
        # 6 decimals: a shorter JSON number that every JSON reader (Arrow's too) parses to the same double
        return round(masks.polygon_area(segmentation), 6)
    return float(masks.area(rle))


def vgd_sample(source: str, record: dict, ctx: ConvertContext, kind: str | None) -> Sample:
    """One image -> one VGD Sample. ``kind``: the fixed prompt type of a val split, None for train."""
    key, img = record["key"], record["image"]
    h, w = img.get("height"), img.get("width")
    if not h or not w:
        raise SkipRecord("missing_image_size", f"image {img.get('id')} has no height/width")
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        raise SkipRecord("missing_file_name", f"image {img.get('id')} has no file name")
    pending: list[tuple[str, str, str]] = []  # annotation drops, noted only if the record becomes a Sample
    targets, crowd = _targets(record, ctx, h, w, pending)
    if not targets:
        reasons = sorted({r for _, r, _ in pending})
        raise SkipRecord(
            "no_usable_instance",
            f"image {img.get('id')}: no non-crowd instance with a valid mask"
            + (f" ({', '.join(reasons)})" if reasons else ""),
        )
    rng = ctx.rng(key)
    chosen = _choose_prompts(key, img.get("id"), targets, kind, ctx, rng, pending)
    slots = sorted(chosen)
    if kind is None:
        rng.shuffle(slots)  # train: shuffled slots; val: id order, as X-SAM evaluates
    slot = {c: i for i, c in enumerate(slots)}
    for akey, reason, detail in pending:
        ctx.drop(akey, reason, detail)
    kept = [t for t in targets if t["ann"]["category_id"] in slot]
    names = ctx.shared.get("category_names")
    meta = {
        "image_id": img.get("id"),
        "ann_ids": [t["ann"].get("id") for t in kept],
        "slot_category_ids": slots,
        "prompt_ann_ids": [chosen[c][0]["ann"].get("id") for c in slots],
        "prompts": ctx.shared.get("form"),
        "num_crowd": len(crowd),
    }
    if names is not None:
        meta["slot_category_names"] = [names[str(c)] for c in slots]
    return Sample(
        key=key,
        source=source,
        task="vgdseg",
        split=ctx.split,
        image=ImageRef(path=f"{ctx.files.dirs['images']}/{img['file_name']}", width=w, height=h),
        conversation=vgd_conversation(rng, len(slots), ctx.options.image_token),
        phrases=[REGION] * len(slots),
        masks=[_mask_target(t, slot[t["ann"]["category_id"]]) for t in kept],
        ignore=masks.merge_rles(crowd) if crowd else None,
        regions=[Region(label=slot[c], type=chosen[c][1], rle=chosen[c][2]) for c in slots],
        meta=meta,
        prompt_pool=_prompt_pool(key, kept, ctx) if kind is None else [],
    )
