"""Demo LISA ReasonSeg: ``img_reaseg/lisa/{train,val,test}/<name>.{jpg,json}`` + ``explanatory/train.json``.

LabelMe-style JSONs as LISA ships them (``text``, ``is_sentence``, ``shapes[{label, points, shape_type}]``).
One train image has an ``ignore`` shape lying on its target and one has a ``flag`` shape; two of the three
train images have an explanation. Some JSONs carry ``imageHeight``/``imageWidth`` and some do not (the source
then reads the image header).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipelines.demo.draw import jpeg_bytes, make_scene

ROOT = "img_reaseg/lisa"
PHRASES = {"person": "the person", "car": "the vehicle", "dog": "the animal", "bus": "the large vehicle"}
LONG = {
    "person": "Who in this picture could open a door?",
    "car": "What in this scene could carry people along a road?",
    "dog": "Which thing here would most likely bark at a stranger?",
    "bus": "What here could take many passengers to work?",
}


def _shape(label: str, poly: list[float]) -> dict:
    pts = [[round(poly[i], 1), round(poly[i + 1], 1)] for i in range(0, len(poly), 2)]
    return {"label": label, "points": pts, "group_id": None, "shape_type": "polygon", "flags": {}}


def write(root: Path, rng: random.Random, size: tuple[int, int] = (320, 240)) -> None:
    base = root / ROOT
    width, height = size
    explanations = []
    n = {"train": 3, "val": 2, "test": 2}
    for split, count in n.items():
        (base / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            stem = f"{rng.getrandbits(40):010x}_o"
            things = rng.sample(list(LONG), 2)
            arr, objs = make_scene(rng, width, height, things, ["sky", "road"])
            (base / split / f"{stem}.jpg").write_bytes(jpeg_bytes(arr))
            target = next(o for o in objs if o.category == things[0])
            other = next(o for o in objs if o.category == things[1])
            is_sentence = i % 2 == 0
            text = [LONG[things[0]]] if is_sentence else [PHRASES[things[0]]]
            if split == "train":
                text.append(f"{PHRASES[things[0]]} in this picture")  # train images carry several questions
            shapes = [_shape("target", target.polygon)]
            if split == "train" and i == 0:
                # an ignore region over part of the target: smaller, so it is painted after (largest first)
                xs, ys = target.polygon[0::2], target.polygon[1::2]
                x0, y0 = min(xs), min(ys)
                x1, y1 = x0 + (max(xs) - x0) / 2, y0 + (max(ys) - y0) / 2
                shapes.append(_shape("ignore", [x0, y0, x1, y0, x1, y1, x0, y1]))
            if split == "train" and i == 1:
                shapes.append(_shape("flag", other.polygon))  # deprecated mark: never part of the mask
            anno = {
                "version": "4.5.6",
                "flags": {},
                "text": text,
                "is_sentence": is_sentence,
                "shapes": shapes,
                "imagePath": f"{stem}.jpg",
                "imageData": None,
            }
            if i % 2 == 0:
                anno.update(imageHeight=height, imageWidth=width)
            (base / split / f"{stem}.json").write_text(json.dumps(anno))
            if split == "train" and i < 2:
                explanations.append(
                    {
                        "image": f"{stem}.jpg",
                        "query": text[0],
                        "outputs": f"The {things[0]} is the one that fits, because of what it can do.",
                    }
                )
    (base / "explanatory").mkdir(exist_ok=True)
    (base / "explanatory" / "train.json").write_text(json.dumps(explanations))
