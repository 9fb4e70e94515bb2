"""Conversion throughput of ``refcoco`` per Ray worker (target >= 300 samples/s per worker).

    python bench/refcoco.py                 # 5,000 refs over 2,000 COCO-sized (640x480) images, 2 Ray workers
    python bench/refcoco.py --small         # 500 refs, a quick check
    python bench/refcoco.py --refs 20000 --workers 4 --size 320x240

The corpus is the demo refcoco scaled up, written under a temp dir: a Python-2-protocol ``refs(unc).p`` with
decoy file names, ``instances.json`` with every object of each image (referred or not), train2014 JPEGs drawn
with ``pipelines.demo.draw`` (``--scenes`` distinct drawings shared round-robin by the image files), 2.5 refs
per image and 2-4 sentences per ref with case duplicates, as in RefCOCO; 85 % of the images are train, the
rest val/testA/testB. Figures, for the train split (multi-turn samples, X-SAM's count) and for val (one sample
per sentence):

- baseline: what the reference loaders do, measured here on the same files: ``pickle.load`` + ``json.load``
  + REFER's index, then per sample every turn's polygons decoded to a dense mask and the image opened and
  decoded with PIL (X-SAM ``ImgRefSegDataset`` / LISA ``refer_seg_dataset``).
- to_sample only: our pure conversion over indexed records (no image check, no tar writing).
- build inline: ``pipelines.build.driver.build`` with Ray not initialised (one worker, indexing included).
- build Ray: the same under ``ray.init(num_cpus=W)``; per worker = samples / seconds that workers spent
  converting (shard completion markers), and samples / (wall x W) end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from pipelines.build.driver import build  # noqa: E402
from pipelines.demo.draw import jpeg_bytes, make_scene  # noqa: E402
from pipelines.demo.refer import COLOURS, THINGS, dumps_py2  # noqa: E402
from pipelines.sources import SOURCES  # noqa: E402
from pipelines.sources.base import BuildOptions, ConvertContext, Shared, Skip  # noqa: E402
from pipelines.sources.refer import combinations  # noqa: E402

TARGET = 300.0  # samples/s per worker
BASE = "img_refseg/refcocos"


def write_corpus(root: Path, n_refs: int, n_scenes: int, size: tuple[int, int], rng: random.Random) -> None:
    """A refcoco folder with ``n_refs`` refs, 2.5 per image, scenes drawn once and shared by file."""
    width, height = size
    img_dir = root / BASE / "images/train2014"
    img_dir.mkdir(parents=True)
    scenes = []
    for _ in range(n_scenes):
        arr, objs = make_scene(rng, width, height, rng.sample(list(THINGS), 4), ["sky", "grass"])
        things = [o for o in objs if o.kind != "stuff" and o.mask.any()]
        scenes.append((jpeg_bytes(arr), things))
    n_images = max(1, round(n_refs / 2.5))
    images, anns, refs = [], [], []
    ann_id, sent_id = 1, 0
    for i in range(n_images):
        image_id = 1_000_000 + i
        data, things = scenes[i % n_scenes]
        fname = f"COCO_train2014_{image_id:012d}.jpg"
        (img_dir / fname).write_bytes(data)
        images.append({"id": image_id, "file_name": fname, "width": width, "height": height})
        r = rng.random()
        split = "train" if r < 0.85 else "val" if r < 0.92 else "testA" if r < 0.96 else "testB"
        n_here = min(len(things), 2 + (rng.random() < 0.5)) if len(refs) < n_refs else 0
        for k, obj in enumerate(things):
            anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": THINGS[obj.category],
                    "iscrowd": 0,
                    "segmentation": [[round(v, 2) for v in obj.polygon]],
                    "area": float(obj.mask.sum()),
                    "bbox": [
                        float(v)
                        for v in mask_utils.toBbox(
                            mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
                        )
                    ],
                }
            )
            if k < n_here and len(refs) < n_refs:
                colour = COLOURS[k % len(COLOURS)]
                texts = [
                    f"{colour} {obj.category}",
                    f"the {obj.category} number {k}",
                    f"The {colour.upper()} {obj.category}",
                    f"{obj.category} {rng.randint(0, 9)}",
                ][: rng.randint(2, 4)]
                sents = []
                for t in texts:
                    sents.append({"tokens": t.lower().split(), "raw": t, "sent_id": sent_id, "sent": t})
                    sent_id += 1
                refs.append(
                    {
                        "sent_ids": [s["sent_id"] for s in sents],
                        "file_name": f"{fname[:-4]}_{k}.jpg",
                        "ann_id": ann_id,
                        "ref_id": len(refs),
                        "image_id": image_id,
                        "split": split,
                        "sentences": sents,
                        "category_id": THINGS[obj.category],
                    }
                )
            ann_id += 1
    cats = [{"id": i, "name": n, "supercategory": n} for n, i in THINGS.items()]
    d = root / BASE / "refcoco"
    d.mkdir(parents=True)
    (d / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (d / "refs(unc).p").write_bytes(dumps_py2(refs))


def baseline(root: Path, split: str) -> tuple[int, float]:
    """Reference-style loading: plain pickle + json.load + REFER index; per sample dense masks and PIL
    decode."""
    t0 = time.perf_counter()
    d = root / BASE / "refcoco"
    with open(d / "refs(unc).p", "rb") as f:
        refs = pickle.load(
            f, encoding="latin1"
        )  # what LISA / X-SAM do (the unsafe part is the point of ours)
    with open(d / "instances.json") as f:
        inst = json.load(f)
    anns = {a["id"]: a for a in inst["annotations"]}
    imgs = {i["id"]: i for i in inst["images"]}
    by_image = defaultdict(list)
    for r in refs:
        if r["split"] == split:
            by_image[r["image_id"]].append((r["ann_id"], sorted({s["sent"].lower() for s in r["sentences"]})))
    n = 0
    for iid, objs in by_image.items():
        img = imgs[iid]
        if split == "train":
            groups = [objs] * len(combinations([len(s) for _, s in objs]))
        else:
            groups = [[o] for o in objs for _ in o[1]]
        for group in groups:
            im = Image.open(root / BASE / "images/train2014" / img["file_name"])
            im.load()
            for ann_id, _ in group:
                rles = mask_utils.frPyObjects(anns[ann_id]["segmentation"], img["height"], img["width"])
                mask_utils.decode(mask_utils.merge(rles))
            n += 1
    return n, time.perf_counter() - t0


def to_sample_only(root: Path, split: str) -> tuple[int, float]:
    src = SOURCES["refcoco"]
    options = BuildOptions()
    files = src.locate(str(root), split)
    records = [it for it in src.index(files, split, options) if not isinstance(it, Skip | Shared)]
    ctx = ConvertContext(data_root=str(root), split=split, options=options, files=files)
    t0 = time.perf_counter()
    for r in records:
        ctx.drops = []
        src.to_sample(r, ctx)
    return len(records), time.perf_counter() - t0


def part_seconds(out: Path, split: str) -> tuple[int, float]:
    parts = [json.loads(p.read_text()) for p in (out / "refcoco" / split / "_parts").glob("*.json")]
    return sum(p["samples"] for p in parts), sum(p["seconds"] for p in parts)


def timed_build(root: Path, out: Path, split: str, per_shard: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    (res,) = build(
        str(root),
        str(out),
        sources=["refcoco"],
        splits=[split],
        options=BuildOptions(samples_per_shard=per_shard),
    )
    return res.samples, time.perf_counter() - t0


def bench_split(root: Path, tmp: Path, split: str, workers: int, per_shard: int) -> float:
    print(
        f"\n[{split}] {'what':<44} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'x baseline':>10}",
        flush=True,
    )
    base = 0.0

    def row(what: str, n: int, s: float) -> float:
        print(
            f"[{split}] {what:<44} {n:>8} {s:>8.2f} {n / s:>10.1f} {n / s / (base or n / s):>10.2f}",
            flush=True,
        )
        return n / s

    base = row("baseline (reference-style load)", *baseline(root, split))
    row("to_sample only, 1 process", *to_sample_only(root, split))
    row("build inline, 1 worker (end to end)", *timed_build(root, tmp / f"inline-{split}", split, per_shard))
    row("  of which shard conversion", *part_seconds(tmp / f"inline-{split}", split))

    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        n, wall = timed_build(root, tmp / f"ray-{split}", split, per_shard)
    finally:
        ray.shutdown()
    row(f"build Ray, {workers} workers (end to end)", n, wall)
    row("  per worker, end to end (n / wall / W)", n, wall * workers)
    return row("  per worker, converting (n / worker-s)", *part_seconds(tmp / f"ray-{split}", split))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refs", type=int, default=5000)
    p.add_argument("--scenes", type=int, default=64, help="distinct drawings shared by the image files")
    p.add_argument("--size", default="640x480", help="image WxH (COCO-like by default)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--small", action="store_true", help="500 refs over 16 scenes")
    args = p.parse_args()
    if args.small:
        args.refs, args.scenes = 500, 16
    size = tuple(int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="xsam-bench-refcoco-") as tmp:
        root = Path(tmp) / "datas"
        t0 = time.perf_counter()
        write_corpus(root, args.refs, args.scenes, size, random.Random(0))
        n_img = len(list((root / BASE / "images/train2014").iterdir()))
        print(
            f"corpus: {args.refs} refs over {n_img} images ({size[0]}x{size[1]}), "
            f"refs pickle {(root / BASE / 'refcoco/refs(unc).p').stat().st_size / 1e6:.1f} MB, "
            f"instances.json {(root / BASE / 'refcoco/instances.json').stat().st_size / 1e6:.1f} MB, "
            f"written in {time.perf_counter() - t0:.1f} s"
        )
        rates = {
            split: bench_split(root, Path(tmp), split, args.workers, args.samples_per_shard)
            for split in ("train", "val")
        }
        for split, rate in rates.items():
            print(
                f"\n[{split}] per-worker conversion {rate:.0f} samples/s vs target {TARGET:.0f}: "
                f"{'PASS' if rate >= TARGET else 'BELOW TARGET'} (cpus: {os.cpu_count()})"
            )


if __name__ == "__main__":
    main()
