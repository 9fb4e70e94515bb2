"""Demo COCO-Interactive: PSALM's ``coco_interactive_{train,val}_psalm.json`` over drawn scenes.

Prompt masks are stored as PSALM ships them: the point as one pixel and the scribble as a one-pixel stroke
(both dilated by the reader), the box filled, the mask as is; all compressed RLE with ``str`` counts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from pipelines import masks
from pipelines.demo.coco import THINGS
from pipelines.demo.draw import jpeg_bytes, make_scene

ROOT = "img_intseg/coco_int"


def _prompts(rng: random.Random, m: np.ndarray) -> dict[str, dict]:
    ys, xs = np.nonzero(m)
    point = np.zeros_like(m, dtype=np.uint8)
    i = rng.randrange(ys.size)
    point[ys[i], xs[i]] = 1
    scribble = np.zeros_like(m, dtype=np.uint8)
    row = int(np.median(ys))
    cols = xs[ys == row]
    scribble[row, cols.min() : cols.max() + 1] = 1  # a horizontal stroke through the object
    box = np.zeros_like(m, dtype=np.uint8)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1
    stack = np.stack([point, scribble, box, m.astype(np.uint8)], axis=2)
    return {
        f"{k}_visual_prompt_mask": r
        for k, r in zip(("point", "scribble", "box", "mask"), masks.encode(stack), strict=True)
    }


def write(
    root: Path, rng: random.Random, n_train: int = 2, n_val: int = 2, size: tuple[int, int] = (320, 240)
) -> None:
    base = root / ROOT
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    width, height = size
    for split, n, first_id in (("train", n_train, 9), ("val", n_val, 139)):
        (base / f"coco2017/{split}2017").mkdir(parents=True, exist_ok=True)
        items = []
        ann_id = 9000 * first_id
        for i in range(n):
            image_id = first_id + 7 * i
            fname = f"{image_id:012d}.jpg"
            arr, objects = make_scene(rng, width, height, rng.sample(list(THINGS), 2), ["wall-other-merged"])
            (base / f"coco2017/{split}2017" / fname).write_bytes(jpeg_bytes(arr))
            anns = []
            for obj in objects:
                if obj.kind == "stuff" or obj.mask.sum() < 30:
                    continue
                ann_id += 1
                rle = masks.encode(obj.mask)[0]
                anns.append(
                    {
                        "id": ann_id,
                        "category_id": THINGS[obj.category],
                        "bbox": masks.bbox(rle),
                        "iscrowd": 0,
                        "segmentation": rle,
                        **_prompts(rng, obj.mask),
                    }
                )
            items.append(
                {
                    "image": fname,
                    "image_info": {"id": image_id, "file_name": fname, "height": height, "width": width},
                    "anns": anns,
                }
            )
        (base / f"annotations/coco_interactive_{split}_psalm.json").write_text(json.dumps(items))
