"""Demo ADE20K (ADEChallengeData2016 renamed ``img_ovseg/ade20k``): images, raw label PNGs, instance PNGs.

Label PNGs are uint8 mode L (0 = other, 1..150 = class); instance PNGs are RGB with R = Instance100 class,
G = instance id, B = 0, exactly as the ADE20K downloads. Each scene has an unlabelled strip (value 0), and
the second image of each split has a thing whose instance was not annotated (class pixels, no instance).
(Mask2Former's prepared layout is derived from these files by the ADE20K tests.)
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from pipelines.demo.draw import jpeg_bytes, make_scene, png_bytes
from pipelines.sources.ade20k import SPLIT_DIRS, class_names, instance_to_class

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
