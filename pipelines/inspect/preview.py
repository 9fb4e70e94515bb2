"""A preview gallery of built shards: PNG contact sheets and one static HTML page.

    python -m pipelines.inspect.preview --out SHARDS [--source S[,S2]] [--split SPLIT] [--n 16] \\
        [--preview-dir DIR]

For each built ``<source>/<split>`` (found through its ``manifest.json``; read with
:mod:`pipelines.shard_store`) the first ``n`` samples in key order are drawn: the image with every mask tinted
in its phrase's colour (and outlined), the ignore region hatched grey, visual-prompt regions hatched and
outlined in their slot's colour; beside it the conversation, each ``<p>…</p>`` phrase in the same colour, and
the sample key. Phrases without a mask or region (absent categories listed as negatives) stay grey. Written
under ``<out>/preview/``::

    index.html                                   every previewed sample: overlay, coloured conversation,
                                                 legend
    sheets/<source>__<split>.png                 contact sheet: overlay + rendered conversation per sample
    samples/<source>/<split>/<id>.png            the overlay alone (used by index.html), at most 512 px a side

Only PIL (ImageDraw, its default font) and numpy; masks through :func:`pipelines.masks.decode`.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines import masks as mask_utils
from pipelines import storage
from pipelines.errors import OutputError, run_cli
from pipelines.logs import add_verbosity_flags, configure_logging, verbosity
from pipelines.schema import Sample
from pipelines.shard_store import Manifest, iter_samples, list_manifests

# Heavy imports (scipy) are deferred into the outline drawing: the other previews do not need it.

# Distinct, saturated colours (tab10 + a few more), assigned to phrases that have a mask or region, in label
# order; they cycle past the end (a sample with more than 16 drawn phrases reuses colours).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
    (255, 215, 0),
    (0, 128, 128),
    (128, 0, 0),
    (0, 0, 128),
    (128, 128, 0),
    (255, 0, 255),
    (0, 255, 127),
)
NO_COLOUR = (140, 140, 140)  # phrases with nothing drawn; masks with label -1
IGNORE_COLOUR = (110, 110, 110)
TINT_ALPHA = 0.55  # tinted pixel = (1 - a) * image + a * colour
MAX_SIDE_HTML = 512
TILE_IMAGE_WIDTH = 300  # each of the two image panels of a tile
TILE_TEXT_WIDTH = 440
TILE_MAX_TEXT_LINES = 34
SHEET_COLUMNS = 2
PAD = 8


@dataclass
class PreviewItem:
    """One sample to draw: the Sample and its image (``None`` for samples without one)."""

    sample: Sample
    image: Image.Image | None


# ---------------------------------------------------------------- reading shards
def read_items(out_url: str, manifest: Manifest, n: int) -> list[PreviewItem]:
    """The first ``n`` samples of a built split (its manifest's shards, in key order), decoded."""
    items = []
    for sample, image_bytes in islice(iter_samples(out_url, manifest.source, manifest.split, manifest), n):
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB") if image_bytes is not None else None
        items.append(PreviewItem(sample, image))
    return items


# ---------------------------------------------------------------- colours
def phrase_colours(sample: Sample) -> dict[int, tuple[int, int, int]]:
    """Colour of each phrase index that has a mask or a region; phrases without either get none."""
    drawn = sorted({m.label for m in sample.masks if m.label >= 0} | {r.label for r in sample.regions})
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(drawn)}


def _hex(c: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*c)


# ---------------------------------------------------------------- overlay
def _resize_mask(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``HxW`` uint8/bool mask to ``size = (w, h)`` with nearest-neighbour sampling, as bool."""
    if (m.shape[1], m.shape[0]) == size:
        return m.astype(bool)
    return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def _edge(m: np.ndarray) -> np.ndarray:
    """Pixels of ``m`` with a 4-neighbour outside ``m`` (the mask's inner outline), ``HxW`` bool."""
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    return m & ~inner


def _hatch(h: int, w: int, period: int, width: int, flip: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx - yy if flip else xx + yy) % period) < width


def mask_paint_order(sample: Sample) -> list[int]:
    """Indices of ``sample.masks`` in drawing order: largest first, so small masks stay visible on top."""
    areas = [m.area if m.area is not None else mask_utils.area(m.rle) for m in sample.masks]
    return sorted(range(len(sample.masks)), key=lambda i: (-areas[i], i))


def _edges(m: np.ndarray, width: int) -> np.ndarray:
    """The inner outline of ``m``, ``width`` pixels thick."""
    out = np.zeros_like(m)
    rest = m
    for _ in range(width):
        e = _edge(rest)
        out |= e
        rest = rest & ~e
    return out


def base_image(image: Image.Image | None, sample: Sample, size: tuple[int, int] | None = None) -> np.ndarray:
    """The sample's image at ``size = (w, h)`` (default: the annotated size) as ``HxWx3`` uint8; a light grey
    field for samples without an image."""
    size = size or natural_size(image, sample)
    if image is None:
        return np.full((size[1], size[0], 3), 235, np.uint8)
    rgb = image.convert("RGB")
    return np.asarray(rgb.resize(size, Image.BILINEAR) if rgb.size != size else rgb)


def natural_size(image: Image.Image | None, sample: Sample) -> tuple[int, int]:
    if sample.image is not None:
        return sample.image.width, sample.image.height
    return image.size if image is not None else (320, 240)


def _paint(sample: Sample, size: tuple[int, int]) -> tuple[list[int], dict[int, np.ndarray], np.ndarray]:
    """Paint order, each mask decoded at ``size`` (``HxW`` bool), and the ``HxW`` map of the top-most mask
    index at each pixel (-1: none)."""
    order = mask_paint_order(sample)
    decoded = {i: _resize_mask(mask_utils.decode(sample.masks[i].rle), size) for i in order}
    owner = np.full((size[1], size[0]), -1, np.int32)
    for i in order:
        owner[decoded[i]] = i
    return order, decoded, owner


@dataclass
class TagSpot:
    """Where a phrase tag goes: the most interior visible pixel ``(x, y)`` of the phrase's largest visible
    mask, how far it is from the mask's edge, and the visible part's bounding box ``(x0, y0, x1, y1)``."""

    label: int
    x: int
    y: int
    depth: float
    box: tuple[int, int, int, int]


def label_points(sample: Sample, size: tuple[int, int]) -> list[TagSpot]:
    """One :class:`TagSpot` per drawn phrase (however many instances it has), in label order."""
    from scipy.ndimage import distance_transform_edt

    _, _, owner = _paint(sample, size)
    best: dict[int, tuple[int, int]] = {}  # label -> (visible pixels, mask index)
    for i, m in enumerate(sample.masks):
        if m.label < 0:
            continue
        n = int((owner == i).sum())
        if n and (m.label not in best or n > best[m.label][0]):
            best[m.label] = (n, i)
    spots = []
    for label, (_, i) in sorted(best.items()):
        visible = owner == i
        dist = distance_transform_edt(np.pad(visible, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        ys, xs = np.nonzero(visible)
        spots.append(
            TagSpot(
                label,
                int(x),
                int(y),
                float(dist[y, x]),
                (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())),
            )
        )
    return spots


def overlay(
    image: Image.Image | None,
    sample: Sample,
    size: tuple[int, int] | None = None,
    outline: int = 1,
    tag_font=None,
) -> np.ndarray:
    """The image at ``size = (w, h)`` (default: its own) with the sample drawn on it, ``HxWx3`` uint8.

    Masks: each pixel takes the colour of the top-most mask covering it (painted largest first) blended
    ``TINT_ALPHA`` over the image, and every mask's outline (``outline`` px) is drawn in full colour. The
    ignore region is hatched grey; each visual-prompt region is hatched in its slot's colour with a
    white-and-colour outline. With ``tag_font``, phrase tags (:func:`draw_labels`) go on the masks before the
    regions are drawn, so a tag never hides a visual prompt.
    """
    size = size or natural_size(image, sample)
    w, h = size
    out = base_image(image, sample, size).astype(np.float32)
    colours = phrase_colours(sample)
    order, decoded, owner = _paint(sample, size)
    for i in order:
        colour = np.asarray(colours.get(sample.masks[i].label, NO_COLOUR), np.float32)
        sel = owner == i
        out[sel] = (1 - TINT_ALPHA) * out[sel] + TINT_ALPHA * colour
    for i in order:
        out[_edges(decoded[i], outline)] = colours.get(sample.masks[i].label, NO_COLOUR)
    if sample.ignore is not None:
        ig = _resize_mask(mask_utils.decode(sample.ignore), size)
        out[ig & _hatch(h, w, 8, 2, flip=False)] = IGNORE_COLOUR
    if tag_font is not None:
        tagged = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
        draw_labels(tagged, sample, tag_font)
        out = np.asarray(tagged).astype(np.float32)
    for region in sample.regions:
        r = _resize_mask(mask_utils.decode(region.rle), size)
        colour = colours.get(region.label, NO_COLOUR)
        out[r & _hatch(h, w, 6, 2, flip=True)] = colour
        edge = _edge(r)
        out[edge] = (255, 255, 255)
        out[_edge(r & ~edge)] = colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def fit(size: tuple[int, int], max_w: int, max_h: int | None = None) -> tuple[int, int]:
    """``size`` scaled down (never up) to fit ``max_w`` x ``max_h``."""
    w, h = size
    s = min(1.0, max_w / w, (max_h / h) if max_h else 1.0)
    return max(1, round(w * s)), max(1, round(h * s))


# ---------------------------------------------------------------- conversation text
_TOKEN_RE = re.compile(r"(<p>|</p>|<SEG>|<region>|<image>|\n)")
TAG_COLOUR = (170, 170, 170)
SPECIAL_COLOUR = (160, 0, 120)
TEXT_COLOUR = (30, 30, 30)


def conversation_runs(sample: Sample) -> list[tuple[str, str, int | None]]:
    """The conversation as runs ``(kind, text, phrase index)``.

    kind: ``role`` (a turn header), ``text``, ``phrase`` (inside ``<p>…</p>``, with its index counted over the
    whole conversation, as labels are), ``tag`` (``<p>``/``</p>``), ``special`` (``<SEG>``, ``<region>``,
    ``<image>``), ``newline``.
    """
    runs: list[tuple[str, str, int | None]] = []
    k = -1
    inside = False
    for turn in sample.conversation:
        runs.append(("role", f"{turn.role.upper()}:", None))
        for part in _TOKEN_RE.split(turn.text):
            if not part:
                continue
            if part == "<p>":
                k += 1
                inside = True
                runs.append(("tag", part, k))
            elif part == "</p>":
                inside = False
                runs.append(("tag", part, k))
            elif part == "\n":
                runs.append(("newline", "", None))
            elif part in ("<SEG>", "<region>", "<image>"):
                runs.append(("special", part, k if inside else None))
            else:
                runs.append(("phrase" if inside else "text", part, k if inside else None))
        runs.append(("newline", "", None))
    return runs


def _font(size: int = 13) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def layout_text(
    runs: list[tuple[str, str, int | None]],
    colours: dict[int, tuple[int, int, int]],
    width: int,
    font,
    line_h: int,
) -> list[list[tuple[int, str, tuple[int, int, int]]]]:
    """Word-wrap coloured runs into lines of ``(x, text, colour)`` pieces no wider than ``width``."""
    lines: list[list[tuple[int, str, tuple[int, int, int]]]] = [[]]
    x = 0
    for kind, text, k in runs:
        if kind == "newline":
            lines.append([])
            x = 0
            continue
        if kind == "role":
            colour = (0, 0, 0)
        elif kind == "tag":
            colour = TAG_COLOUR
        elif kind == "special":
            colour = colours.get(k, SPECIAL_COLOUR) if k is not None else SPECIAL_COLOUR
        elif kind == "phrase":
            colour = colours.get(k, NO_COLOUR)
        else:
            colour = TEXT_COLOUR
        words = re.findall(r"\S+\s*|\s+", text + (" " if kind == "role" else ""))
        for word in words:
            wlen = font.getlength(word.rstrip())
            if x > 0 and x + wlen > width:
                lines.append([])
                x = 0
                word = word.lstrip()
                if not word:
                    continue
            while font.getlength(word.rstrip()) > width and len(word) > 1:  # one over-long token: cut it
                lo, hi = 1, len(word) - 1  # the longest prefix that fits, by bisection
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if font.getlength(word[:mid]) <= width else (lo, mid - 1)
                cut = lo
                lines[-1].append((x, word[:cut], colour))
                lines.append([])
                x = 0
                word = word[cut:]
            lines[-1].append((x, word, colour))
            x += font.getlength(word)
    while lines and not lines[-1]:
        lines.pop()
    return lines


# ---------------------------------------------------------------- tiles, sheets, html
def draw_labels(img: Image.Image, sample: Sample, font) -> None:
    """Write each drawn phrase (``k: text``) on a box of its colour, in place: centred on its mask when the
    box fits inside, otherwise just above the mask (below when there is no room), so small objects and the
    prompts on them stay visible."""
    colours = phrase_colours(sample)
    d = ImageDraw.Draw(img)
    placed: list[tuple[int, int, int, int]] = []
    for spot in label_points(sample, img.size):
        label = spot.label
        phrase = sample.phrases[label] if label < len(sample.phrases) else "?"
        kinds = sorted({r.type for r in sample.regions if r.label == label})
        if kinds and "<region>" in phrase:  # a visual-prompt slot: say which prompt fills it
            phrase = phrase.replace("<region>", f"<region> {'/'.join(kinds)}")
        text = f"{label}: {phrase if len(phrase) <= 24 else phrase[:23] + '…'}"
        colour = colours[label]
        left, top, right, bottom = d.textbbox((0, 0), text, font=font)
        bw, bh = right - left + 6, bottom - top + 4
        x0, y0, x1, y1 = spot.box
        inside = 2 * spot.depth >= bh + 4 and x1 - x0 >= bw and not kinds
        if inside:
            tx, ty = spot.x - bw // 2, spot.y - bh // 2
        else:
            tx = (x0 + x1) // 2 - bw // 2
            ty = y0 - bh - 2 if y0 - bh - 2 >= 0 else y1 + 2
        tx = min(max(0, tx), img.width - bw - 1)
        ty = min(max(0, ty), img.height - bh - 1)
        for step in (0, 1, -1, 2, -2, 3, -3):  # step off tags already placed, one tag height at a time
            cy = min(max(0, ty + step * (bh + 1)), img.height - bh - 1)
            if not any(
                tx < px1 and px0 < tx + bw and cy < py1 and py0 < cy + bh for px0, py0, px1, py1 in placed
            ):
                ty = cy
                break
        placed.append((tx, ty, tx + bw + 1, ty + bh + 1))
        light = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 150
        d.rectangle([tx, ty, tx + bw, ty + bh], fill=colour, outline=(0, 0, 0) if light else (255, 255, 255))
        d.text((tx + 3 - left, ty + 2 - top), text, font=font, fill=(0, 0, 0) if light else (255, 255, 255))


def masks_overlap(sample: Sample, size: tuple[int, int]) -> bool:
    """Whether some pixel lies in more than one mask (one overlay then hides masks: refseg turns that share an
    object, reaseg's one mask per question, a multi-target union over its members)."""
    if len(sample.masks) < 2:
        return False
    _, decoded, owner = _paint(sample, size)
    return sum(int(m.sum()) for m in decoded.values()) > int((owner >= 0).sum())


def _clip_text(text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def mask_strip(item: PreviewItem, width: int, font, per_row: int = 4, max_rows: int = 3) -> Image.Image:
    """One thumbnail per mask (``k: phrase`` above it), so masks a single overlay hides are each visible."""
    s = item.sample
    thumb_w = (width - (per_row - 1) * PAD) // per_row
    size = fit(natural_size(item.image, s), thumb_w, thumb_w)
    base = base_image(item.image, s, size).astype(np.float32)
    colours = phrase_colours(s)
    shown = list(range(len(s.masks)))[: per_row * max_rows]
    label_h = 15
    rows = (len(shown) + per_row - 1) // per_row
    strip = Image.new("RGB", (width, rows * (size[1] + label_h + PAD)), (255, 255, 255))
    d = ImageDraw.Draw(strip)
    for n, i in enumerate(shown):
        m = s.masks[i]
        colour = colours.get(m.label, NO_COLOUR)
        mask = _resize_mask(mask_utils.decode(m.rle), size)
        img = base.copy()
        img[mask] = (1 - TINT_ALPHA) * img[mask] + TINT_ALPHA * np.asarray(colour, np.float32)
        img[_edges(mask, 2)] = colour
        x = (n % per_row) * (thumb_w + PAD)
        y = (n // per_row) * (size[1] + label_h + PAD)
        phrase = s.phrases[m.label] if 0 <= m.label < len(s.phrases) else "(no phrase)"
        d.text((x, y), _clip_text(f"mask {i} -> {m.label}: {phrase}", font, thumb_w), font=font, fill=colour)
        strip.paste(Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)), (x, y + label_h))
    if len(s.masks) > len(shown):
        d.text(
            (0, strip.height - label_h),
            f"… {len(s.masks) - len(shown)} more masks",
            font=font,
            fill=NO_COLOUR,
        )
    return strip


def render_tile(item: PreviewItem, font=None) -> Image.Image:
    """One contact-sheet tile: the key and a summary on top; the image, the same image with the sample drawn
    on it (phrase tags on the masks), and the coloured conversation side by side."""
    font = font or _font(13)
    small = _font(11)
    bold = _font(14)
    line_h = 17
    s = item.sample
    disp = fit(natural_size(item.image, s), TILE_IMAGE_WIDTH, TILE_IMAGE_WIDTH)
    plain = Image.fromarray(base_image(item.image, s, disp))
    drawn = Image.fromarray(overlay(item.image, s, disp, outline=2, tag_font=small))
    colours = phrase_colours(s)
    lines = layout_text(conversation_runs(s), colours, TILE_TEXT_WIDTH, font, line_h)
    if len(lines) > TILE_MAX_TEXT_LINES:
        more = len(lines) - TILE_MAX_TEXT_LINES + 1
        lines = lines[: TILE_MAX_TEXT_LINES - 1] + [[(0, f"… ({more} more lines)", NO_COLOUR)]]
    summary = (
        f"{len(s.phrases)} phrases · {len(s.masks)} masks · {len(s.regions)} regions"
        + (" · ignore region (hatched grey)" if s.ignore is not None else "")
        + (" · no target (meta.no_target)" if s.meta.get("no_target") else "")
        + (f" · image {s.image.width}x{s.image.height}" if s.image else " · no image")
    )
    strip = mask_strip(item, 2 * TILE_IMAGE_WIDTH + PAD, small) if masks_overlap(s, disp) else None
    header_h = 2 * line_h + PAD
    images_h = disp[1] + (PAD + strip.height if strip else 0)
    h = header_h + max(images_h, len(lines) * line_h) + 2 * PAD
    nothing_drawn = not (s.masks or s.regions or s.ignore is not None)  # e.g. chat: one image panel is enough
    tx = PAD + (1 if nothing_drawn else 2) * (TILE_IMAGE_WIDTH + PAD)
    w = tx + TILE_TEXT_WIDTH + PAD
    tile = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(tile)
    d.text((PAD, PAD), s.key, font=bold, fill=(0, 0, 0))
    d.text((PAD, PAD + line_h), summary, font=font, fill=(90, 90, 90))
    tile.paste(plain, (PAD, header_h + PAD))
    if not nothing_drawn:
        tile.paste(drawn, (PAD + TILE_IMAGE_WIDTH + PAD, header_h + PAD))
    if strip:
        tile.paste(strip, (PAD, header_h + PAD + disp[1] + PAD))
    for row, pieces in enumerate(lines):
        for x, text, colour in pieces:
            d.text((tx + x, header_h + PAD + row * line_h), text, font=font, fill=colour)
    d.rectangle([0, 0, w - 1, h - 1], outline=(200, 200, 200))
    return tile


def contact_sheet(items: Sequence[PreviewItem], title: str, columns: int = SHEET_COLUMNS) -> Image.Image:
    """Tiles in a grid of ``columns``, each row as tall as its tallest tile, under a title line."""
    font = _font(13)
    tiles = [render_tile(it, font) for it in items]
    title_h = 30
    if not tiles:
        sheet = Image.new("RGB", (600, title_h + 40), (245, 245, 245))
        ImageDraw.Draw(sheet).text((PAD, PAD), f"{title}: no samples", font=_font(16), fill=(0, 0, 0))
        return sheet
    tw = max(t.width for t in tiles)
    rows = [tiles[i : i + columns] for i in range(0, len(tiles), columns)]
    heights = [max(t.height for t in r) for r in rows]
    sheet = Image.new(
        "RGB", (PAD + columns * (tw + PAD), title_h + sum(heights) + PAD * (len(rows) + 1)), (245, 245, 245)
    )
    ImageDraw.Draw(sheet).text((PAD, PAD), title, font=_font(16), fill=(0, 0, 0))
    y = title_h + PAD
    for r, rh in zip(rows, heights, strict=True):
        for c, t in enumerate(r):
            sheet.paste(t, (PAD + c * (tw + PAD), y))
        y += rh + PAD
    return sheet


def sample_file(key: str, suffix: str = "") -> str:
    """Overlay path of a sample, relative to ``<out>/preview``: ``samples/<source>/<split>/<id>.png``
    (``suffix=".masks"``: its per-mask strip, written when masks overlap)."""
    return f"samples/{key}{suffix}.png"


def _conversation_html(sample: Sample, colours: dict[int, tuple[int, int, int]]) -> str:
    """One ``<div class="turn">`` per turn; phrases as spans coloured like their masks."""
    turns: list[list[str]] = []
    for kind, text, k in conversation_runs(sample):
        if kind == "role":
            turns.append([f"<b>{html.escape(text)}</b> "])
        elif kind == "newline":
            turns[-1].append("\n")
        elif kind == "tag":
            turns[-1].append(f'<span class="tag">{html.escape(text)}</span>')
        elif kind in ("phrase", "special") and k is not None:
            c = colours.get(k)
            style = f' style="color:{_hex(c)};font-weight:bold"' if c else ' class="absent"'
            turns[-1].append(f'<span data-phrase="{k}"{style}>{html.escape(text)}</span>')
        elif kind == "special":
            turns[-1].append(f'<span class="special">{html.escape(text)}</span>')
        else:
            turns[-1].append(html.escape(text))
    return "".join(f'<div class="turn">{"".join(t).rstrip()}</div>' for t in turns)


def _legend_html(sample: Sample, colours: dict[int, tuple[int, int, int]]) -> str:
    n_masks: dict[int, int] = {}
    for m in sample.masks:
        n_masks[m.label] = n_masks.get(m.label, 0) + 1
    regions: dict[int, list[str]] = {}
    for r in sample.regions:
        regions.setdefault(r.label, []).append(r.type)
    rows = []
    for k in sorted(colours):
        phrase = sample.phrases[k] if k < len(sample.phrases) else "?"
        rows.append(
            f'<tr><td><span class="swatch" style="background:{_hex(colours[k])}"></span></td><td>{k}</td>'
            f"<td>{html.escape(phrase)}</td><td>{n_masks.get(k, 0)}</td>"
            f"<td>{html.escape(', '.join(regions.get(k, [])))}</td></tr>"
        )
    absent = len(sample.phrases) - len(colours)
    foot = (
        f'<p class="absent">{absent} more phrase(s) without a mask or region (grey).</p>'
        if absent > 0
        else ""
    )
    if n_masks.get(-1):
        foot += f'<p class="absent">{n_masks[-1]} mask(s) with label -1 (grey).</p>'
    if sample.ignore is not None:
        foot += '<p class="absent">Hatched grey: the ignore region (excluded from the loss).</p>'
    table = (
        (
            "<table class=legend><tr><th></th><th>label</th><th>phrase</th><th>masks</th><th>regions</th></tr>"
            + "".join(rows)
            + "</table>"
        )
        if rows
        else ""
    )
    return table + foot


_CSS = """
body{font-family:sans-serif;margin:16px;background:#f5f5f5;color:#222}
h2{margin-top:32px}
.sample{display:flex;gap:16px;background:#fff;border:1px solid #ddd;padding:10px;margin:10px 0}
.sample img{max-width:512px;height:auto;image-rendering:pixelated;border:1px solid #ccc}
.key{font-family:monospace;font-weight:bold}
.turn{margin:6px 0;white-space:pre-wrap}
.tag{color:#aaa}.special{color:#a00078}.absent{color:#8c8c8c}
.swatch{display:inline-block;width:14px;height:14px;border:1px solid #555}
.legend td,.legend th{padding:1px 6px;text-align:left;font-size:13px}
details{font-size:12px}
"""


def render_html(
    groups: Sequence[tuple[str, str, list[PreviewItem], str]], strips: set[str] = frozenset()
) -> str:
    """The index page: for each ``(source, split, items, sheet path)`` a section of sample cards; samples
    whose key is in ``strips`` also show their per-mask strip."""
    out = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>X-SAM shard preview</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>X-SAM shard preview</h1>",
        "<ul>",
    ]
    for source, split, items, sheet in groups:
        out.append(
            f'<li><a href="#{html.escape(source)}__{html.escape(split)}">{html.escape(source)}/{html.escape(split)}</a>'
            f' ({len(items)} samples; <a href="{html.escape(sheet)}">contact sheet</a>)</li>'
        )
    out.append("</ul>")
    for source, split, items, _sheet in groups:
        out.append(
            f'<h2 id="{html.escape(source)}__{html.escape(split)}">{html.escape(source)} / {html.escape(split)}</h2>'
        )
        for it in items:
            s = it.sample
            colours = phrase_colours(s)
            meta = html.escape(json.dumps(s.meta, sort_keys=True, indent=1))
            out += [
                '<div class="sample">',
                f'<div><img src="{html.escape(sample_file(s.key))}" alt="{html.escape(s.key)}">'
                + (
                    f'<br><img class="strip" src="{html.escape(sample_file(s.key, ".masks"))}" alt="one image per mask">'
                    if s.key in strips
                    else ""
                )
                + "</div>",
                "<div>",
                f'<div class="key">{html.escape(s.key)}</div>',
                f"<div>task <code>{html.escape(s.task)}</code> · image <code>"
                f"{html.escape(s.image.path if s.image else 'none')}</code></div>",
                _conversation_html(s, colours),
                _legend_html(s, colours),
                f"<details><summary>meta</summary><pre>{meta}</pre></details>",
                "</div></div>",
            ]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_preview(
    out_url: str,
    sources: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    n: int = 16,
    preview_dir: str | Path | None = None,
) -> list[Path]:
    """Render every selected split; returns the files written (HTML first). ``preview_dir`` defaults to
    ``<out>/preview`` (``out_url`` must then be a local folder)."""
    if preview_dir is None and "://" in str(out_url) and not str(out_url).startswith("file://"):
        raise OutputError(f"--out {out_url} is not a local folder: give a local --preview-dir")
    pdir = Path(preview_dir) if preview_dir else Path(storage.fs_and_path(out_url)[1]) / "preview"
    written: list[Path] = []
    groups = []
    strips: set[str] = set()
    for manifest in list_manifests(out_url, sources, splits):
        source, split = manifest.source, manifest.split
        items = read_items(out_url, manifest, n)
        sheet_rel = f"sheets/{source}__{split}.png"
        sheet_path = pdir / sheet_rel
        sheet_path.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(items, f"{source} / {split}: first {len(items)} samples").save(sheet_path)
        written.append(sheet_path)
        for it in items:
            p = pdir / sample_file(it.sample.key)
            p.parent.mkdir(parents=True, exist_ok=True)
            size = fit(natural_size(it.image, it.sample), MAX_SIDE_HTML, MAX_SIDE_HTML)
            Image.fromarray(overlay(it.image, it.sample, size)).save(p)
            written.append(p)
            if masks_overlap(it.sample, size):  # one overlay hides some masks: show each on its own too
                sp = pdir / sample_file(it.sample.key, ".masks")
                mask_strip(it, MAX_SIDE_HTML, _font(11)).save(sp)
                written.append(sp)
                strips.add(it.sample.key)
        groups.append((source, split, items, sheet_rel))
    index = pdir / "index.html"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(render_html(groups, strips), encoding="utf-8")
    return [index, *written]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the shard folder of a build")
    p.add_argument("--source", help="comma list of sources (default: every built source)")
    p.add_argument("--split", help="comma list of splits (default: every built split)")
    p.add_argument("--n", type=int, default=16, help="samples per source and split (default: %(default)s)")
    p.add_argument(
        "--preview-dir", help="where to write (default: <out>/preview; needed when --out is remote)"
    )
    add_verbosity_flags(p)
    args = p.parse_args(argv)
    configure_logging(verbosity(args))
    sources = args.source.split(",") if args.source else None
    splits = args.split.split(",") if args.split else None
    if not list_manifests(args.out, sources, splits):
        raise OutputError(
            f"--out {args.out}: no built split" + (f" of --source {args.source}" if sources else "")
        )
    files = write_preview(args.out, sources, splits, args.n, args.preview_dir)
    print(f"wrote {files[0]} and {len(files) - 1} PNG files")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
