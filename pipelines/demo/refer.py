"""Demo RefCOCO / RefCOCO+ / RefCOCOg / gRefCOCO in the refer format, over drawn COCO-train2014 images.

``img_refseg/refcocos/{refcoco,refcoco+,refcocog,grefcoco}/{refs(unc|umd).p, instances.json}`` and
``img_refseg/refcocos/images/train2014/COCO_train2014_<id>.jpg``. The refs pickles are written the way
Python 2 ``cPickle`` (protocol 2) wrote the real ones: byte strings as ``SHORT_BINSTRING``, no globals; each
ref carries the decoy ``COCO_train2014_<id>_<N>.jpg`` file name. Every split is present; some eval images
share their id with demo COCO train2017 images (:mod:`pipelines.demo.coco` uses ids ``9 + 7 i``), so the
eval-leakage guard has something to remove; gRefCOCO has multi-target and no-target expressions.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from pipelines.demo.draw import jpeg_bytes, make_scene

ROOT = "img_refseg/refcocos"
THINGS = {"person": 1, "car": 3, "dog": 18, "cat": 17, "bus": 6}
COLOURS = ["red", "yellow", "blue", "purple", "teal", "orange"]  # draw.THING_COLOURS, in order
# image id -> split per split_by. 16 and 30 are also demo COCO train2017 ids (the leak to remove).
IMAGES = {9: "train", 100001: "train", 100002: "train", 16: "val", 30: "testA", 100003: "testB"}
UMD = {"train": "train", "val": "val", "testA": "test", "testB": "test"}


# ---------------------------------------------------------------- a Python-2 cPickle (protocol 2) writer
def dumps_py2(obj) -> bytes:
    """Pickle plain data exactly as Python 2 ``cPickle.dumps(obj, 2)`` would, strings as 8-bit ``str``."""
    out = bytearray(b"\x80\x02")
    memo = [0]

    def put() -> None:
        memo[0] += 1
        out.extend(b"q" + bytes([memo[0]]) if memo[0] < 256 else b"r" + struct.pack("<I", memo[0]))

    def w(x) -> None:
        if x is None:
            out.extend(b"N")
        elif x is True or x is False:
            out.extend(b"\x88" if x else b"\x89")
        elif isinstance(x, int):
            if 0 <= x < 256:
                out.extend(b"K" + bytes([x]))
            elif 0 <= x < 65536:
                out.extend(b"M" + struct.pack("<H", x))
            elif -(2**31) <= x < 2**31:
                out.extend(b"J" + struct.pack("<i", x))
            else:
                raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
                out.extend(b"\x8a" + bytes([len(raw)]) + raw)
        elif isinstance(x, float):
            out.extend(b"G" + struct.pack(">d", x))
        elif isinstance(x, str):
            b = x.encode("utf-8")  # Python 2 str: the bytes, undecoded
            out.extend((b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b)
            put()
        elif isinstance(x, list):
            out.extend(b"]")
            put()
            if x:
                out.extend(b"(")
                for v in x:
                    w(v)
                out.extend(b"e")
        elif isinstance(x, dict):
            out.extend(b"}")
            put()
            if x:
                out.extend(b"(")
                for k, v in x.items():
                    w(k)
                    w(v)
                out.extend(b"u")
        else:
            raise TypeError(f"demo pickler: {type(x).__name__}")

    w(obj)
    return bytes(out + b".")


# ---------------------------------------------------------------- scenes and sentences
def _where(poly: list[float], width: int) -> str:
    cx = sum(poly[0::2]) / (len(poly) // 2)
    return "left" if cx < width / 3 else "right" if cx > 2 * width / 3 else "middle"


def _sentences(style: str, colour: str, cat: str, where: str) -> list[str]:
    if style == "refcoco":  # short, with location words
        # the last two are one sentence once lower-cased
        return [
            f"{colour} {cat} {where}",
            f"the {cat} on the {where}",
            f"The {colour.upper()} {cat}",
            f"the {colour} {cat}",
        ]
    if style == "refcoco+":  # appearance only
        return [f"{colour} {cat}", f"the {colour} one"]
    return [f"a {colour} {cat} that is in the {where} part of the picture"]  # refcocog: longer


def _sent_entries(texts: list[str], next_id: list[int]) -> list[dict]:
    out = []
    for t in texts:
        out.append({"tokens": t.lower().split(), "raw": t, "sent_id": next_id[0], "sent": t})
        next_id[0] += 1
    return out


def write(root: Path, rng: random.Random, size: tuple[int, int] = (320, 240)) -> None:
    base = root / ROOT
    img_dir = base / "images" / "train2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    width, height = size
    images, anns, objects = [], [], {}  # objects: image id -> [(ann, colour, category, where)]
    ann_id = 5000
    for j, image_id in enumerate(sorted(IMAGES)):
        things = rng.sample(list(THINGS), 3)
        if j == 0:
            things = ["person", "person", "dog"]  # two objects that get the same sentence
        arr, objs = make_scene(rng, width, height, things, ["sky", "grass"])
        fname = f"COCO_train2014_{image_id:012d}.jpg"
        (img_dir / fname).write_bytes(jpeg_bytes(arr))
        images.append(
            {
                "id": image_id,
                "file_name": fname,
                "width": width,
                "height": height,
                "license": 1,
                "coco_url": f"http://images.cocodataset.org/train2014/{fname}",
            }
        )
        objects[image_id] = []
        for k, obj in enumerate(o for o in objs if o.kind != "stuff"):
            if not obj.mask.any():
                continue
            ann_id += 1
            rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
            ann = {
                "id": ann_id,
                "image_id": image_id,
                "category_id": THINGS[obj.category],
                "iscrowd": 0,
                "segmentation": [[round(v, 2) for v in obj.polygon]],
                "area": float(obj.mask.sum()),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            }
            anns.append(ann)
            objects[image_id].append(
                (ann, COLOURS[k % len(COLOURS)], obj.category, _where(obj.polygon, width))
            )
    cats = [{"id": i, "name": n, "supercategory": n} for n, i in sorted(THINGS.items(), key=lambda kv: kv[1])]
    instances = json.dumps({"images": images, "annotations": anns, "categories": cats})
    for dataset in ("refcoco", "refcoco+", "refcocog", "grefcoco"):
        d = base / dataset
        d.mkdir(exist_ok=True)
        (d / "instances.json").write_text(instances)
        refs = _grefs(objects) if dataset == "grefcoco" else _refs(dataset, objects)
        name = "refs(umd).p" if dataset == "refcocog" else "refs(unc).p"
        (d / name).write_bytes(dumps_py2(refs))


def _ref(ref_id: int, image_id: int, ann_id, cat, split: str, k: int, sents: list[dict]) -> dict:
    return {
        "sent_ids": [s["sent_id"] for s in sents],
        "file_name": f"COCO_train2014_{image_id:012d}_{k}.jpg",
        "ann_id": ann_id,
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split,
        "sentences": sents,
        "category_id": cat,
    }


def _refs(style: str, objects: dict) -> list[dict]:
    refs, sid = [], [0]
    for image_id, objs in objects.items():
        split = UMD[IMAGES[image_id]] if style == "refcocog" else IMAGES[image_id]
        for k, (ann, colour, cat, where) in enumerate(objs):
            texts = _sentences(style, colour, cat, where)
            if image_id == 9 and cat == "person":
                texts = ["a person", *texts[1:]]  # both persons of image 9 share this sentence
            refs.append(
                _ref(len(refs), image_id, ann["id"], ann["category_id"], split, k, _sent_entries(texts, sid))
            )
    return refs


def _grefs(objects: dict) -> list[dict]:
    """gRefCOCO: one ref per object, one multi-target ref and one no-target ref per image."""
    refs, sid = [], [0]
    for image_id, objs in objects.items():
        split = IMAGES[image_id]
        for k, (ann, colour, cat, _) in enumerate(objs):
            refs.append(
                _ref(
                    len(refs),
                    image_id,
                    [ann["id"]],
                    [ann["category_id"]],
                    split,
                    k,
                    _sent_entries([f"{colour} {cat}"], sid),
                )
            )
        if len(objs) < 2:
            continue
        ids = [a["id"] for a, *_ in objs[:2]]
        refs.append(
            _ref(
                len(refs),
                image_id,
                ids,
                [a["category_id"] for a, *_ in objs[:2]],
                split,
                len(objs),
                _sent_entries([f"the {objs[0][2]} and the {objs[1][2]}"], sid),
            )
        )
    for image_id in objects:
        split = IMAGES[image_id]
        no_target = _ref(
            len(refs), image_id, [-1], [-1], split, 99, _sent_entries(["the green giraffe"], sid)
        )
        refs.append({**no_target, "no_target": True})
    return refs
