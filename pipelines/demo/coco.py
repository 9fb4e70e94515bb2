"""Demo COCO 2017: panoptic JSON + PNGs and instances JSON (polygons, one crowd RLE) over drawn scenes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from pipelines.demo.draw import id2rgb, jpeg_bytes, make_scene, png_bytes

# a subset of the real COCO panoptic categories, real ids and names
THINGS = {"person": 1, "bicycle": 2, "car": 3, "cat": 17, "dog": 18, "bus": 6}
STUFF = {"sky-other-merged": 187, "grass-merged": 193, "wall-other-merged": 199, "road": 149}
SUPER = {
    "person": "person",
    "bicycle": "vehicle",
    "car": "vehicle",
    "bus": "vehicle",
    "cat": "animal",
    "dog": "animal",
}
ROOT = "img_genseg/coco2017"


def categories(panoptic: bool) -> list[dict]:
    cats = [{"id": i, "name": n, "supercategory": SUPER[n], "isthing": 1} for n, i in THINGS.items()]
    if panoptic:
        cats += [
            {"id": i, "name": n, "supercategory": n.split("-")[0], "isthing": 0} for n, i in STUFF.items()
        ]
    else:
        for c in cats:
            del c["isthing"]
    return sorted(cats, key=lambda c: c["id"])


def write(
    root: Path, rng: random.Random, n_train: int = 8, n_val: int = 4, size: tuple[int, int] = (320, 240)
) -> None:
    base = root / ROOT
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n, first_id in (("train", n_train, 9), ("val", n_val, 139)):
        (base / f"{split}2017").mkdir(exist_ok=True)
        (base / f"panoptic_{split}2017").mkdir(exist_ok=True)
        images, pan_anns, inst_anns = [], [], []
        for i in range(n):
            # image 1's front-most thing is a crowd region; annotation ids count up from 1000 * first_id
            image, pan, insts = _write_image(
                base, split, rng, first_id + 7 * i, i == 1, size, 1000 * first_id + len(inst_anns)
            )
            images.append(image)
            pan_anns.append(pan)
            inst_anns += insts
        _write_annotations(base, split, images, pan_anns, inst_anns)


def _write_image(
    base: Path, split: str, rng: random.Random, image_id: int, crowd: bool, size: tuple[int, int], ann_id: int
) -> tuple[dict, dict, list[dict]]:
    """One drawn scene: its JPEG and panoptic PNG on disk; returns its image entry, panoptic annotation and
    instance annotations (ids after ``ann_id``)."""
    width, height = size
    fname = f"{image_id:012d}.jpg"
    things = rng.sample(list(THINGS), rng.randint(2, 4))
    stuff = rng.sample(list(STUFF), 2)
    arr, objects = make_scene(rng, width, height, things, stuff)
    (base / f"{split}2017" / fname).write_bytes(jpeg_bytes(arr))
    image = {
        "id": image_id,
        "file_name": fname,
        "width": width,
        "height": height,
        "license": 1,
        "coco_url": f"http://images.cocodataset.org/{split}2017/{fname}",
    }
    id_map = np.zeros((height, width), dtype=np.int64)
    segments, insts = [], []
    crowd_index = len(objects) - 1 if crowd else -1
    for k, obj in enumerate(objects):
        if not obj.mask.any():
            continue
        cat = STUFF.get(obj.category) or THINGS[obj.category]
        seg_id = cat + 256 * (k + 1)  # any unique non-zero id; the PNG stores it in RGB
        id_map[obj.mask] = seg_id
        rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
        bbox = [int(v) for v in mask_utils.toBbox(rle)]
        iscrowd = int(k == crowd_index)
        area = int(obj.mask.sum())
        segments.append({"id": seg_id, "category_id": cat, "area": area, "bbox": bbox, "iscrowd": iscrowd})
        if obj.kind != "stuff":
            ann_id += 1
            segm = _crowd_rle(obj.mask) if iscrowd else [[round(v, 2) for v in obj.polygon]]
            insts.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat,
                    "iscrowd": iscrowd,
                    "segmentation": segm,
                    "area": float(obj.mask.sum()),
                    "bbox": bbox,
                }
            )
    png_name = fname.replace(".jpg", ".png")
    (base / f"panoptic_{split}2017" / png_name).write_bytes(png_bytes(id2rgb(id_map)))
    return image, {"image_id": image_id, "file_name": png_name, "segments_info": segments}, insts


def _crowd_rle(mask: np.ndarray) -> dict:
    """COCO stores crowd regions as uncompressed RLE (column-major run lengths, starting with a 0 run)."""
    height, width = mask.shape
    m = np.asfortranarray(mask.astype(np.uint8)).flatten(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], m, [1 - m[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"counts": [int(c) for c in counts], "size": [height, width]}


def _write_annotations(base: Path, split: str, images: list, pan_anns: list, inst_anns: list) -> None:
    info = {"description": "xsam demo data (synthetic scenes)", "version": "1.0"}
    licenses = [{"id": 1, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
    pan = {
        "info": info,
        "licenses": licenses,
        "images": images,
        "annotations": pan_anns,
        "categories": categories(panoptic=True),
    }
    inst = {
        "info": info,
        "licenses": licenses,
        "images": images,
        "annotations": inst_anns,
        "categories": categories(panoptic=False),
    }
    (base / "annotations" / f"panoptic_{split}2017.json").write_text(json.dumps(pan))
    (base / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(inst))
