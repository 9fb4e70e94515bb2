"""Demo ADE20K (ADEChallengeData2016 renamed ``img_ovseg/ade20k``): images, raw label PNGs, instance PNGs.

Label PNGs are uint8 mode L (0 = other, 1..150 = class); instance PNGs are RGB with R = Instance100 class,
G = instance id, B = 0, exactly as the ADE20K downloads. Each scene has an unlabelled strip (value 0), and
the second image of each split has a thing whose instance was not annotated (class pixels, no instance).

:func:`write_mask2former_files` derives Mask2Former's prepared files from the raw ones (what
``prepare_ade20k_{pan,sem,ins}_seg.py`` write), so tests can check that both layouts give the same Samples.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.demo.draw import id2rgb, jpeg_bytes, make_scene, png_bytes
from pipelines.sources.ade20k import NUM_CLASSES, SPLIT_DIRS, class_names, instance_to_class, thing_classes

ROOT = "img_ovseg/ade20k"
STUFF = ["wall", "sky", "floor", "grass", "road"]
THINGS = ["person", "car", "chair", "table", "bed"]
UNLABELLED_STRIP = 6  # pixels of value 0 along the left edge


def _value(name: str) -> int:
    """Raw label value (1-based) of a class name."""
    return class_names().index(name) + 1


def _instance_class(name: str) -> int:
    """Instance100 id (the R value) of a thing class name."""
    cls = class_names().index(name)
    return min(k for k, v in instance_to_class().items() if v == cls)


def write(
    root: Path, rng: random.Random, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (320, 240)
) -> None:
    base = root / ROOT
    width, height = size
    for split, n in (("train", n_train), ("val", n_val)):
        sd = SPLIT_DIRS[split]
        for sub in ("images", "annotations", "annotations_instance"):
            (base / sub / sd).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            stem = f"ADE_{split}_{i + 1:08d}"
            things = rng.sample(THINGS, rng.randint(2, 3))
            arr, objects = make_scene(rng, width, height, things, rng.sample(STUFF, 2))
            sem = np.zeros((height, width), dtype=np.uint8)
            inst = np.zeros((height, width, 3), dtype=np.uint8)
            n_inst = 0
            for k, obj in enumerate(objects):
                sem[obj.mask] = _value(obj.category)
                unannotated = i == 1 and k == len(objects) - 1
                if obj.kind != "stuff" and not unannotated and obj.mask.any():
                    n_inst += 1
                    inst[obj.mask] = (_instance_class(obj.category), n_inst, 0)
            sem[:, :UNLABELLED_STRIP] = 0
            inst[:, :UNLABELLED_STRIP] = 0
            (base / "images" / sd / f"{stem}.jpg").write_bytes(jpeg_bytes(arr))
            (base / "annotations" / sd / f"{stem}.png").write_bytes(png_bytes(sem))
            (base / "annotations_instance" / sd / f"{stem}.png").write_bytes(png_bytes(inst))


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def write_mask2former_files(root: Path) -> None:
    """Write Mask2Former's derived files beside the raw ones under ``root/img_ovseg/ade20k``."""
    base = root / ROOT
    things = set(thing_classes())
    names = class_names()
    mapping = instance_to_class()
    categories = [
        {"id": c, "name": names[c], "isthing": int(c in things), "color": [c, c, c]}
        for c in range(NUM_CLASSES)
    ]
    for split, sd in SPLIT_DIRS.items():
        if not (base / "images" / sd).is_dir():
            continue
        (base / f"ade20k_panoptic_{split}").mkdir(exist_ok=True)
        (base / "annotations_detectron2" / sd).mkdir(parents=True, exist_ok=True)
        images, pan_anns, ins_anns = [], [], []
        for img_path in sorted((base / "images" / sd).glob("*.jpg")):
            stem = img_path.stem
            with Image.open(img_path) as im:
                width, height = im.size
            images.append({"id": stem, "file_name": img_path.name, "width": width, "height": height})
            sem = np.asarray(Image.open(base / "annotations" / sd / f"{stem}.png"))
            ins = np.asarray(Image.open(base / "annotations_instance" / sd / f"{stem}.png"))
            (base / "annotations_detectron2" / sd / f"{stem}.png").write_bytes(
                png_bytes((sem - 1).astype(np.uint8))
            )
            seg_map = np.zeros(sem.shape, dtype=np.int64)
            segments = []
            for value in np.unique(sem):  # stuff first
                cls = int(value) - 1
                if value == 0 or cls in things:
                    continue
                seg_id = cls + 1 + 256 * (len(segments) + 1)
                seg_map[sem == value] = seg_id
                segments.append(
                    {
                        "id": seg_id,
                        "category_id": cls,
                        "area": int((sem == value).sum()),
                        "bbox": _bbox(sem == value),
                        "iscrowd": 0,
                    }
                )
            for g in np.unique(ins[..., 1]):  # then things, pasted over
                if g == 0:
                    continue
                mask = ins[..., 1] == g
                cls = mapping[int(np.unique(ins[..., 0][mask])[0])]
                seg_id = cls + 1 + 256 * (len(segments) + 1)
                seg_map[mask] = seg_id
                segments.append(
                    {
                        "id": seg_id,
                        "category_id": cls,
                        "area": int(mask.sum()),
                        "bbox": _bbox(mask),
                        "iscrowd": 0,
                    }
                )
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                ins_anns.append(
                    {
                        "id": len(ins_anns) + 1,
                        "image_id": stem,
                        "iscrowd": 0,
                        "category_id": cls,
                        "bbox": _bbox(mask),
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                        "area": int(mask_utils.area(rle)),
                    }
                )
            (base / f"ade20k_panoptic_{split}" / f"{stem}.png").write_bytes(png_bytes(id2rgb(seg_map)))
            pan_anns.append({"image_id": stem, "file_name": f"{stem}.png", "segments_info": segments})
        pan = {"images": images, "annotations": pan_anns, "categories": categories}
        ins_json = {
            "images": images,
            "annotations": ins_anns,
            "categories": [{"id": c, "name": names[c]} for c in sorted(things)],
        }
        (base / f"ade20k_panoptic_{split}.json").write_text(json.dumps(pan))
        (base / f"ade20k_instance_{split}.json").write_text(json.dumps(ins_json, indent=1))
