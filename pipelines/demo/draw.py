"""Synthetic scenes for demo data: drawn shapes whose masks mean something when looked at.

A scene is a background split into 'stuff' bands (sky / grass / wall) plus a few 'thing' shapes (ellipses,
rectangles, triangles) in category colours; every object also comes back as an ``HxW`` bool mask, the later
object occluding earlier ones, exactly as a panoptic annotation would.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


@dataclass
class SceneObject:
    category: str
    kind: str  # ellipse | rect | triangle | stuff
    mask: np.ndarray  # HxW bool, visible pixels only
    polygon: list[float] | None = None  # flat [x1, y1, …] outline for thing shapes


STUFF_COLOURS = {
    "sky": (135, 190, 235),
    "grass": (90, 160, 70),
    "wall": (200, 190, 170),
    "road": (110, 110, 115),
}
THING_COLOURS = [(220, 60, 50), (240, 200, 40), (60, 90, 210), (150, 70, 180), (30, 180, 170), (250, 130, 30)]


def _shape_polygon(kind: str, x0: float, y0: float, x1: float, y1: float) -> list[float]:
    if kind == "rect":
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    if kind == "triangle":
        return [(x0 + x1) / 2, y0, x1, y1, x0, y1]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    return [float(v) for xy in zip(cx + rx * np.cos(t), cy + ry * np.sin(t), strict=True) for v in xy]


def make_scene(
    rng: random.Random, width: int, height: int, things: list[str], stuff: list[str]
) -> tuple[np.ndarray, list[SceneObject]]:
    """An ``HxWx3`` uint8 image and its objects (stuff bands first, then things, front-most last)."""
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    owner = np.full((height, width), -1, dtype=np.int32)  # which object owns each pixel
    objects: list[SceneObject] = []
    cuts = sorted(rng.randint(height // 4, 3 * height // 4) for _ in range(max(len(stuff) - 1, 0)))
    bounds = [0, *cuts, height]
    for i, name in enumerate(stuff):
        y0, y1 = bounds[i], bounds[i + 1]
        colour = STUFF_COLOURS.get(name.split("-")[0], (128, 128, 128))
        draw.rectangle([0, y0, width, y1], fill=colour)
        owner[y0:y1] = len(objects)
        objects.append(SceneObject(name, "stuff", np.zeros((height, width), bool)))
    for j, name in enumerate(things):
        kind = rng.choice(["ellipse", "rect", "triangle"])
        w = rng.randint(width // 8, width // 3)
        h = rng.randint(height // 8, height // 3)
        x0 = rng.randint(0, width - w - 1)
        y0 = rng.randint(0, height - h - 1)
        poly = _shape_polygon(kind, x0, y0, x0 + w, y0 + h)
        layer = Image.new("L", (width, height), 0)
        ImageDraw.Draw(layer).polygon(poly, fill=1)
        m = np.asarray(layer, dtype=bool)
        draw.polygon(poly, fill=THING_COLOURS[j % len(THING_COLOURS)], outline=(20, 20, 20))
        owner[m] = len(objects)
        objects.append(SceneObject(name, kind, np.zeros((height, width), bool), poly))
    for k, obj in enumerate(objects):
        obj.mask = owner == k
    arr = np.asarray(img).copy()
    # a little deterministic texture so JPEGs are not flat colour fields
    noise = np.random.default_rng(rng.randint(0, 2**31)).integers(-8, 9, size=arr.shape, dtype=np.int16)
    arr = np.clip(arr.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return arr, objects


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """Segment ids ``HxW`` to panoptic RGB ``HxWx3`` (inverse of :func:`pipelines.masks.rgb2id`)."""
    out = np.zeros((*id_map.shape, 3), dtype=np.uint8)
    v = id_map.astype(np.int64)
    for c in range(3):
        out[..., c] = v % 256
        v //= 256
    return out
