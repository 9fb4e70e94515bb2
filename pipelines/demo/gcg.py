"""Demo GranD-f GCG tree: the four training files, the val/test GT pairs, drawn images whose masks match.

Captions are built from the drawn scene ('a red dog and a yellow cat next to the sky and the grass.'), so a
phrase's mask is the pixels of the shape it names. Edge cases the converters must handle are in the data on
purpose: a GranD-f caption wrapped in quotes (offsets count the quote), title-cased captions with lower-case
phrase keys, a phrase key in quotes, a nested span overlapping its parent ('red dog' in 'a red dog'), a phrase
split over two RLEs, a record without height/width, a RefCOCOg sentence in another case, a Flickr annotation
overlapping another, a portrait image (catches height/width swaps).

The ``*_val.json`` files of PSG, RefCOCOg and Flickr hold the last training record again (GLaMM reads their
images from the training folders). Layout: X-SAM's ``img_gcgseg/grand_f``, except that PSG images sit in
GLaMM's ``coco2017/train2017`` sub-folder, so the default demo exercises the layout probe.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from pipelines.demo.draw import jpeg_bytes, make_scene

ROOT = "img_gcgseg/grand_f"
ANN_TRAIN = f"{ROOT}/annotations/train"
ANN_VAL_TEST = f"{ROOT}/annotations/val_test"
IMAGES = f"{ROOT}/images"
GRANDF_IMAGES = f"{IMAGES}/GranDf_HA_images/train"
COLOURS = ("red", "yellow", "blue", "purple", "teal", "orange")  # draw.THING_COLOURS, in order
THINGS = ("dog", "cat", "car", "person", "bus", "bicycle")
STUFF = ("sky", "grass", "wall", "road")
LINKS = ("next to", "in front of", "beside", "below")
MIN_VISIBLE = 60  # pixels: a thing mostly hidden by later shapes is not mentioned


@dataclass
class Phrase:
    text: str  # lower case, as built
    start: int  # [start, end) in the lower-case caption
    end: int
    mask: np.ndarray  # HxW bool, visible pixels
    polygon: list[float]  # outline (things: the drawn shape; stuff: its band)


@dataclass
class Scene:
    jpeg: bytes
    width: int
    height: int
    caption: str  # lower case, ends with '.'
    phrases: list[Phrase]


def rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def make_gcg_scene(rng: random.Random, width: int = 320, height: int = 240) -> Scene:
    things = rng.sample(THINGS, rng.randint(2, 3))
    stuff = rng.sample(STUFF, 2)
    arr, objects = make_scene(rng, width, height, things, stuff)
    named = []
    for j, obj in enumerate(objects[len(stuff) :]):
        if obj.mask.sum() >= MIN_VISIBLE:
            named.append((f"a {COLOURS[j % len(COLOURS)]} {obj.category}", obj.mask, obj.polygon))
    for obj in objects[: len(stuff)]:
        rows = np.flatnonzero(obj.mask.any(axis=1))
        y0, y1 = float(rows[0]), float(rows[-1] + 1)
        named.append(
            (f"the {obj.category}", obj.mask, [0.0, y0, float(width), y0, float(width), y1, 0.0, y1])
        )
    things_part = [n for n in named if n[0].startswith("a ")]
    stuff_part = [n for n in named if n[0].startswith("the ")]
    text, phrases = "", []

    def add(piece, obj=None):
        nonlocal text
        if obj is not None:
            phrases.append(Phrase(piece, len(text), len(text) + len(piece), obj[1], obj[2]))
        text += piece

    for k, obj in enumerate(things_part):
        if k:
            add(" and " if k == len(things_part) - 1 else ", ")
        add(obj[0], obj)
    add(f" {rng.choice(LINKS)} ")
    for k, obj in enumerate(stuff_part):
        if k:
            add(" and ")
        add(obj[0], obj)
    add(".")
    return Scene(jpeg_bytes(arr), width, height, text, phrases)


def styled(scene: Scene, style: str) -> tuple[str, int]:
    """The caption as written to the file and the offset of its first character: 'quoted' wraps it in quotes
    (offsets then count the quote), 'title' title-cases it, 'sentence' capitalises the first letter."""
    c = scene.caption
    if style == "quoted":
        return f'"{c[0].upper()}{c[1:]}"', 1
    if style == "title":
        return c.title(), 0
    return c[0].upper() + c[1:], 0


def grandf_record(
    scene: Scene, file_name: str, image_id, style: str, nested: bool, split_mask: bool, with_size: bool = True
) -> dict:
    """One GranD-f / OpenPSG record (source_formats.md §4a)."""
    caption, off = styled(scene, style)
    groundings = {}
    for k, p in enumerate(scene.phrases):
        key = caption[off + p.start : off + p.end]  # the phrase as the caption writes it
        if style == "title":
            key = p.text  # mixed casing: lower-case key, title-cased caption
        if style == "quoted" and k == len(scene.phrases) - 1:
            key = f'"{key}"'  # a quoted phrase key
        masks = [rle(p.mask)]
        if split_mask and k == 0:  # one phrase's mask split over two RLEs: top and bottom halves
            top = p.mask.copy()
            top[scene.height // 2 :] = False
            masks = [rle(top), rle(p.mask & ~top)]
        groundings[key] = {"token_positives": [off + p.start, off + p.end], "rle_masks": masks}
    if nested:  # 'red dog' inside 'a red dog': the greedy overlap rule must drop it
        p = scene.phrases[0]
        groundings[caption[off + p.start + 2 : off + p.end]] = {
            "token_positives": [off + p.start + 2, off + p.end],
            "rle_masks": [rle(p.mask)],
        }
    rec = {"file_name": file_name, "image_id": image_id, "caption": caption, "groundings": groundings}
    if with_size:
        rec.update(height=scene.height, width=scene.width)
    return rec


def write_grandf_train(
    root: Path, rng: random.Random, n_images: int, n_captions: int, size=(320, 240)
) -> list[dict]:
    """``GranDf_HA_GCG_train.json`` with ``n_captions`` records over ``n_images`` drawn images (records cycle
    through the images and the four caption styles). The benchmark scales this up."""
    img_dir = root / GRANDF_IMAGES
    img_dir.mkdir(parents=True, exist_ok=True)
    scenes = []
    for i in range(n_images):
        scene = make_gcg_scene(rng, *size)
        name = f"sa_{10010541 + 97 * i}.jpg"
        (img_dir / name).write_bytes(scene.jpeg)
        scenes.append((name, scene))
    styles = ("quoted", "title", "sentence", "sentence")
    records = []
    for r in range(n_captions):
        name, scene = scenes[r % n_images]
        records.append(
            grandf_record(
                scene,
                name,
                int(name[3:-4]),
                styles[r % 4],
                nested=r % 4 in (0, 2),
                split_mask=r % 4 == 2,
                with_size=r % 4 != 3,
            )
        )
    (root / ANN_TRAIN).mkdir(parents=True, exist_ok=True)
    (root / ANN_TRAIN / "GranDf_HA_GCG_train.json").write_text(json.dumps(records))
    return records


def _write_psg(root: Path, rng: random.Random, n: int) -> None:
    img_dir = root / IMAGES / "coco2017/train2017"  # GLaMM's sub-folder: the probe must find it
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        scene = make_gcg_scene(rng, *((240, 320) if i == 1 else (320, 240)))  # one portrait image
        image_id = 285 + 12 * i
        name = f"{image_id:012d}.jpg"
        (img_dir / name).write_bytes(scene.jpeg)
        records.append(grandf_record(scene, name, image_id, "sentence", nested=i == 0, split_mask=False))
    (root / ANN_TRAIN / "OpenPsgGCG_train.json").write_text(json.dumps(records))
    (root / ANN_TRAIN / "OpenPsgGCG_val.json").write_text(
        json.dumps(records[-1:])
    )  # GLaMM: same image folder


def _write_refcocog(root: Path, rng: random.Random, n: int) -> None:
    img_dir = root / IMAGES / "coco2014/train2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        scene = make_gcg_scene(rng)
        image_id = 34 + 41 * i
        name = f"COCO_train2014_{image_id:012d}.jpg"
        (img_dir / name).write_bytes(scene.jpeg)
        refs = [
            {"sentence": p.text.capitalize() if k == 0 else p.text, "segmentation": [p.polygon]}
            for k, p in enumerate(scene.phrases)
        ]
        if i == 0:  # the bare noun of the first phrase overlaps it: dropped by the greedy rule
            refs.append(
                {"sentence": scene.phrases[0].text.split()[-1], "segmentation": [scene.phrases[0].polygon]}
            )
        body = {
            "img_file_name": name,
            "caption": scene.caption[0].upper() + scene.caption[1:],
            "refs": refs,
            "image_id": image_id,
            "height": scene.height,
            "width": scene.width,
        }
        records.append({f"{image_id}_{i}": body})  # single-key dicts
    (root / ANN_TRAIN / "RefCOCOg_GCG_train.json").write_text(json.dumps(records))
    (root / ANN_TRAIN / "RefCOCOg_GCG_val.json").write_text(json.dumps(records[-1:]))


def _write_flickr(root: Path, rng: random.Random, n: int) -> None:
    img_dir = root / IMAGES / "flickr30k/images/train"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        scene = make_gcg_scene(rng, *((240, 320) if i == 2 else (320, 240)))
        image_id = 1000092795 + 1000 * i
        name = f"{image_id}.jpg"
        (img_dir / name).write_bytes(scene.jpeg)
        caption = scene.caption[0].upper() + scene.caption[1:]
        images.append(
            {
                "id": image_id,
                "file_name": name,
                "caption": caption,
                "height": scene.height,
                "width": scene.width,
            }
        )
        spans = [(p.start, p.end, p.mask) for p in scene.phrases]
        if i == 0:  # 'red dog' inside 'a red dog'
            p = scene.phrases[0]
            spans.append((p.start + 2, p.end, p.mask))
        for s, e, m in spans:
            r = rle(m)
            x, y, w, h = (
                float(v) for v in mask_utils.toBbox({"size": r["size"], "counts": r["counts"].encode()})
            )
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [x, y, w, h],
                    "area": float(m.sum()),
                    "tokens_positive": [[s, e]],
                    "sam_mask": r,
                }
            )
    cats = [{"id": 1, "name": "object"}]
    (root / ANN_TRAIN / "flickr_mergedGT_GCG_train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    val_anns = [a for a in anns if a["image_id"] == images[-1]["id"]]
    (root / ANN_TRAIN / "flickr_mergedGT_GCG_val.json").write_text(
        json.dumps({"images": images[-1:], "annotations": val_anns, "categories": cats})
    )


def _write_val_test(root: Path, rng: random.Random, n: int) -> None:
    img_dir = root / IMAGES / "GranDf_HA_images/val_test"
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / ANN_VAL_TEST).mkdir(parents=True, exist_ok=True)
    for split, first in (("val", 9000001), ("test", 9100001)):
        images, mask_anns, cap_anns = [], [], []
        for i in range(n):
            scene = make_gcg_scene(rng)
            image_id = f"sa_{first + 13 * i}"  # string ids: the file is id + ".jpg"
            (img_dir / f"{image_id}.jpg").write_bytes(scene.jpeg)
            images.append(
                {"id": image_id, "file_name": f"{image_id}.jpg", "height": scene.height, "width": scene.width}
            )
            for p in scene.phrases:
                r = rle(p.mask)
                bbox = [
                    float(v) for v in mask_utils.toBbox({"size": r["size"], "counts": r["counts"].encode()})
                ]
                mask_anns.append(
                    {
                        "id": len(mask_anns) + 1,
                        "image_id": image_id,
                        "category_id": 1,
                        "iscrowd": 0,
                        "segmentation": r,
                        "area": float(p.mask.sum()),
                        "bbox": bbox,
                    }
                )
            cap_anns.append(
                {
                    "id": i + 1,
                    "image_id": image_id,
                    "caption": scene.caption[0].upper() + scene.caption[1:],
                    "labels": [p.text for p in scene.phrases],
                }
            )
        cats = [{"id": 1, "name": "object"}]
        (root / ANN_VAL_TEST / f"{split}_gcg_coco_mask_gt.json").write_text(
            json.dumps({"images": images, "annotations": mask_anns, "categories": cats})
        )
        (root / ANN_VAL_TEST / f"{split}_gcg_coco_caption_gt.json").write_text(
            json.dumps({"images": [{"id": im["id"]} for im in images], "annotations": cap_anns})
        )


def write(root: Path, rng: random.Random) -> None:
    write_grandf_train(root, rng, n_images=4, n_captions=5)  # the 5th caption re-uses the first image
    _write_psg(root, rng, 3)
    _write_refcocog(root, rng, 3)
    _write_flickr(root, rng, 3)
    _write_val_test(root, rng, 2)
