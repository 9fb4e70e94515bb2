"""Test helpers shared across packages: demo trees, building and reading back a split, edits of annotation
files, tiny images, hand-built Samples and synthetic shards. Model-only helpers are in
``tests/support/model.py``."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pipelines import shard_store
from pipelines.build.driver import build
from pipelines.demo_data import write_demo
from pipelines.masks import encode
from pipelines.schema import ImageRef, MaskTarget, Region, Sample, Turn, to_wds
from pipelines.sources.base import BuildOptions


# ---------------------------------------------------------------------------------------------- demo trees,
# builds
def demo_tree(folder: Path, *families: str) -> Path:
    """A fresh demo ``datas/`` tree of ``families`` under ``folder`` (a test may edit it)."""
    return write_demo(Path(folder) / "datas", families=list(families))


def read_split(out: Path, source: str, split: str = "train", with_images: bool = True):
    """``(manifest dict, samples, skipped rows)`` of ``<out>/<source>/<split>``.

    ``samples`` are ``(Sample, image bytes)`` pairs in shard order, or bare Samples with
    ``with_images=False``.
    """
    manifest = shard_store.Manifest.read(str(out), source, split)
    items = list(shard_store.iter_samples(str(out), source, split, manifest))
    skipped = shard_store.read_skipped(str(out), source, split)
    return manifest.to_dict(), (items if with_images else [sample for sample, _ in items]), skipped


def build_and_read(
    root: Path,
    out: Path,
    source: str,
    split: str = "train",
    *,
    overrides: dict | None = None,
    with_images: bool = True,
    **options,
):
    """Build one ``source``/``split`` inline with ``BuildOptions(**options)`` and read it back
    (:func:`read_split`)."""
    build(
        str(root),
        str(out),
        sources=[source],
        splits=[split],
        options=BuildOptions(**options),
        overrides={source: overrides} if overrides else None,
    )
    return read_split(out, source, split, with_images=with_images)


def manifest(out: Path, source: str, split: str = "train") -> dict:
    """The manifest JSON of a built split, as written."""
    return json.loads((Path(out) / source / split / "manifest.json").read_text())


def member_exts(out: Path, source: str, split: str = "train") -> list[str]:
    """The extension of every ``<key>.<ext>`` member of a split's shards, in tar order."""
    m = shard_store.Manifest.read(str(out), source, split)
    exts = []
    for shard in m.shards:
        with open(Path(out) / source / split / shard.file, "rb") as f:
            exts += [member.ext for member in shard_store.iter_members(f, read_data=False)]
    return exts


def edit_json(path: Path, fn: Callable[[object], None]) -> None:
    """Load a JSON file, let ``fn`` change it in place, write it back (to plant bad input)."""
    data = json.loads(Path(path).read_text())
    fn(data)
    Path(path).write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------- images, masks
def tiny_jpeg(value: int = 128, size: tuple[int, int] = (16, 12)) -> bytes:
    """A flat grey ``size`` = (width, height) JPEG whose level ``value`` identifies it."""
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def box_rle(y0: int, y1: int, x0: int, x1: int, h: int, w: int) -> dict:
    """The compressed RLE of the rectangle ``[y0:y1, x0:x1]`` in an ``h x w`` image."""
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return encode(m)[0]


# ---------------------------------------------------------------------------------------------- samples
def chat_sample(source: str, i: int, meta: dict | None = None, split: str = "train") -> Sample:
    """A one-turn chat Sample about a 16x12 image, numbered ``i``."""
    return Sample(
        key=f"{source}/{split}/{i:06d}",
        source=source,
        task="chat",
        split=split,
        image=ImageRef(path=f"x/{i}.jpg", width=16, height=12),
        conversation=[Turn("user", f"<image>\nWhat is {i}?"), Turn("assistant", f"It is {i}.")],
        meta=dict(meta or {}),
    )


SAMPLE_H, SAMPLE_W = 12, 16

# task -> (user turns, assistant turns, phrases, (mask labels), regions' labels): the smallest valid layout
_LAYOUTS = {
    "genseg": (["<image>\nSegment <p>dog</p>, <p>sky</p>."], ["Sure, <SEG>."], ["dog", "sky"], [0, 1], []),
    "ovseg": (["<image>\nSegment <p>cat</p>."], ["Sure, <SEG>."], ["cat"], [0], []),
    "gcgseg": (
        ["<image>\nDescribe it."],
        ["<p>A dog</p> on <p>grass</p>. <SEG>"],
        ["A dog", "grass"],
        [0, 1],
        [],
    ),
    "vgdseg": (["<image>\nFind <p><region></p>."], ["Sure, <SEG>."], ["<region>"], [0], [0]),
    "intseg": (["<image>\nSegment <p><region></p>."], ["Sure, <SEG>."], ["<region>"], [0], [0]),
    "refseg": (
        ["<image>\nSegment <p>the dog</p>.", "And <p>the sky</p>?"],
        ["It is <SEG>.", "Sure, <SEG>."],
        ["the dog", "the sky"],
        [0, 1],
        [],
    ),
    "reaseg": (["<image>\nWhat eats <p>bones</p>?"], ["It is <SEG>."], ["bones"], [0], []),
    "chat": (["<image>\nWhat is this?"], ["A dog."], [], [], []),
}


def task_sample(task: str) -> Sample:
    """A small valid Sample of ``task`` (docs/contracts.md#sample): one mask per label, one region per
    ``<region>``."""
    users, answers, phrases, labels, regions = _LAYOUTS[task]
    conv = [t for u, a in zip(users, answers, strict=True) for t in (Turn("user", u), Turn("assistant", a))]
    rle = box_rle(2, 8, 3, 10, SAMPLE_H, SAMPLE_W)
    return Sample(
        key=f"src_{task}/train/000001",
        source=f"src_{task}",
        task=task,
        split="train",
        image=ImageRef(path="img/1.jpg", width=SAMPLE_W, height=SAMPLE_H),
        conversation=conv,
        phrases=list(phrases),
        masks=[MaskTarget(rle=dict(rle), label=k) for k in labels],
        regions=[Region(label=k, type="box", rle=dict(rle)) for k in regions],
    )


# ---------------------------------------------------------------------------------------------- synthetic
# shards
def write_source(
    out: Path,
    source: str,
    shard_sizes: list[int],
    *,
    task: str = "chat",
    flagged: set[int] = frozenset(),
    manifest_counts: dict | None = None,
    split: str = "train",
) -> list[str]:
    """Synthetic shards + manifest for ``source`` in the builder's layout; returns the keys in order.

    Sample ``i`` gets ``meta.no_target = True`` when ``i`` is in ``flagged`` and the manifest counts them, as
    the writer does (``manifest_counts`` overrides or, with ``{"no_target": None}``, removes that count); its
    image is a tiny JPEG whose grey level encodes ``i`` (so tests can check bytes travel with their JSON)."""
    sdir = out / source / split
    sdir.mkdir(parents=True, exist_ok=True)
    keys, shards, i = [], [], 0
    for s, n in enumerate(shard_sizes):
        name = f"{source}-{split}-{s:06d}.tar"
        with wds.TarWriter(str(sdir / name), encoder=False, mtime=0.0) as w:
            for _ in range(n):
                sample = chat_sample(source, i, {"no_target": i in flagged} if flagged else None, split)
                w.write(to_wds(sample, tiny_jpeg(i % 256), "jpg"))
                keys.append(sample.key)
                i += 1
        shards.append({"file": name, "samples": n, "bytes": (sdir / name).stat().st_size, "sha256": None})
    counts = {
        "samples": i,
        "records_in": i,
        "skipped": 0,
        "no_target": len(flagged),
        **(manifest_counts or {}),
    }
    m = {
        "schema": 1,
        "source": source,
        "task": task,
        "split": split,
        "shards": shards,
        "counts": {k: v for k, v in counts.items() if v is not None},
        "skipped": {},
        "fingerprint": f"fp-{source}",
    }
    (sdir / "manifest.json").write_text(json.dumps(m))
    return keys
