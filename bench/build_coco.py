"""Benchmark the shard build on COCO-format data. Prints figures and ratios; asserts nothing.

    python bench/build_coco.py            # 2,000 panoptic images + a COCO-train-scale instances file
    python bench/build_coco.py --small    # 200 images + a 10k-image instances file (a quick check)

Part 1, coco_panoptic conversion (640x480, ~15 segments per image):
  - samples/s with 1 and 2 Ray workers (same build, fresh output each time), and the 2-vs-1 scaling;
  - the I/O floor measured in the same run: the same JPEG + PNG bytes written to a tar with no processing,
    and the same plus one PNG decode per image;
  - peak RSS of the driver and of the Ray worker processes (sampled with psutil while the build runs).
Part 2, planning a COCO-train-scale instances build (118k images, ~860k polygon annotations, ~380 MB; one
small JPEG hard-linked for every image): peak RSS and time of our streaming index (the driver's part of a
build: locate, hash inputs, index into chunk files) side by side with ``pycocotools.COCO()`` loading the same
file, each in its own subprocess so neither pollutes the other's peak RSS.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.demo.draw import id2rgb, jpeg_bytes, make_scene, png_bytes  # noqa: E402

THINGS = ["person", "car", "dog", "cat", "bicycle", "bus"]
STUFF = ["sky", "grass", "wall", "road"]


def write_panoptic_corpus(root: Path, n: int, seed: int = 0) -> None:
    """A COCO-panoptic train2017 tree of ``n`` 640x480 drawn scenes with ~15 segments each."""
    base = root / "img_genseg/coco2017"
    for d in ("annotations", "train2017", "panoptic_train2017"):
        (base / d).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    cats = [{"id": i + 1, "name": n_, "isthing": 1, "supercategory": "x"} for i, n_ in enumerate(THINGS)]
    cats += [
        {"id": 100 + i, "name": f"{n_}-merged", "isthing": 0, "supercategory": "x"}
        for i, n_ in enumerate(STUFF)
    ]
    cat_of = {c["name"].replace("-merged", ""): c["id"] for c in cats}
    images, anns = [], []
    for i in range(n):
        iid = i + 1
        things = [rng.choice(THINGS) for _ in range(13)]
        arr, objects = make_scene(rng, 640, 480, things, rng.sample(STUFF, 2))
        fname = f"{iid:012d}.jpg"
        (base / "train2017" / fname).write_bytes(jpeg_bytes(arr))
        id_map = np.zeros((480, 640), np.int64)
        segs = []
        for k, obj in enumerate(objects):
            if obj.mask.any():
                sid = k + 1 + 1000 * (k % 7)
                id_map[obj.mask] = sid
                segs.append(
                    {
                        "id": sid,
                        "category_id": cat_of[obj.category],
                        "iscrowd": 0,
                        "area": int(obj.mask.sum()),
                        "bbox": [0, 0, 1, 1],
                    }
                )
        (base / "panoptic_train2017" / fname.replace(".jpg", ".png")).write_bytes(png_bytes(id2rgb(id_map)))
        images.append({"id": iid, "file_name": fname, "width": 640, "height": 480})
        anns.append({"image_id": iid, "file_name": fname.replace(".jpg", ".png"), "segments_info": segs})
    (base / "annotations/panoptic_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )


class RssSampler:
    """Peak RSS of this process and of Ray worker processes, sampled every 50 ms in a thread."""

    def __init__(self):
        import psutil

        self.psutil, self.stop, self.driver, self.worker = psutil, threading.Event(), 0, 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = self.psutil.Process()
        while not self.stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for p in self.psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if cmd.startswith("ray::") and "convert" in cmd.lower() or cmd.startswith("ray::IDLE"):
                    self.worker = max(self.worker, p.info["memory_info"].rss if p.info["memory_info"] else 0)
            self.stop.wait(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def io_floor(root: Path, out: Path, decode: bool) -> float:
    """samples/s of writing the same JPEG+PNG bytes to a tar (optionally decoding each PNG once)."""
    from PIL import Image

    base = root / "img_genseg/coco2017"
    jpgs = sorted((base / "train2017").iterdir())
    t0 = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for p in jpgs:
            png = (base / "panoptic_train2017" / p.name.replace(".jpg", ".png")).read_bytes()
            if decode:
                np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            for name, data in ((p.name, p.read_bytes()), (p.name + ".png", png)):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    return len(jpgs) / (time.perf_counter() - t0)


def part1(tmp: Path, n: int) -> None:
    import ray

    from pipelines.build.driver import build
    from pipelines.sources.base import BuildOptions

    data = tmp / "datas"
    t0 = time.perf_counter()
    write_panoptic_corpus(data, n)
    print(f"corpus: {n} images 640x480 written in {time.perf_counter() - t0:.1f} s")
    floor = io_floor(data, tmp / "floor.tar", decode=False)
    floor_dec = io_floor(data, tmp / "floor_dec.tar", decode=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates = {}
    try:
        for workers in (1, 2):
            with RssSampler() as rss:
                t0 = time.perf_counter()
                res = build(
                    str(data),
                    str(tmp / f"out{workers}"),
                    sources=["coco_panoptic"],
                    options=BuildOptions(samples_per_shard=100),
                    num_workers=workers,
                )
                dt = time.perf_counter() - t0
            rates[workers] = res[0].samples / dt
            # time inside the conversion tasks alone (their completion markers record it): excludes indexing,
            # Ray scheduling and each worker's one-time imports
            parts = [
                json.loads(p.read_text())
                for p in (tmp / f"out{workers}/coco_panoptic/train/_parts").glob("*.json")
            ]
            task_rate = sum(p["samples"] for p in parts) / sum(p["seconds"] for p in parts)
            print(
                f"coco_panoptic, {workers} Ray worker(s): {res[0].samples} samples in {dt:.1f} s = "
                f"{rates[workers]:.0f} samples/s end to end ({rates[workers] / workers:.0f} per worker); "
                f"{task_rate:.0f} samples/s per worker inside conversion tasks; "
                f"peak RSS driver {rss.driver / 2**20:.0f} MiB, worker {rss.worker / 2**20:.0f} MiB"
            )
    finally:
        ray.shutdown()
    print(
        f"I/O floor (tar of the same bytes): {floor:.0f} samples/s; with one PNG decode: {floor_dec:.0f} samples/s"
    )
    print(
        f"ratios: 2 workers / 1 worker = {rates[2] / rates[1]:.2f}x (target >= 1.7); "
        f"1 worker / I/O floor with decode = {rates[1] / floor_dec:.2f}"
    )


def write_instances_corpus(root: Path, n_images: int, anns_per_image: float, seed: int = 1) -> Path:
    """A COCO-instances file at train scale, streamed to disk; every image is a hard link to one JPEG."""
    from PIL import Image

    base = root / "img_genseg/coco2017"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    (base / "train2017").mkdir(exist_ok=True)
    ones = []  # ext4 allows ~65k links per inode: one source JPEG per 50k images
    for k in range(n_images // 50_000 + 1):
        ones.append(base / f"one{k}.jpg")
        Image.new("RGB", (64, 48), (120, 120, 120)).save(ones[-1])
    rng = np.random.default_rng(seed)
    path = base / "annotations/instances_train2017.json"
    ann_id = 0
    with open(path, "w") as f:
        f.write('{"info": {}, "images": [')
        for i in range(n_images):
            fname = f"{i + 1:012d}.jpg"
            os.link(ones[i // 50_000], base / "train2017" / fname)
            f.write(
                ("," if i else "") + json.dumps({"id": i + 1, "file_name": fname, "width": 64, "height": 48})
            )
        f.write('], "annotations": [')
        n_anns = int(n_images * anns_per_image)
        img_of = rng.integers(1, n_images + 1, size=n_anns)
        for k in range(n_anns):
            pts = rng.uniform(0, 47, size=(20, 2)).round(2).ravel().tolist()
            ann_id += 1
            f.write(
                ("," if k else "")
                + json.dumps(
                    {
                        "id": ann_id,
                        "image_id": int(img_of[k]),
                        "category_id": int(rng.integers(1, 91)),
                        "iscrowd": 0,
                        "segmentation": [pts],
                        "area": 100.0,
                        "bbox": [1.0, 2.0, 10.0, 10.0],
                    }
                )
            )
        f.write('], "categories": [')
        f.write(
            ",".join(json.dumps({"id": c, "name": f"cat{c}", "supercategory": "x"}) for c in range(1, 91))
        )
        f.write("]}")
    return path


HWM = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"  # peak RSS in KiB of this exec'd
# process (ru_maxrss would report the larger parent's: Linux keeps it across exec)
PLAN = """
import sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
import ray  # what the build driver imports, so its footprint is counted
from pipelines.build import driver as build, shards
from pipelines.build.chunks import spill
from pipelines.sources import SOURCES
src = SOURCES["coco_instance"]
files = src.locate({data!r}, "train")
shards.hash_inputs(files)
chunks, skips, shared = spill(src.index(files, "train", __import__("pipelines.sources.base").sources.base.BuildOptions()),
                              {out!r}, {out!r} + "/_index", 1000)
print(time.perf_counter() - t0, {hwm}, sum(c.records for c in chunks))
"""
COCO = """
import sys, time
t0 = time.perf_counter()
from pycocotools.coco import COCO
c = COCO({path!r})
print(time.perf_counter() - t0, {hwm}, len(c.imgs))
"""


def part2(tmp: Path, n_images: int) -> None:
    t0 = time.perf_counter()
    path = write_instances_corpus(tmp / "big", n_images, 7.3)
    print(
        f"instances corpus: {n_images} images, {path.stat().st_size / 1e6:.0f} MB, written in {time.perf_counter() - t0:.0f} s"
    )
    ours = (
        subprocess.run(
            [
                sys.executable,
                "-c",
                PLAN.format(root=str(ROOT), data=str(tmp / "big"), out=str(tmp / "plan"), hwm=HWM),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.splitlines()[-1]
        .split()
    )
    ref = (
        subprocess.run(
            [sys.executable, "-c", COCO.format(path=str(path), hwm=HWM)],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.splitlines()[-1]
        .split()
    )  # pycocotools prints progress lines first
    (t_ours, rss_ours, n_ours), (t_ref, rss_ref, n_ref) = map(float, ours), map(float, ref)
    assert int(n_ours) == int(n_ref) == n_images
    print(
        f"planning (hash + streaming index into chunk files): {t_ours:.1f} s, peak RSS {rss_ours / 1024:.0f} MiB"
    )
    print(
        f"pycocotools.COCO() load:                            {t_ref:.1f} s, peak RSS {rss_ref / 1024:.0f} MiB"
    )
    print(
        f"ratios: RSS {rss_ours / rss_ref:.3f}x (target <= 0.1), time {t_ours / t_ref:.2f}x (target <= 1.0)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true")
    p.add_argument("--skip-scale", action="store_true", help="only the conversion part")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="xsam-bench-") as tmp:
        part1(Path(tmp), 200 if args.small else 2000)
        if not args.skip_scale:
            part2(Path(tmp), 10_000 if args.small else 118_000)


if __name__ == "__main__":
    main()
