"""Demo LVIS v1: ``img_ovseg/lvis/lvis_v1_{train,val}.json`` over drawn scenes in ``img_genseg/coco2017``.

As in the real v1 files: no ``file_name`` (paths come from ``coco_url``), the first val image lives in
``train2017/``, annotations are polygons without ``iscrowd``, every image has ``neg_category_ids`` and
``not_exhaustive_category_ids``, and ``images`` comes after ``annotations`` in the file. Category names and
synonyms are real LVIS ones (including two that X-SAM's cleaning makes collide, 'bow'); ids are renumbered.
Image ids start at 900001 so they never meet the COCO demo's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pycocotools import mask as mask_utils

from pipelines.demo.draw import jpeg_bytes, make_scene

ROOT = "img_ovseg/lvis"
COCO_ROOT = "img_genseg/coco2017"
# (name, synonyms, frequency)
CATEGORIES = [
    ("aerosol_can", ["aerosol_can", "spray_can"], "c"),
    ("apple", ["apple"], "f"),
    ("backpack", ["backpack", "knapsack", "packsack", "rucksack", "haversack"], "f"),
    ("banana", ["banana"], "f"),
    ("bow_(weapon)", ["bow_(weapon)"], "r"),
    ("bow_(decorative_ribbons)", ["bow_(decorative_ribbons)"], "f"),
    ("cat", ["cat"], "f"),
    ("dog", ["dog"], "f"),
    ("mouse_(computer_equipment)", ["mouse_(computer_equipment)", "computer_mouse"], "f"),
    ("teddy_bear", ["teddy_bear"], "f"),
    ("traffic_light", ["traffic_light"], "f"),
    ("umbrella", ["umbrella"], "f"),
]


def categories() -> list[dict]:
    return [
        {
            "id": i + 1,
            "name": n,
            "synonyms": syn,
            "synset": f"{n.split('_(')[0]}.n.01",
            "def": n.replace("_", " "),
            "frequency": f,
            "image_count": 1,
            "instance_count": 1,
        }
        for i, (n, syn, f) in enumerate(CATEGORIES)
    ]


def write(
    root: Path, rng: random.Random, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (320, 240)
) -> None:
    cats = categories()
    by_name = {c["name"]: c["id"] for c in cats}
    (root / ROOT).mkdir(parents=True, exist_ok=True)
    ann_id = 0
    for split, n, first_id in (("train", n_train, 900001), ("val", n_val, 900101)):
        images, anns = [], []
        for i in range(n):
            folder = (
                "train2017" if split == "train" or i == 0 else "val2017"
            )  # v1 val images live in train2017 too
            image, image_anns = _write_image(root, rng, folder, first_id + i, by_name, ann_id, size)
            ann_id += len(image_anns)
            images.append(image)
            anns += image_anns
        doc = {
            "info": {"description": "xsam demo LVIS v1 (synthetic scenes)", "version": "1.0"},
            "annotations": anns,
            "images": images,
            "licenses": [
                {"id": 1, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
            ],
            "categories": cats,
        }
        (root / ROOT / f"lvis_v1_{split}.json").write_text(json.dumps(doc))


def _write_image(
    root: Path,
    rng: random.Random,
    folder: str,
    image_id: int,
    by_name: dict[str, int],
    ann_id: int,
    size: tuple[int, int],
) -> tuple[dict, list[dict]]:
    """One drawn scene's JPEG under COCO's ``folder``; returns its LVIS image entry and annotations (ids after
    ``ann_id``)."""
    width, height = size
    fname = f"{image_id:012d}.jpg"
    things = rng.sample(list(by_name), 3)
    things.append(things[0])  # two instances of one category
    arr, objects = make_scene(rng, width, height, things, ["sky", "grass"])
    (root / COCO_ROOT / folder).mkdir(parents=True, exist_ok=True)
    (root / COCO_ROOT / folder / fname).write_bytes(jpeg_bytes(arr))
    anns = []
    for obj in objects:
        if obj.kind == "stuff" or not obj.mask.any():
            continue
        poly = [round(v, 2) for v in obj.polygon]
        rle = mask_utils.merge(mask_utils.frPyObjects([poly], height, width))
        anns.append(
            {
                "id": ann_id + len(anns) + 1,
                "image_id": image_id,
                "category_id": by_name[obj.category],
                "segmentation": [poly],
                "area": float(mask_utils.area(rle)),
                "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
            }
        )
    present = {a["category_id"] for a in anns}
    absent = sorted(set(by_name.values()) - present)
    neg = rng.sample(absent, 3)
    # one present category is incompletely annotated; one absent one is flagged too, so a prompt that drew
    # negatives from it would be caught
    not_exhaustive = [min(present), next(c for c in absent if c not in neg)]
    image = {
        "id": image_id,
        "width": width,
        "height": height,
        "license": 1,
        "coco_url": f"http://images.cocodataset.org/{folder}/{fname}",
        "flickr_url": f"http://farm1.staticflickr.com/demo/{image_id}.jpg",
        "date_captured": "2013-11-14 16:28:13",
        "neg_category_ids": neg,
        "not_exhaustive_category_ids": not_exhaustive,
    }
    return image, anns
