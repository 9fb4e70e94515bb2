"""Preview gallery: the files it writes, overlay pixels where the masks are (in their phrase's
colour, as the HTML colours the phrase), regions and ignore drawn, conversation colouring and wrapping."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import masks
from pipelines.build.driver import build
from pipelines.errors import OutputError
from pipelines.inspect import preview
from pipelines.schema import ImageRef, MaskTarget, Region, Sample, Turn
from pipelines.shard_store import list_manifests

COCO = ("coco_panoptic", "coco_instance")


@pytest.fixture(scope="module")
def shards(demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preview") / "shards"
    build(str(demo_root), str(out), sources=list(COCO), splits=["train", "val"])
    return out


@pytest.fixture(scope="module")
def written(shards) -> list[Path]:
    return preview.write_preview(str(shards), n=3)


def first_items(shards: Path, source: str, split: str, n: int) -> list[preview.PreviewItem]:
    (manifest,) = list_manifests(str(shards), [source], [split])
    return preview.read_items(str(shards), manifest, n)


class _Spans(HTMLParser):
    """Collects, per sample card, the key and the colour of each ``data-phrase`` span."""

    def __init__(self):
        super().__init__()
        self.cards: dict[str, dict[int, str]] = {}
        self.imgs: list[str] = []
        self._key = None
        self._in_key = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if a.get("class") == "key":
            self._in_key = True
        if "data-phrase" in a and a.get("style"):
            colour = re.search(r"color:(#[0-9a-f]{6})", a["style"]).group(1)
            self.cards[self._key][int(a["data-phrase"])] = colour

    def handle_data(self, data):
        if self._in_key:
            self._key = data
            self.cards[data] = {}
            self._in_key = False


def rgb(hex_colour: str) -> np.ndarray:
    return np.asarray([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], np.float64)


def test_preview_writes_the_expected_files(shards, written):
    pdir = shards / "preview"
    assert written[0] == pdir / "index.html"
    for source in COCO:
        for split in ("train", "val"):
            assert (pdir / "sheets" / f"{source}__{split}.png").is_file()
            manifest = json.loads((shards / source / split / "manifest.json").read_text())
            keys = [it.sample.key for it in first_items(shards, source, split, 3)]
            assert len(keys) == min(3, manifest["counts"]["samples"])
            assert keys == sorted(keys)
            for key in keys:
                assert (pdir / f"samples/{key}.png").is_file()
    assert all(p.is_file() for p in written)
    parser = _Spans()
    parser.feed((pdir / "index.html").read_text())
    assert len(parser.cards) == 12  # 2 sources x 2 splits x 3 samples
    assert all((pdir / src).is_file() for src in parser.imgs)
    sheet = Image.open(pdir / "sheets" / "coco_panoptic__train.png")
    assert (
        sheet.width > 2 * 2 * 300 and sheet.height > 2 * 225
    )  # 2 columns x 2 rows of (image, overlay) tiles


@pytest.mark.parametrize("source", COCO)
def test_overlay_pixels_are_where_the_masks_are(shards, written, source):
    """In the written overlay (1:1 for the 320x240 demo images): a pixel deep inside exactly one mask is the
    image tinted by that mask's phrase colour, the very colour the HTML gives the phrase; a pixel in no mask
    (and not in the ignore region) is the image pixel unchanged; mask outlines are the pure colour."""
    parser = _Spans()
    parser.feed((shards / "preview" / "index.html").read_text())
    a = preview.TINT_ALPHA
    checked_in = checked_out = checked_edge = 0
    for it in first_items(shards, source, "train", 3):
        s = it.sample
        out = np.asarray(Image.open(shards / "preview" / f"samples/{s.key}.png").convert("RGB")).astype(
            np.float64
        )
        img = np.asarray(it.image).astype(np.float64)
        assert out.shape == img.shape == (s.image.height, s.image.width, 3)
        dec = np.stack([masks.decode(m.rle).astype(bool) for m in s.masks])
        cover = dec.sum(0)
        ignore = masks.decode(s.ignore).astype(bool) if s.ignore else np.zeros(cover.shape, bool)
        colours = parser.cards[s.key]
        rng = np.random.default_rng(0)
        for j, m in enumerate(s.masks):
            deep = dec[j].copy()
            for _ in range(3):  # away from every outline: erode by 3 px
                deep[1:-1, 1:-1] &= deep[:-2, 1:-1] & deep[2:, 1:-1] & deep[1:-1, :-2] & deep[1:-1, 2:]
                deep[[0, -1], :] = deep[:, [0, -1]] = False
            ys, xs = np.nonzero(deep & (cover == 1) & ~ignore)
            for t in rng.choice(len(ys), size=min(5, len(ys)), replace=False):
                y, x = ys[t], xs[t]
                want = (1 - a) * img[y, x] + a * rgb(colours[m.label])
                assert np.abs(out[y, x] - want).max() <= 1, (s.key, j, y, x)
                checked_in += 1
            d = dec[j]
            inner = d.copy()
            inner[1:-1, 1:-1] &= d[:-2, 1:-1] & d[2:, 1:-1] & d[1:-1, :-2] & d[1:-1, 2:]
            inner[[0, -1], :] = inner[:, [0, -1]] = False
            ey, ex = np.nonzero(d & ~inner & (cover == 1) & ~ignore)  # the mask's 1-px outline
            for t in rng.choice(len(ey), size=min(3, len(ey)), replace=False):
                assert (out[ey[t], ex[t]] == rgb(colours[m.label])).all(), (s.key, j, "outline")
                checked_edge += 1
        outside = np.nonzero((cover == 0) & ~ignore)
        if len(outside[0]):
            pick = rng.choice(len(outside[0]), size=min(20, len(outside[0])), replace=False)
            for t in pick:
                y, x = outside[0][t], outside[1][t]
                assert (out[y, x] == img[y, x]).all(), (s.key, y, x)
                checked_out += 1
    assert checked_in >= 10 and checked_edge >= 5
    if source == "coco_instance":  # instance masks leave background pixels
        assert checked_out >= 10


def test_mask_outline_and_colour_key():
    """A synthetic sample: the outline ring is the phrase colour; two phrases get two colours; a phrase with
    no mask gets none (grey in the text); label -1 masks are grey."""
    h, w = 40, 60
    m0 = np.zeros((h, w), np.uint8)
    m0[10:30, 5:25] = 1
    m1 = np.zeros((h, w), np.uint8)
    m1[10:30, 35:55] = 1
    s = Sample(
        key="demo/train/x",
        source="demo",
        task="genseg",
        split="train",
        image=ImageRef("x.jpg", w, h),
        conversation=[Turn("user", "<image>\n<p>a</p>, <p>b</p>, <p>c</p>"), Turn("assistant", "<SEG>.")],
        phrases=["a", "b", "c"],
        masks=[MaskTarget(masks.encode(m0)[0], 0), MaskTarget(masks.encode(m1)[0], 2)],
    )
    colours = preview.phrase_colours(s)
    assert set(colours) == {0, 2} and colours[0] != colours[2]
    img = Image.new("RGB", (w, h), (100, 100, 100))
    out = preview.overlay(img, s)
    assert tuple(out[10, 10]) == colours[0]  # top edge of mask 0
    assert tuple(out[20, 5]) == colours[0]  # left edge
    assert tuple(out[20, 54]) == colours[2]  # right edge of mask 1
    assert tuple(out[5, 30]) == (100, 100, 100)
    assert tuple(out[20, 15]) == tuple(np.rint(0.45 * 100 + 0.55 * np.asarray(colours[0])).astype(int))
    runs = preview.conversation_runs(s)
    assert [(t, k) for kind, t, k in runs if kind == "phrase"] == [("a", 0), ("b", 1), ("c", 2)]


def test_regions_and_ignore_are_drawn():
    """Visual-prompt regions are hatched in their slot's colour and outlined; the ignore region is hatched
    grey; nothing is drawn outside them."""
    h, w = 48, 64
    r = np.zeros((h, w), np.uint8)
    r[8:40, 8:30] = 1
    ig = np.zeros((h, w), np.uint8)
    ig[8:40, 40:60] = 1
    target = np.zeros((h, w), np.uint8)
    target[2:6, 2:6] = 1
    s = Sample(
        key="demo/train/r",
        source="demo",
        task="vgdseg",
        split="train",
        image=ImageRef("r.jpg", w, h),
        conversation=[Turn("user", "<image>\n<p><region></p>"), Turn("assistant", "<SEG>.")],
        phrases=["<region>"],
        masks=[MaskTarget(masks.encode(target)[0], 0)],
        regions=[Region(0, "box", masks.encode(r)[0])],
        ignore=masks.encode(ig)[0],
    )
    colour = preview.phrase_colours(s)[0]
    out = preview.overlay(Image.new("RGB", (w, h), (0, 0, 0)), s)
    inner = out[11:37, 11:27].reshape(-1, 3)
    hatch = (inner == colour).all(1)
    assert 0.2 < hatch.mean() < 0.6  # stripes, not a fill
    assert ((inner == 0).all(1) | hatch).all()  # between stripes the image shows through
    assert tuple(out[8, 15]) == (255, 255, 255) and tuple(out[9, 15]) == colour  # white, then colour outline
    ig_px = out[10:38, 42:58].reshape(-1, 3)
    grey = (ig_px == preview.IGNORE_COLOUR).all(1)
    assert 0.1 < grey.mean() < 0.5 and ((ig_px == 0).all(1) | grey).all()
    assert (out[42:, 32:38] == 0).all()  # untouched elsewhere


def test_overlapping_masks_get_a_strip_and_tags(shards):
    """Masks one overlay would hide (here: one mask per turn, all the same) are detected; the tile grows a
    per-mask strip; phrase tags sit inside their mask."""
    m = np.zeros((60, 80), np.uint8)
    m[10:50, 10:70] = 1
    rle = masks.encode(m)[0]
    s = Sample(
        key="demo/train/o",
        source="demo",
        task="reaseg",
        split="train",
        image=ImageRef("o.jpg", 80, 60),
        conversation=[
            Turn("user", "<image>\n<p>q one</p>"),
            Turn("assistant", "<SEG>."),
            Turn("user", "<p>q two</p>"),
            Turn("assistant", "<SEG>."),
        ],
        phrases=["q one", "q two"],
        masks=[MaskTarget(rle, 0), MaskTarget(rle, 1)],
    )
    assert preview.masks_overlap(s, (80, 60))
    item = preview.PreviewItem(s, Image.new("RGB", (80, 60), (50, 50, 50)))
    tile = preview.render_tile(item)
    assert tile.height > 60 + 2 * 30  # header + image + strip
    for spot in preview.label_points(s, (80, 60)):
        assert m[spot.y, spot.x] == 1 and spot.box == (10, 10, 69, 49)
    # COCO panoptic segments never overlap
    items = first_items(shards, "coco_panoptic", "train", 2)
    assert not any(preview.masks_overlap(it.sample, it.image.size) for it in items)


def test_long_text_wraps_within_the_panel():
    font = preview._font(13)
    s = Sample(
        key="demo/train/t",
        source="demo",
        task="chat",
        split="train",
        image=None,
        conversation=[Turn("user", "word " * 200 + "x" * 300), Turn("assistant", "fine")],
    )
    lines = preview.layout_text(preview.conversation_runs(s), {}, 200, font, 17)
    assert len(lines) > 20
    for pieces in lines:
        x, text, _ = pieces[-1]
        assert x + font.getlength(text.rstrip()) <= 200 + 1
    tile = preview.render_tile(preview.PreviewItem(s, None))  # no image: a grey field, text truncated
    assert tile.height < 60 + 17 * (preview.TILE_MAX_TEXT_LINES + 2)


def test_cli_selects_sources(shards, tmp_path):
    import shutil

    out = tmp_path / "shards"
    shutil.copytree(shards, out, ignore=shutil.ignore_patterns("preview"))
    preview.main(["--out", str(out), "--source", "coco_instance", "--split", "val", "--n", "2"])
    sheets = sorted(p.name for p in (out / "preview" / "sheets").iterdir())
    assert sheets == ["coco_instance__val.png"]
    overlays = [
        p
        for p in (out / "preview" / "samples" / "coco_instance" / "val").glob("*.png")
        if not p.name.endswith(".masks.png")
    ]
    assert len(overlays) == 2
    with pytest.raises(OutputError, match="no built split of --source no_such_source"):
        preview.main(["--out", str(out), "--source", "no_such_source"])
