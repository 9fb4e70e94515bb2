"""Prediction overlays: masks coloured by phrase over the image, the answer text and a legend beside it.

One drawing for every place a prediction is shown: ``orchestrate/predict.py`` writes it as a PNG, and the
evaluation's wandb run logs it as its prediction panels. :func:`labelled_masks` reads one line of
``predictions.jsonl`` (docs/contracts.md#predictions-and-results) back into ``(mask, label)`` pairs;
:func:`draw` paints them.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines import masks as mask_ops

# 20 well-separated colours (the Tableau-20 order); a label keeps its colour within one drawing
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)


def labelled_masks(line: dict, name: Callable[[str, dict], str]) -> list[tuple[np.ndarray, str]]:
    """A prediction line → ``(HxW bool, label)`` pairs, instances best first. ``name(field, entry)`` gives an
    entry's label (a category name, the phrase of a ``<SEG>`` turn or of a ``<p>`` span)."""
    out = []
    for field in ("panoptic", "instances", "masks"):
        entries = line.get(field) or []
        if field == "instances":
            entries = sorted(entries, key=lambda e: -e.get("score", 0.0))
        for e in entries:
            out.append((mask_ops.decode(e["rle"]).astype(bool), name(field, e)))
    return out


def _colours(labels: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    order: dict[str, tuple[int, int, int]] = {}
    for lab in labels:
        if lab not in order:
            order[lab] = PALETTE[len(order) % len(PALETTE)]
    return order


def _edges(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels (4-neighbourhood), so touching segments stay distinguishable."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def draw(
    image: np.ndarray,
    masks: Sequence[tuple[np.ndarray, str]],
    text: str | None = None,
    *,
    alpha: float = 0.5,
    panel_width: int = 360,
    max_shown: int = 30,
) -> np.ndarray:
    """HxWx3 uint8 image + ``(HxW bool, label)`` masks (painted in order, the first on top) → an RGB array of
    the overlay with a panel to its right: the legend (one colour per label) and ``text`` wrapped."""
    shown = list(masks)[:max_shown]
    colours = _colours([lab for _, lab in shown])
    canvas = image.astype(np.float32).copy()
    for mask, lab in reversed(shown):  # the first mask ends on top
        c = np.array(colours[lab], np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * c
        canvas[_edges(mask)] = c
    h, w = image.shape[:2]
    rows = [
        r
        for para in (text or "").splitlines()
        for r in textwrap.wrap(para, max(10, panel_width // 7)) or [""]
    ]
    height = max(h, 12 + 16 * (len(colours) + 1) + 8 + 14 * len(rows))
    out = Image.new("RGB", (w + panel_width, height), (255, 255, 255))
    out.paste(Image.fromarray(canvas.clip(0, 255).astype(np.uint8)), (0, 0))
    pen = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    y = 6
    for lab, c in colours.items():
        pen.rectangle([w + 8, y + 2, w + 20, y + 12], fill=c)
        pen.text((w + 26, y), lab[:48], fill=(0, 0, 0), font=font)
        y += 16
    if len(masks) > len(shown):
        pen.text((w + 8, y), f"(+{len(masks) - len(shown)} masks not shown)", fill=(90, 90, 90), font=font)
        y += 16
    y += 8
    for row in rows:
        pen.text((w + 8, y), row, fill=(30, 30, 30), font=font)
        y += 14
    return np.asarray(out)
