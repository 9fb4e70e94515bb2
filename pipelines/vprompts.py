"""Visual prompts (point, scribble, box, mask) drawn from an instance mask (recipe §2.10), fast and seeded.

X-SAM's generator (``X/dataset/utils/vprompt.py``) labels the mask's connected components and, per component
with ``area > min_area``, draws:

* **point**: a random polar offset from the centroid (radius ``U(0, ½·min(h, w))``), clipped to the
  component's box, accepted only if it lands on the mask (up to 1,000 tries); dilated to a disk of radius 10;
* **scribble**: the box rescaled by ``U(0.5, 1.2)`` per side around the centroid until IoU ≥ 0.5 (up to 1,000
  tries); a line from a random corner to the opposite one whose rows get a sine offset (amplitude
  ``U(10, 20)`` px, frequency ``U(0.2, 1)``, phase ``U(0, 2π)``), clipped to the image, dilated to radius 5;
* **box**: the box scaled by ``U(0.9, 1.1)`` around itself, filled, clipped to the image;
* **mask**: ``gaussian_filter(mask, σ=2) > mean(blurred)`` over the whole image (a slightly grown mask).

Its cost is in the retry loops and in dilating by drawing one full-image distance map *per stroke pixel*, so
it runs in a process pool. Here nothing retries and nothing touches more than the component's neighbourhood:

* the point is the component pixel nearest to one jittered centroid (one ``argmin``), which equals X-SAM's
  draw whenever that draw lands on the mask and is its nearest in-mask point otherwise;
* the scribble box is picked from one batch of 32 candidate scalings (the first with IoU ≥ 0.5; the
  component's own box if none: a candidate fails with probability ~0.3, so this is ~1e-17, except for
  components a few pixels wide where integer truncation decides);
* strokes and disks are dilated with one ``cv2.dilate`` over a window around them; the mask prompt is
  blurred in a window padded by the kernel radius, thresholded at the whole-image mean (``area / (H·W)``,
  which a reflect-mode Gaussian preserves exactly).

Components come from one ``cv2.connectedComponentsWithStats`` call (8-connectivity, like
``skimage.measure.label``; labels, boxes, areas and centroids at once) on the mask's bounding-box crop, and
the prompt's RLE is computed from its window (:meth:`Window.rle`). Every random draw comes from
:func:`prompt_rng` seeded by ``(seed, sample key, annotation id, prompt type)``, so a prompt is reproducible
and independent of which other prompts were drawn.
Deliberate differences from X-SAM: the mask prompt smooths the kept components (those above ``min_area``)
rather than the raw mask, and a box is at least one pixel on each side (X-SAM's integer truncation can
empty the box of a one-pixel-thin component).

A mask with no component above ``min_area`` raises :class:`PromptTooSmall`; sources turn it into a skip with
reason ``mask_too_small_for_prompt``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from pipelines import masks
from pipelines.errors import PromptTooSmall

PROMPT_TYPES = ("point", "scribble", "box", "mask")


@dataclass(frozen=True)
class PromptParams:
    """The generator's knobs; defaults are X-SAM's (``ImgVGDSegDataset`` and ``vprompt.py``)."""

    min_area: int = 5  # components with area > min_area get a prompt
    point_radius: int = 10
    scribble_radius: int = 5
    scribble_scale: tuple[float, float] = (0.5, 1.2)
    scribble_min_iou: float = 0.5
    scribble_candidates: int = 32  # scalings drawn at once instead of retrying up to 1,000 times
    scribble_amplitude: tuple[float, float] = (10.0, 20.0)
    scribble_frequency: tuple[float, float] = (0.2, 1.0)
    box_scale: tuple[float, float] = (0.9, 1.1)
    mask_sigma: float = 2.0


DEFAULT_PARAMS = PromptParams()


@dataclass
class Component:
    """One connected component, in image coordinates: box ``[r0, r1) x [c0, c1)`` (skimage's ``bbox``),
    centroid, area, and where to find its pixels (label ``label`` in the crop ``labels`` at ``(oy, ox)``)."""

    r0: int
    c0: int
    r1: int
    c1: int
    cy: float
    cx: float
    area: int
    labels: np.ndarray  # crop label map (int32), shared by all components of the mask
    label: int
    oy: int
    ox: int

    def contains(self, y: int, x: int) -> bool:
        return bool(self.labels[y - self.oy, x - self.ox] == self.label)

    def pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ys, xs)`` of its pixels, in image coordinates (computed on its own box only)."""
        sub = self.labels[self.r0 - self.oy : self.r1 - self.oy, self.c0 - self.ox : self.c1 - self.ox]
        ys, xs = np.nonzero(sub == self.label)
        return ys + self.r0, xs + self.c0


@dataclass
class InstanceMask:
    """A mask reduced to what prompt drawing needs: its size and its kept components (sorted top-left
    first)."""

    height: int
    width: int
    components: list[Component]
    n_labels: int = 0  # components in the crop, the dropped small ones included

    @property
    def area(self) -> int:
        return int(sum(c.area for c in self.components))

    def kept_window(self, pad: int) -> tuple[np.ndarray, int, int]:
        """The kept components as a bool window grown by ``pad`` (clipped to the image), and its offset."""
        first = self.components[0]
        labels, oy, ox = first.labels, first.oy, first.ox
        if len(self.components) == self.n_labels:
            kept = labels > 0
        else:  # a lookup table is much cheaper than np.isin over the crop
            lut = np.zeros(self.n_labels + 1, dtype=bool)
            lut[[c.label for c in self.components]] = True
            kept = lut[labels]
        y0, x0 = max(oy - pad, 0), max(ox - pad, 0)
        y1 = min(oy + labels.shape[0] + pad, self.height)
        x1 = min(ox + labels.shape[1] + pad, self.width)
        win = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        win[oy - y0 : oy - y0 + labels.shape[0], ox - x0 : ox - x0 + labels.shape[1]] = kept
        return win, y0, x0


def prompt_rng(seed: int, key: str, ann_id: object, kind: str) -> np.random.Generator:
    """The generator of one prompt: seeded by ``(seed, sample key, annotation id, prompt type)``."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{ann_id}\x00{kind}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def analyse(
    mask: np.ndarray, params: PromptParams = DEFAULT_PARAMS, bbox: list[float] | None = None
) -> InstanceMask:
    """Label ``mask`` (``HxW`` bool/uint8) on its bounding-box crop; keep components with area > min_area.

    ``bbox`` (``[x, y, w, h]``, e.g. :func:`pipelines.masks.bbox` of the mask's RLE) saves a scan of the
    whole image. Raises :class:`PromptTooSmall` when no component is kept (an empty mask included).
    """
    m = np.asarray(mask)
    h, w = m.shape
    if bbox is not None:
        r0, c0 = int(bbox[1]), int(bbox[0])
        r1, c1 = min(h, int(math.ceil(bbox[1] + bbox[3]))), min(w, int(math.ceil(bbox[0] + bbox[2])))
        if r1 <= r0 or c1 <= c0:
            raise PromptTooSmall("the mask is empty")
    else:
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size == 0:
            raise PromptTooSmall("the mask is empty")
        cols = np.flatnonzero(m.any(axis=0))
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = np.ascontiguousarray(m[r0:r1, c0:c1], dtype=np.uint8)  # decoded RLEs are Fortran-ordered
    # one pass gives labels, boxes, areas and centroids (8-connectivity, as skimage.measure.label)
    n, labels, stats, cents = cv2.connectedComponentsWithStats(crop, connectivity=8, ltype=cv2.CV_32S)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if n <= 1:
        raise PromptTooSmall("the mask is empty")
    keep = 1 + np.flatnonzero(areas > params.min_area)
    if keep.size == 0:
        raise PromptTooSmall(
            f"largest connected component has {int(areas.max())} px; a prompt needs > {params.min_area}"
        )
    comps = []
    for k in keep:
        x, y, bw, bh, a = (int(v) for v in stats[k])
        comps.append(
            Component(
                r0=r0 + y,
                c0=c0 + x,
                r1=r0 + y + bh,
                c1=c0 + x + bw,
                cy=r0 + float(cents[k, 1]),
                cx=c0 + float(cents[k, 0]),
                area=a,
                labels=labels,
                label=int(k),
                oy=r0,
                ox=c0,
            )
        )
    # a fixed order (not the labeller's numbering) decides which random draws go to which component
    comps.sort(key=lambda c: (c.r0, c.c0, c.r1, c.c1, c.area, c.cy, c.cx))
    return InstanceMask(h, w, comps, n_labels=n - 1)


@lru_cache(maxsize=8)
def disk(radius: int) -> np.ndarray:
    """``(2r+1)x(2r+1)`` uint8 disk: pixels at distance <= r from the centre (X-SAM's ``draw_circle``)."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy * yy + xx * xx <= radius * radius).astype(np.uint8)


@dataclass
class Window:
    """A prompt drawn on a window of the image: ``pixels`` (``hxw`` uint8) placed at ``(y0, x0)``."""

    pixels: np.ndarray
    y0: int
    x0: int
    height: int  # of the whole image
    width: int

    def full(self) -> np.ndarray:
        """The ``HxW`` uint8 image (Fortran order)."""
        out = np.zeros((self.height, self.width), dtype=np.uint8, order="F")
        h, w = self.pixels.shape
        out[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = self.pixels
        return out

    def rle(self) -> dict:
        """Compressed RLE of the whole image, computed from the window's columns only.

        COCO RLE runs go down columns, so columns left and right of the window are one zero run each and only
        the window's column slab is scanned; this is ~4x cheaper than encoding the full image.
        """
        hh, ww = self.height, self.width
        h, w = self.pixels.shape
        slab = np.zeros((hh, w), dtype=np.uint8, order="F")
        slab[self.y0 : self.y0 + h] = self.pixels
        flat = slab.ravel(order="F")
        edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        runs = np.diff(np.concatenate(([0], edges, [flat.size])))
        if flat[0]:
            runs = np.concatenate(([0], runs))  # RLE counts start with a (possibly empty) zero run
        runs[0] += self.x0 * hh
        tail = (ww - self.x0 - w) * hh
        if runs.size % 2:  # ends on a zero run: extend it
            runs[-1] += tail
        elif tail:
            runs = np.concatenate((runs, [tail]))
        rle = mask_utils.frPyObjects({"counts": runs.tolist(), "size": [hh, ww]}, hh, ww)
        return {"size": [hh, ww], "counts": rle["counts"].decode("ascii")}


def _stamp_points(inst: InstanceMask, ys: np.ndarray, xs: np.ndarray, radius: int) -> Window:
    """Disks of ``radius`` centred at ``(ys, xs)``, drawn on the window around them (clipped to the image)."""
    h, w = inst.height, inst.width
    y0, y1 = max(int(ys.min()) - radius, 0), min(int(ys.max()) + radius + 1, h)
    x0, x1 = max(int(xs.min()) - radius, 0), min(int(xs.max()) + radius + 1, w)
    win = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    win[ys - y0, xs - x0] = 1
    # pixels beyond the border count as background for dilation, so clipping at the image edge is exact
    return Window(cv2.dilate(win, disk(radius)), y0, x0, h, w)


def _point(inst: InstanceMask, rng: np.random.Generator, p: PromptParams) -> Window:
    py, px = [], []
    for c in inst.components:
        radius = 0.5 * min(c.r1 - c.r0, c.c1 - c.c0)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        dy, dx = rng.uniform(0.0, radius, size=2)  # X-SAM draws the two radii independently
        y = min(max(int(c.cy + dy * math.cos(angle)), c.r0), c.r1 - 1)
        x = min(max(int(c.cx + dx * math.sin(angle)), c.c0), c.c1 - 1)
        if not c.contains(y, x):  # X-SAM would retry; take the component pixel nearest to the draw instead
            ys, xs = c.pixels()
            i = int(np.argmin((ys - y) ** 2 + (xs - x) ** 2))
            y, x = int(ys[i]), int(xs[i])
        py.append(y)
        px.append(x)
    return _stamp_points(inst, np.asarray(py), np.asarray(px), p.point_radius)


def _iou_inclusive(a: np.ndarray, b: tuple[int, int, int, int]) -> np.ndarray:
    """IoU of boxes ``a`` (``Nx4`` r0, c0, r1, c1) with ``b``, counting both ends as X-SAM's
    ``calculate_iou``."""
    ih = np.clip(np.minimum(a[:, 2], b[2]) - np.maximum(a[:, 0], b[0]) + 1, 0, None)
    iw = np.clip(np.minimum(a[:, 3], b[3]) - np.maximum(a[:, 1], b[1]) + 1, 0, None)
    inter = ih * iw
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter)


def _scribble(inst: InstanceMask, rng: np.random.Generator, p: PromptParams) -> Window:
    h, w = inst.height, inst.width
    rr_all, cc_all = [], []
    for c in inst.components:
        sh, sw = rng.uniform(*p.scribble_scale, size=(2, p.scribble_candidates))
        nh, nw = (c.r1 - c.r0) * sh, (c.c1 - c.c0) * sw
        cand = np.stack(
            [
                np.maximum(0, np.trunc(c.cy - nh / 2)),
                np.maximum(0, np.trunc(c.cx - nw / 2)),
                np.minimum(h, np.trunc(c.cy + nh / 2)),
                np.minimum(w, np.trunc(c.cx + nw / 2)),
            ],
            axis=1,
        ).astype(np.int64)
        ok = np.flatnonzero(_iou_inclusive(cand, (c.r0, c.c0, c.r1, c.c1)) >= p.scribble_min_iou)
        b0, a0, b1, a1 = (int(v) for v in cand[ok[0]]) if ok.size else (c.r0, c.c0, c.r1, c.c1)
        corners = ((b0, a0), (b0, a1), (b1, a0), (b1, a1))
        k = int(rng.integers(4))
        (sr, sc), (er, ec) = corners[k], corners[3 - k]  # 3 - k is the diagonally opposite corner
        n = max(abs(er - sr), abs(ec - sc)) + 1
        t = np.linspace(0.0, 1.0, n)
        rr = np.rint(sr + (er - sr) * t)
        cc = np.rint(sc + (ec - sc) * t)
        amp = rng.uniform(*p.scribble_amplitude)
        freq = rng.uniform(*p.scribble_frequency)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        rr = rr + amp * np.sin(2.0 * math.pi * freq * t + phase)  # the wave moves rows only, as X-SAM's
        rr_all.append(np.clip(rr, 0, h - 1).astype(np.int64))
        cc_all.append(np.clip(cc, 0, w - 1).astype(np.int64))
    return _stamp_points(inst, np.concatenate(rr_all), np.concatenate(cc_all), p.scribble_radius)


def _box(inst: InstanceMask, rng: np.random.Generator, p: PromptParams) -> Window:
    h, w = inst.height, inst.width
    boxes = []
    for c in inst.components:
        s = rng.uniform(*p.box_scale)
        dh, dw = (c.r1 - c.r0) * (s - 1.0), (c.c1 - c.c0) * (s - 1.0)
        a, b = max(0, int(c.r0 - dh / 2)), max(0, int(c.c0 - dw / 2))
        e, f = min(h, int(c.r1 + dh / 2)), min(w, int(c.c1 + dw / 2))
        boxes.append((a, b, max(e, a + 1), max(f, b + 1)))  # never an empty box
    bx = np.asarray(boxes)
    y0, x0, y1, x1 = int(bx[:, 0].min()), int(bx[:, 1].min()), int(bx[:, 2].max()), int(bx[:, 3].max())
    win = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    for a, b, e, f in boxes:
        win[a - y0 : e - y0, b - x0 : f - x0] = 1
    return Window(win, y0, x0, h, w)


def _mask(inst: InstanceMask, rng: np.random.Generator, p: PromptParams) -> Window:
    h, w = inst.height, inst.width
    pad = int(math.ceil(4 * p.mask_sigma))  # cv2's kernel radius for a float image: round(4σ)
    kept, y0, x0 = inst.kept_window(pad)
    # BORDER_REFLECT is scipy's 'reflect', so at the image edge this matches gaussian_filter; elsewhere the
    # window's zero padding is at least the kernel radius, so the blur equals a whole-image blur
    blurred = cv2.GaussianBlur(kept.astype(np.float32), (0, 0), p.mask_sigma, borderType=cv2.BORDER_REFLECT)
    return Window(
        (blurred > inst.area / (h * w)).astype(np.uint8), y0, x0, h, w
    )  # whole-image mean of the blur


_DRAW = {"point": _point, "scribble": _scribble, "box": _box, "mask": _mask}


def draw(
    inst: InstanceMask, kind: str, rng: np.random.Generator, params: PromptParams = DEFAULT_PARAMS
) -> Window:
    """The ``kind`` prompt of an analysed mask, on the window it covers (``.full()`` / ``.rle()``)."""
    if kind not in _DRAW:
        raise ValueError(f"unknown prompt type {kind!r}; expected one of {PROMPT_TYPES}")
    return _DRAW[kind](inst, rng, params)


def prompt_rles(
    mask: np.ndarray | InstanceMask,
    kinds: tuple[str, ...] | list[str],
    *,
    seed: int,
    key: str,
    ann_id: object,
    params: PromptParams = DEFAULT_PARAMS,
    bbox: list[float] | None = None,
) -> dict[str, dict]:
    """Compressed RLEs of the ``kinds`` prompts of one instance (``HxW`` mask or its :func:`analyse`).

    ``bbox``: the mask's ``[x, y, w, h]`` if known (see :func:`analyse`). Raises :class:`PromptTooSmall` if
    the mask has no component above ``params.min_area``.
    """
    inst = mask if isinstance(mask, InstanceMask) else analyse(mask, params, bbox)
    return {kind: draw(inst, kind, prompt_rng(seed, key, ann_id, kind), params).rle() for kind in kinds}


def prompt_rle(
    mask: np.ndarray | InstanceMask,
    kind: str,
    *,
    seed: int,
    key: str,
    ann_id: object,
    params: PromptParams = DEFAULT_PARAMS,
    bbox: list[float] | None = None,
) -> dict:
    """Compressed RLE of one prompt; see :func:`prompt_rles`."""
    return prompt_rles(mask, (kind,), seed=seed, key=key, ann_id=ann_id, params=params, bbox=bbox)[kind]


def dilate_rle(rle: dict, radius: int) -> dict:
    """Dilate a stored prompt (compressed RLE, e.g. a PSALM point or scribble mask) by a disk of ``radius``,
    on its window. An empty prompt is returned unchanged.
    """
    m = masks.decode(rle)
    ys, xs = np.nonzero(m)
    if radius <= 0 or ys.size == 0:
        return rle
    inst = InstanceMask(m.shape[0], m.shape[1], [])
    return _stamp_points(inst, ys, xs, radius).rle()
