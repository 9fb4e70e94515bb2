"""``lisa_reasonseg``: LISA ReasonSeg (task reaseg) from per-image LabelMe-style JSON files.

Layout (recipe §1.1): ``img_reaseg/lisa/{train,val,test}/<name>.jpg`` + ``<name>.json`` and
``img_reaseg/lisa/explanatory/train.json`` (the raw ``ReasonSeg/`` folder inside it is found too). A JSON
holds ``text`` (the questions), ``is_sentence`` and ``shapes[{label, points}]``.

Mask (LISA ``get_mask_from_json``, X-SAM ``ImgReaSegDataset``): ``flag`` shapes are skipped; the others are
rasterised (``cv2.fillPoly`` + 1-px outline, int coordinates) and painted largest first, so a smaller shape
lying on a larger one wins; shapes whose label contains ``ignore`` paint the ignore value, the rest paint
the target. Target pixels are every turn's mask; ignore pixels are the Sample's ``ignore`` RLE. An image whose
target is empty is skipped (``empty_mask``).

Conversation (recipe §2.5): train = one sample per image, one turn per question, every turn's mask the same
(labels 0..N-1); if the image has an explanation, each turn independently (``rng.random() < 0.5`` with the
sample's seeded RNG) asks for it and answers ``<explanation> <SEG>-suffix``; the explanation is also kept in
``meta["explanation"]`` so each later use re-flips every turn's coin (:mod:`pipelines.loader.redraw`). Under
the source option ``lisa_unexplained=skip`` (the ``paper`` preset) a train image with no explanation entry,
while the explanatory file has some, is skipped as ``no_explanation``, as X-SAM's archive loses it to a
``KeyError`` inside a ``try`` (there only when its load batch of >= 32 images holds an explained one: the
batches follow ``os.listdir`` order, which no build can reproduce). Eval splits = one sample per
question, no explanations. ``meta.is_sentence`` / ``meta.query_type`` ("sentence" | "phrase") keep the query
type used to split the test set into long and short queries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import cv2
import numpy as np

from pipelines import masks, templates, validate
from pipelines.images import DECODER_ERRORS, image_size
from pipelines.schema import ImageRef, MaskTarget, Sample, Turn
from pipelines.sources.base import (
    BuildOptions,
    ConvertContext,
    Shared,
    Skip,
    SkipRecord,
    SourceFiles,
    SourceNotFound,
    key_id,
    relpath,
)
from pipelines.sources.readers.jsonstream import load_small

LISA_ROOTS = ("img_reaseg/lisa", "img_reaseg/lisa/ReasonSeg")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
TARGET, IGNORE = 1, 255


def _read_json(path: str) -> dict:
    """LISA's reader falls back to cp1252 for a few files that are not UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    if validate.too_deep(raw):
        raise ValueError(f"JSON nested deeper than {validate.MAX_DEPTH} levels")
    for enc in ("utf-8", "cp1252"):
        try:
            return json.loads(raw.decode(enc))
        except UnicodeDecodeError:
            continue
    raise ValueError("neither UTF-8 nor cp1252 text")


def _shape_polygon(shape: dict, height: int, width: int) -> np.ndarray:
    """``Nx2`` int32 points of a shape (a LabelMe rectangle's 2 corners become 4); ``bad_polygon`` if < 3,
    ``bad_coordinate`` for a point that is not a finite number near the image (before OpenCV sees it)."""
    pts = shape.get("points")
    if not isinstance(pts, list) or not all(isinstance(p, list) and len(p) == 2 for p in pts):
        raise SkipRecord("bad_polygon", f"points are not [x, y] pairs: {str(pts)[:80]}")
    if shape.get("shape_type") == "rectangle" and len(pts) == 2:
        (x0, y0), (x1, y1) = pts
        pts = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    if len(pts) < 3:
        raise SkipRecord("bad_polygon", f"polygon with {len(pts)} points (need >= 3)")
    flat = validate.check_polygons([[v for p in pts for v in p]], height, width)[0]
    return np.asarray(flat, dtype=np.float64).reshape(-1, 2).astype(np.int32)  # LISA truncates the same way


def _fill(poly: np.ndarray, out: np.ndarray, value: int) -> None:
    cv2.polylines(out, [poly], True, value, 1)
    cv2.fillPoly(out, [poly], value)


def paint_shapes(
    shapes: list[dict], height: int, width: int, ctx: ConvertContext, key: str
) -> tuple[np.ndarray, dict]:
    """The ``HxW`` uint8 label map (0, :data:`TARGET`, :data:`IGNORE`) and shape counts; bad shapes
    dropped."""
    polys, counts = [], {"flag": 0, "ignore": 0, "target": 0}
    for i, shape in enumerate(shapes):
        label = str(shape.get("label", "")) if isinstance(shape, dict) else ""
        if label.lower() == "flag":  # LISA: "meaningless deprecated annotations"
            counts["flag"] += 1
            continue
        try:
            poly = _shape_polygon(shape if isinstance(shape, dict) else {}, height, width)
        except SkipRecord as e:
            ctx.drop(f"{key}/shape_{i}", e.reason, e.detail)
            continue
        tmp = np.zeros((height, width), np.uint8)
        _fill(poly, tmp, 1)
        value = IGNORE if "ignore" in label.lower() else TARGET
        counts["ignore" if value == IGNORE else "target"] += 1
        polys.append((-int(tmp.sum()), i, poly, value))
    label_map = np.zeros((height, width), np.uint8)
    for _, _, poly, value in sorted(polys, key=lambda p: p[:2]):  # largest first; ties in file order
        _fill(poly, label_map, value)
    return label_map, counts


class LisaReasonSeg:
    """LISA ReasonSeg train/val/test folders -> reaseg Samples."""

    name = "lisa_reasonseg"
    task = "reaseg"
    path_roles = ("images", "explanatory")
    splits = ("train", "val", "test")
    version = 2  # 2: train samples carry meta["explanation"]

    def locate(self, data_root: str, split: str, overrides: dict | None = None) -> SourceFiles:
        o = overrides or {}
        looked = []
        folder = o.get("images")
        if folder is None:
            for r in LISA_ROOTS:
                looked.append(os.path.join(data_root, r, split))
                if os.path.isdir(looked[-1]):
                    folder = f"{r}/{split}"
                    break
        elif os.path.isabs(folder):
            folder = os.path.relpath(folder, data_root)
        if folder is None or not os.path.isdir(os.path.join(data_root, folder)):
            raise SourceNotFound(self.name, looked or [os.path.join(data_root, str(folder))])
        inputs = {"annotations": os.path.join(data_root, folder)}  # hashed as a folder listing
        explanatory = o.get("explanatory") or os.path.join(
            data_root, os.path.dirname(folder), "explanatory", "train.json"
        )
        if split == "train" and os.path.isfile(explanatory):
            inputs["explanatory"] = explanatory
        return SourceFiles(
            data_root=data_root,
            inputs=inputs,
            dirs={"images": folder},
            info={"explanatory": "explanatory" in inputs},
        )

    def index(self, files: SourceFiles, split: str, options: BuildOptions) -> Iterator[dict | Skip | Shared]:
        prefix = f"{self.name}/{split}"
        folder = files.inputs["annotations"]
        explain = self._explanations(files.inputs.get("explanatory"))
        records = []
        skip_unexplained = options.extra.lisa_unexplained == "skip" and bool(explain)
        for stem, found in _pair_files(folder).items():
            key = f"{prefix}/{key_id(stem)}"
            paired = "image" in found and "json" in found
            if skip_unexplained and split == "train" and paired and found["image"] not in explain:
                yield Skip(
                    key, "no_explanation", f"{found.get('image')} has no explanatory entry (paper preset)"
                )
                continue
            made = _stem_records(key, stem, found, folder, split, explain)
            if isinstance(made, Skip):
                yield made
            else:
                records += made
        last = ""
        for r in sorted(records, key=lambda r: r["key"]):
            if r["key"] == last:  # two file names that differ only in characters a key cannot hold
                yield Skip(r["key"], "duplicate_key", f"{r['image']['file']} maps to an existing key")
                continue
            last = r["key"]
            yield r

    @staticmethod
    def _explanations(path: str | None) -> dict[str, str]:
        """``explanatory/train.json``: image file name -> explanation text (``outputs``)."""
        if not path:
            return {}
        items = load_small(path)
        out = {}
        for it in items if isinstance(items, list) else []:
            if isinstance(it, dict) and isinstance(it.get("outputs"), str) and it["outputs"].strip():
                out[str(it.get("image"))] = " ".join(it["outputs"].split())
        return out

    def to_sample(self, record: dict, ctx: ConvertContext) -> Sample:
        key, img = record["key"], record["image"]
        path = relpath(ctx.files.dirs["images"], img["file"])
        h, w = img.get("height"), img.get("width")
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            try:  # not in the JSON: read it from the image header
                h, w = image_size(
                    ctx.read_bytes(
                        path, missing_reason="missing_image", max_bytes=ctx.options.max_image_bytes
                    )
                )
            except DECODER_ERRORS as e:
                raise SkipRecord("corrupt_image", f"{img['file']}: {e}") from None
        h = validate.check_int(h, f"{img['file']} height", 1, validate.MAX_SIDE, "bad_image_size")
        w = validate.check_int(w, f"{img['file']} width", 1, validate.MAX_SIDE, "bad_image_size")
        if h * w > ctx.options.max_image_pixels:  # the label map below is h*w bytes: refuse before painting
            raise SkipRecord(
                "image_too_large", f"{img['file']}: {w}x{h} > {ctx.options.max_image_pixels} pixels"
            )
        label_map, counts = paint_shapes(record["shapes"], h, w, ctx, key)
        target = label_map == TARGET
        if not target.any():
            raise SkipRecord("empty_mask", f"{img['file']}: no target pixel ({counts})")
        rle = masks.encode(target)[0]
        ignore = masks.encode(label_map == IGNORE)[0] if (label_map == IGNORE).any() else None
        rng = ctx.rng(key)
        conversation, explained = [], []
        for i, q in enumerate(record["questions"]):
            question, answer, explains = self._turn(
                rng, templates.tag(q), record["is_sentence"], record["explanation"]
            )
            explained.append(explains)
            conversation.append(
                Turn("user", templates.with_image(question, ctx.options.image_token) if i == 0 else question)
            )
            conversation.append(Turn("assistant", answer))
        box, area = masks.bbox(rle), float(masks.area(rle))
        meta = {
            "image": img["file"],
            "is_sentence": record["is_sentence"],
            "query_type": "sentence" if record["is_sentence"] else "phrase",
            "explained": explained,
            "shapes": counts,
        }
        if record["explanation"]:  # so every later use can re-draw it (pipelines/loader/redraw.py)
            meta["explanation"] = record["explanation"]
        if "question_index" in record:
            meta["question_index"] = record["question_index"]
        return Sample(
            key=key,
            source=self.name,
            task=self.task,
            split=ctx.split,
            image=ImageRef(path=path, width=w, height=h),
            conversation=conversation,
            phrases=list(record["questions"]),
            masks=[
                MaskTarget(rle=rle, label=i, bbox=box, area=area) for i in range(len(record["questions"]))
            ],
            ignore=ignore,
            meta=meta,
        )

    @staticmethod
    def _turn(rng, sent: str, is_sentence: bool, explanation: str | None) -> tuple[str, str, bool]:
        """One (question, answer, explained); with an explanation, a 0.5 draw per turn decides whether to ask
        for it (X-SAM hard-codes 0.5)."""
        if explanation and rng.random() < 0.5:
            q = templates.pick(rng, templates.REASEG_EXPLAIN_QUESTIONS).format(sent=sent)
            return q, f"{explanation} {templates.pick(rng, templates.REASEG_EXPLAIN_SUFFIXES)}", True
        pool = templates.REASEG_LONG_QUESTIONS if is_sentence else templates.REASEG_SHORT_QUESTIONS
        return templates.pick(rng, pool).format(sent=sent), templates.pick(rng, templates.SEG_ANSWERS), False


def _pair_files(folder: str) -> dict[str, dict[str, str]]:
    """stem -> {"json": name, "image": name} of the files in a LISA split folder (first image extension
    wins)."""
    stems: dict[str, dict[str, str]] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() == ".json":
            stems.setdefault(stem, {})["json"] = name
        elif ext.lower() in IMAGE_EXTS:
            stems.setdefault(stem, {}).setdefault("image", name)
    return stems


def _stem_records(
    key: str, stem: str, found: dict[str, str], folder: str, split: str, explain: dict
) -> list[dict] | Skip:
    """The records of one image (train: one with every question; eval: one per question), or why none."""
    if "json" not in found:
        return Skip(key, "missing_annotation", f"{found['image']} has no {stem}.json")
    if "image" not in found:
        return Skip(key, "missing_image", f"{found['json']} has no image beside it")
    try:
        anno = _read_json(os.path.join(folder, found["json"]))
        if not isinstance(anno, dict):
            raise ValueError(f"top level is a {type(anno).__name__}")
    except ValueError as e:
        return Skip(key, "malformed_json", f"{found['json']}: {e}")
    text = anno.get("text")
    questions = [" ".join(str(q).split()) for q in ([text] if isinstance(text, str) else text or [])]
    questions = [q for q in questions if q]
    if not questions:
        return Skip(key, "no_questions", f"{found['json']}: empty 'text'")
    base = {
        "image": {"file": found["image"], "height": anno.get("imageHeight"), "width": anno.get("imageWidth")},
        "is_sentence": bool(anno.get("is_sentence")),
        "shapes": [
            {k: s.get(k) for k in ("label", "points", "shape_type")} if isinstance(s, dict) else s
            for s in anno.get("shapes") or []
        ],
    }
    if split == "train":
        return [{"key": key, **base, "questions": questions, "explanation": explain.get(found["image"])}]
    return [
        {"key": f"{key}_q{i:03d}", **base, "questions": [q], "question_index": i, "explanation": None}
        for i, q in enumerate(questions)
    ]
