"""Demo COCO-VGD: train as COCO instances (prompts generated at build time), val as X-SAM's released prompt
JSON (``img_vgdseg_coco_val.json``, prompts drawn here with :mod:`pipelines.vprompts`), over drawn scenes.

Train image 1 holds a crowd instance and a 4-pixel instance of its own category (too small for any prompt);
in val, one instance has no scribble prompt, as X-SAM's file can.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from pipelines import masks, vprompts
from pipelines.demo.coco import SUPER, THINGS
from pipelines.demo.draw import jpeg_bytes, make_scene

ROOT = "img_vgdseg/coco_vgd"


def _scene(
    rng: random.Random, base: Path, split: str, image_id: int, size: tuple[int, int]
) -> tuple[dict, list]:
    """Write one image; return its COCO image entry and ``(category_id, HxW bool mask, polygon)`` per
    thing."""
    width, height = size
    fname = f"{image_id:012d}.jpg"
    things = rng.sample(list(THINGS), rng.randint(2, 4))
    things.append(things[0])  # two instances of one category: one region, two targets
    arr, objects = make_scene(rng, width, height, things, ["sky-other-merged", "grass-merged"])
    (base / f"coco2017/{split}2017" / fname).write_bytes(jpeg_bytes(arr))
    image = {"id": image_id, "file_name": fname, "width": width, "height": height, "license": 1}
    return image, [
        (THINGS[o.category], o.mask, o.polygon) for o in objects if o.kind != "stuff" and o.mask.sum() > 30
    ]


def _categories() -> list[dict]:
    return sorted(
        ({"id": i, "name": n, "supercategory": SUPER[n]} for n, i in THINGS.items()), key=lambda c: c["id"]
    )


def write(
    root: Path, rng: random.Random, n_train: int = 6, n_val: int = 3, size: tuple[int, int] = (320, 240)
) -> None:
    base = root / ROOT
    for d in ("annotations", "coco2017/annotations", "coco2017/train2017", "coco2017/val2017"):
        (base / d).mkdir(parents=True, exist_ok=True)
    for split, n, first_id in (("train", n_train, 9), ("val", n_val, 139)):
        images, anns, released = [], [], []
        ann_id = 7000 * first_id
        for i in range(n):
            image, objs = _scene(rng, base, split, first_id + 7 * i, size)
            images.append(image)
            # image 0's objs[1] is the only instance of its category: it gets no scribble prompt
            image_anns, entry = _annotate(split, image, objs, ann_id, no_scribble=1 if i == 0 else None)
            if split == "train" and i == 1:
                image_anns += _crowd_and_tiny(image, objs, ann_id + len(image_anns))
            anns += image_anns
            ann_id += len(image_anns)
            released.append(entry)
        inst = {
            "info": {"description": "xsam demo data (synthetic scenes)", "version": "1.0"},
            "licenses": [{"id": 1, "name": "CC0", "url": ""}],
            "images": images,
            "annotations": anns,
            "categories": _categories(),
        }
        (base / f"coco2017/annotations/instances_{split}2017.json").write_text(json.dumps(inst))
        if split == "val":  # released prompts for val only: train exercises generation
            rng.shuffle(released)  # X-SAM writes the list from an unordered pool
            (base / "annotations/img_vgdseg_coco_val.json").write_text(json.dumps(released))


def _annotate(
    split: str, image: dict, objs: list, ann_id: int, no_scribble: int | None
) -> tuple[list[dict], dict]:
    """COCO instance annotations of one image (ids after ``ann_id``) and its entry in X-SAM's released prompt
    file (the same annotations with RLE masks and their visual prompts)."""
    entry = {
        "image_file": image["file_name"],
        "image_id": image["id"],
        "image_size": [image["height"], image["width"]],
        "image_info": {k: image[k] for k in ("id", "file_name", "height", "width")},
        "annotations": [],
    }
    anns = []
    for j, (cat, m, poly) in enumerate(objs):
        rle = masks.encode(m)[0]
        a = {
            "id": ann_id + j + 1,
            "image_id": image["id"],
            "category_id": cat,
            "iscrowd": 0,
            "segmentation": [[round(v, 2) for v in poly]],
            "area": float(m.sum()),
            "bbox": masks.bbox(rle),
        }
        anns.append(a)
        kinds = [k for k in vprompts.PROMPT_TYPES if not (j == no_scribble and k == "scribble")]
        vps = vprompts.prompt_rles(m, kinds, seed=0, key=f"demo/{split}/{image['id']}", ann_id=a["id"])
        entry["annotations"].append(
            {
                **a,
                "segmentation": rle,
                "bbox_mode": 1,
                "visual_prompts": {f"{k}_visual_prompt": v for k, v in vps.items()},
            }
        )
    return anns, entry


def _crowd_and_tiny(image: dict, objs: list, ann_id: int) -> list[dict]:
    """A crowd instance of the first thing's category and a 4-pixel instance of an absent one (too small
    for any prompt), ids ``ann_id + 1`` and ``ann_id + 2``."""
    crowd = np.zeros((image["height"], image["width"]), dtype=np.uint8)
    crowd[5:40, 5:60] = 1
    counts = masks.encode(crowd)[0]  # a crowd region (compressed RLE is fine for the reader)
    tiny_cat = next(c for c in THINGS.values() if c not in {o[0] for o in objs})
    return [
        {
            "id": ann_id + 1,
            "image_id": image["id"],
            "category_id": objs[0][0],
            "iscrowd": 1,
            "segmentation": counts,
            "area": float(crowd.sum()),
            "bbox": [5, 5, 55, 35],
        },
        {
            "id": ann_id + 2,
            "image_id": image["id"],
            "category_id": tiny_cat,
            "iscrowd": 0,
            "segmentation": [[300.0, 220.0, 302.0, 220.0, 302.0, 222.0, 300.0, 222.0]],
            "area": 4.0,
            "bbox": [300, 220, 2, 2],
        },
    ]
