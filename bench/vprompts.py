"""Visual-prompt generation throughput per worker, per prompt type (target >= 500 prompts/s each).

    python bench/vprompts.py                  # 5,000 instances; the X-SAM-style baseline on the first 300
    python bench/vprompts.py --small          # 500 instances, baseline on 50: a quick check
    python bench/vprompts.py --instances 20000 --baseline-n 1000

The corpus is a COCO instances file written under a temp dir: images of COCO's common sizes (640x480,
480x640, 640x427, 500x375, 427x640, 612x612) and star-shaped polygon instances whose areas follow COCO's
mix (41 % small < 32², 34 % medium, 25 % large), 10 % of them in two parts, a few below the 5-pixel minimum.
Each instance's polygons are decoded to a dense mask up front (not timed). Timed, per prompt type, one
process, OpenCV held to one thread:

- ours: ``masks.bbox`` of the instance RLE, ``vprompts.analyse`` (crop + one connected-components call),
  the prompt, and its compressed RLE: what ``coco_vgd`` does per region;
- baseline: X-SAM's generator re-implemented in its own style (``X/dataset/utils/vprompt.py``, recipe §2.10)
  with scipy.ndimage instead of skimage (not installed): full-image labelling, ``random`` draws with
  rejection loops of up to 1,000 tries, per-stroke-pixel full-image distance maps for the disks, a full-image
  Gaussian for the mask prompt, then ``pycocotools`` encoding of the full image (X-SAM's ``encode_mask``).

Rates are prompts per second of **CPU time** of this process (robust on a shared box; wall-clock rates are
printed too). Masks too small for any prompt count as processed for both (ours raises at once, X-SAM's gives
empty prompts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from scipy import ndimage  # noqa: E402

from pipelines import masks, vprompts  # noqa: E402
from pipelines.vprompts import PROMPT_TYPES, PromptTooSmall  # noqa: E402

TARGET = 500.0  # prompts/s per worker, every type
SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (427, 640), (612, 612)]


# ----------------------------------------------------------------------------- corpus
def _star(rng: random.Random, cx: float, cy: float, r: float) -> list[float]:
    n = rng.randint(8, 20)
    angles = sorted(rng.uniform(0, 2 * math.pi) for _ in range(n))
    return [
        round(v, 2)
        for a in angles
        for v in (cx + r * rng.uniform(0.6, 1.0) * math.cos(a), cy + r * rng.uniform(0.6, 1.0) * math.sin(a))
    ]


def write_corpus(path: str, n: int, rng: random.Random) -> None:
    """A COCO instances JSON with ``n`` instances, 4 per image."""
    images, anns = [], []
    for i in range(n):
        if i % 4 == 0:
            w, h = rng.choice(SIZES)
            images.append(
                {"id": len(images) + 1, "file_name": f"{len(images) + 1:012d}.jpg", "width": w, "height": h}
            )
        img = images[-1]
        w, h = img["width"], img["height"]
        u = rng.random()
        if u < 0.02:  # COCO has a few instances of a handful of pixels
            anns.append(
                {
                    "id": i + 1,
                    "image_id": img["id"],
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": [[10.0, 10.0, 12.0, 10.0, 12.0, 12.0, 10.0, 12.0]],
                }
            )
            continue
        area = (
            rng.uniform(2, 1024)
            if u < 0.41
            else rng.uniform(1024, 96**2)
            if u < 0.75
            else rng.uniform(96**2, 0.5 * w * h)
        )
        r = math.sqrt(area / math.pi) / 0.8
        parts = [
            _star(
                rng,
                rng.uniform(r, w - r) if w > 2 * r else w / 2,
                rng.uniform(r, h - r) if h > 2 * r else h / 2,
                r,
            )
        ]
        if rng.random() < 0.1:
            parts.append(_star(rng, rng.uniform(0, w), rng.uniform(0, h), r / 2))
        anns.append(
            {"id": i + 1, "image_id": img["id"], "category_id": 1, "iscrowd": 0, "segmentation": parts}
        )
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}, f)


def load_masks(path: str) -> list[tuple[np.ndarray, dict, int]]:
    with open(path) as f:
        d = json.load(f)
    size = {im["id"]: (im["height"], im["width"]) for im in d["images"]}
    out = []
    for a in d["annotations"]:
        h, w = size[a["image_id"]]
        rle = masks.segmentation_to_rle(a["segmentation"], h, w)
        out.append((masks.decode(rle), rle, a["id"]))
    return out


# ----------------------------------------------------------------------------- baseline (X-SAM's algorithm)
class _Prop:
    def __init__(self, bbox, centroid):
        self.bbox, self.centroid = bbox, centroid


def _props(mask: np.ndarray, min_area: int = 5) -> list[_Prop]:
    """skimage label + regionprops (area > min_area), with scipy on the full image."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    props = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        ys, xs = np.nonzero(lab[sl] == k)
        if ys.size > min_area:
            props.append(
                _Prop(
                    (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop),
                    (ys.mean() + sl[0].start, xs.mean() + sl[1].start),
                )
            )
    return props


def _circles(binary: np.ndarray, radius: int) -> np.ndarray:
    """X-SAM's enhance_with_circles: one full-image distance map per set pixel."""
    out = np.zeros_like(binary, dtype=np.uint8)
    y, x = np.ogrid[: binary.shape[0], : binary.shape[1]]
    for py, px in np.argwhere(binary == 1):
        out[np.sqrt((x - px) ** 2 + (y - py) ** 2) <= radius] = 1
    return out


def _iou(b1, b2) -> float:
    ih = max(0, min(b1[2], b2[2]) - max(b1[0], b2[0]) + 1)
    iw = max(0, min(b1[3], b2[3]) - max(b1[1], b2[1]) + 1)
    inter = ih * iw
    a1 = (b1[2] - b1[0] + 1) * (b1[3] - b1[1] + 1)
    a2 = (b2[2] - b2[0] + 1) * (b2[3] - b2[1] + 1)
    return inter / float(a1 + a2 - inter)


def base_point(mask, props, retries=1000, radius=10):
    out = np.zeros_like(mask, dtype=np.uint8)
    for p in props:
        r0, c0, r1, c1 = p.bbox
        for _ in range(retries):
            rad = min(r1 - r0, c1 - c0) * 0.5
            ang = random.uniform(0, 2 * np.pi)
            y = int(p.centroid[0] + random.uniform(0, rad) * np.cos(ang))
            x = int(p.centroid[1] + random.uniform(0, rad) * np.sin(ang))
            y, x = np.clip(y, r0, r1 - 1), np.clip(x, c0, c1 - 1)
            if mask[y, x] > 0:
                out[y, x] = 1
                break
    return _circles(out, radius)


def base_scribble(mask, props, retries=1000, radius=5):
    out = np.zeros_like(mask, dtype=np.uint8)
    hh, ww = mask.shape
    for p in props:
        r0, c0, r1, c1 = p.bbox
        cy, cx = p.centroid
        box = None
        for _ in range(retries):
            nh, nw = (r1 - r0) * random.uniform(0.5, 1.2), (c1 - c0) * random.uniform(0.5, 1.2)
            cand = (
                max(0, int(cy - nh / 2)),
                max(0, int(cx - nw / 2)),
                min(hh, int(cy + nh / 2)),
                min(ww, int(cx + nw / 2)),
            )
            if _iou(cand, (r0, c0, r1, c1)) >= 0.5:
                box = cand
                break
        if box is None:
            continue
        corners = [(box[0], box[1]), (box[0], box[3]), (box[2], box[1]), (box[2], box[3])]
        k = random.randrange(4)
        (sr, sc), (er, ec) = corners[k], corners[3 - k]
        n = max(abs(er - sr), abs(ec - sc)) + 1  # skimage.draw.line's pixel count
        rr = np.rint(np.linspace(sr, er, n)).astype(np.float32)
        cc = np.rint(np.linspace(sc, ec, n)).astype(np.float32)
        amp, freq, phase = random.uniform(10, 20), random.uniform(0.2, 1), random.uniform(0, 2 * np.pi)
        rr += amp * np.sin(2 * np.pi * freq * np.linspace(0, 1, n) + phase)
        out[np.clip(rr, 0, hh - 1).astype(np.int32), np.clip(cc, 0, ww - 1).astype(np.int32)] = 1
    return _circles(out, radius)


def base_box(mask, props):
    out = np.zeros_like(mask, dtype=np.uint8)
    for p in props:
        r0, c0, r1, c1 = p.bbox
        s = random.uniform(0.9, 1.1)
        dh, dw = (r1 - r0) * (s - 1), (c1 - c0) * (s - 1)
        out[
            max(0, int(r0 - dh / 2)) : min(mask.shape[0], int(r1 + dh / 2)),
            max(0, int(c0 - dw / 2)) : min(mask.shape[1], int(c1 + dw / 2)),
        ] = 1
    return out


def base_mask(mask, props):
    blurred = ndimage.gaussian_filter(mask.astype(float), sigma=2)
    return (blurred > blurred.mean()).astype(np.uint8)


BASELINE = {"point": base_point, "scribble": base_scribble, "box": base_box, "mask": base_mask}


def run_baseline(kind: str, items) -> int:
    for m, _, _ in items:
        prompt = BASELINE[kind](m, _props(m))
        mask_utils.encode(np.asfortranarray(prompt))  # X-SAM's encode_mask
    return len(items)


def run_ours(kind: str, items) -> int:
    for m, rle, ann_id in items:
        try:
            vprompts.prompt_rle(m, kind, seed=0, key="bench/train/0", ann_id=ann_id, bbox=masks.bbox(rle))
        except PromptTooSmall:
            pass
    return len(items)


def timed(fn, *args) -> tuple[int, float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    n = fn(*args)
    return n, time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=5000)
    p.add_argument("--baseline-n", type=int, default=300, help="instances the (slow) baseline runs on")
    p.add_argument("--small", action="store_true", help="500 instances, baseline on 50")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.small:
        args.instances, args.baseline_n = 500, 50
    cv2.setNumThreads(1)  # one worker = one thread
    random.seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="xsam-bench-vprompts-") as tmp:
        path = os.path.join(tmp, "instances_bench.json")
        write_corpus(path, args.instances, random.Random(args.seed))
        items = load_masks(path)
    too_small = 0
    for m, rle, _ in items:
        try:
            vprompts.analyse(m, bbox=masks.bbox(rle))
        except PromptTooSmall:
            too_small += 1
    areas = np.array([masks.area(r) for _, r, _ in items])
    print(
        f"{len(items)} instances ({(areas < 32**2).mean():.0%} small, {((areas >= 32**2) & (areas < 96**2)).mean():.0%} "
        f"medium, {(areas >= 96**2).mean():.0%} large; {too_small} too small for any prompt); baseline on the "
        f"first {min(args.baseline_n, len(items))}; rates in prompts per CPU-second of one process"
    )
    head = f"{'type':<9} {'ours/s':>9} {'(wall/s)':>9} {'baseline/s':>11} {'(wall/s)':>9} {'ratio':>8}  target {TARGET:.0f}/s"
    print(head + "\n" + "-" * len(head))
    ok = True
    for kind in PROMPT_TYPES:
        n, cpu, wall = timed(run_ours, kind, items)
        bn, bcpu, bwall = timed(run_baseline, kind, items[: args.baseline_n])
        ours, base = n / cpu, bn / bcpu
        ok &= ours >= TARGET
        print(
            f"{kind:<9} {ours:>9.0f} {n / wall:>9.0f} {base:>11.1f} {bn / bwall:>9.1f} {ours / base:>7.1f}x  "
            f"{'ok' if ours >= TARGET else 'BELOW TARGET'}"
        )
    print("all types meet the target" if ok else "some type is below the target")


if __name__ == "__main__":
    main()
