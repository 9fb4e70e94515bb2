"""Cost of the stage transforms per image: stage-1 large-scale jitter of the SAM image and its
masks, stage-2 SigLIP pad-to-square, against the plain path (longest side 1024, plain SigLIP resize).

    python -m bench.stage_transforms [--images 40] [--masks 12]

A COCO-like 640×480 JPEG with ``--masks`` instance masks; per image: decode + both encoder inputs + the masks
in the SAM frame, single thread, median over the images (each with its own jitter scale ~ U(0.1, 2.0)).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.loader import decode


def corpus(n_masks: int, seed: int = 0) -> tuple[bytes, list[dict]]:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8), (9, 9), 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    rles = []
    for _ in range(n_masks):
        m = np.zeros((480, 640), np.uint8)
        cx, cy, r = int(rng.integers(50, 590)), int(rng.integers(50, 430)), int(rng.integers(10, 120))
        cv2.circle(m, (cx, cy), r, 1, -1)
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        rles.append(rle)
    return buf.getvalue(), rles


def one(data: bytes, rles: list[dict], scale: float | None, pad_square: bool) -> float:
    t = time.perf_counter()
    x = decode.image_inputs(data, sam_scale=scale, siglip_pad_square=pad_square)
    if x["sam_geometry"] is None:
        decode.masks_to_frame(rles, x["scaled_size"], pad_to=1024)
    else:
        decode.jitter_masks(rles, x["sam_geometry"], pad_to=1024)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--masks", type=int, default=12)
    a = p.parse_args()
    cv2.setNumThreads(1)
    data, rles = corpus(a.masks)
    scales = np.random.default_rng(1).uniform(0.1, 2.0, a.images)
    one(data, rles, None, False)  # warm-up
    rows = {
        "plain (stage 3)": [one(data, rles, None, False) for _ in scales],
        "jitter (stage 1)": [one(data, rles, float(s), False) for s in scales],
        "pad square (stage 2)": [one(data, rles, None, True) for _ in scales],
    }
    base = statistics.median(rows["plain (stage 3)"])
    print(f"{'path':24s} {'ms/image':>9s} {'vs plain':>9s}")
    for name, ts in rows.items():
        print(f"{name:24s} {1e3 * statistics.median(ts):9.2f} {statistics.median(ts) / base:9.2f}x")


if __name__ == "__main__":
    main()
