"""Conformance on real COCO files from public repositories (XSAM_REAL_DATA=../shared/real_data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import masks
from pipelines.build.driver import build
from tests.support.data import read_split

PAN = "cocodataset+panopticapi__sample_data__"
MMDET = "open-mmlab+mmdetection__tests__data__coco_dummy__annotations__instances_val2017.json"


def _coco_root(tmp_path: Path) -> Path:
    base = tmp_path / "datas/img_genseg/coco2017"
    for d in ("annotations", "val2017", "panoptic_val2017"):
        (base / d).mkdir(parents=True)
    return base


def test_real_panoptic_sample_matches_detection_format_rles(real_data, tmp_path):
    base = _coco_root(tmp_path)
    shutil.copy(real_data / f"{PAN}panoptic_examples.json", base / "annotations/panoptic_val2017.json")
    for image_id in ("000000142238", "000000439180"):
        shutil.copy(real_data / f"{PAN}input_images__{image_id}.jpg", base / f"val2017/{image_id}.jpg")
        shutil.copy(
            real_data / f"{PAN}panoptic_examples__{image_id}.png", base / f"panoptic_val2017/{image_id}.png"
        )
    build(str(tmp_path / "datas"), str(tmp_path / "out"), sources=["coco_panoptic"], splits=["val"])
    manifest, samples, _ = read_split(tmp_path / "out", "coco_panoptic", "val")
    assert manifest["counts"]["samples"] == 2 and manifest["skipped"] == {} and manifest["dropped"] == {}
    detection = json.loads((real_data / f"{PAN}panoptic_coco_detection_format.json").read_text())
    pan = json.loads((real_data / f"{PAN}panoptic_examples.json").read_text())
    checked = 0
    for sample, image in samples:
        assert image == (tmp_path / "datas" / sample.image.path).read_bytes()
        iid = sample.meta["image_id"]
        segs = {s["id"]: s for a in pan["annotations"] if a["image_id"] == iid for s in a["segments_info"]}
        refs = [a for a in detection["annotations"] if a["image_id"] == iid]
        for m, seg_id in zip(sample.masks, sample.meta["ann_ids"], strict=True):
            seg = segs[seg_id]
            # the detection-format file lists the same segments; match them by category, area and box
            ref = [
                r
                for r in refs
                if r["category_id"] == seg["category_id"]
                and r["area"] == seg["area"]
                and [int(v) for v in r["bbox"]] == [int(v) for v in seg["bbox"]]
            ]
            assert len(ref) == 1
            np.testing.assert_array_equal(masks.decode(m.rle), masks.decode(ref[0]["segmentation"]))
            assert m.area == seg["area"]
            checked += 1
    assert checked == sum(not s["iscrowd"] for a in pan["annotations"] for s in a["segments_info"])


def test_real_mmdet_instances_convert_with_crowd_as_ignore(real_data, tmp_path):
    base = _coco_root(tmp_path)
    src = json.loads((real_data / MMDET).read_text())
    shutil.copy(real_data / MMDET, base / "annotations/instances_val2017.json")
    for img in src["images"]:  # the real JPEGs are not shipped; blank ones of the right size stand in
        Image.new("RGB", (img["width"], img["height"]), (90, 90, 90)).save(
            base / "val2017" / img["file_name"]
        )
    build(str(tmp_path / "datas"), str(tmp_path / "out"), sources=["coco_instance"], splits=["val"])
    manifest, samples, _ = read_split(tmp_path / "out", "coco_instance", "val")
    assert manifest["counts"]["samples"] == 2 and manifest["dropped"] == {}
    crowd = [a for a in src["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1
    n_targets = sum(len(s.masks) for s, _ in samples)
    assert n_targets == len(src["annotations"]) - 1
    with_crowd = [s for s, _ in samples if s.meta["image_id"] == crowd[0]["image_id"]][0]
    assert crowd[0]["id"] not in with_crowd.meta["ann_ids"]
    # the crowd RLE's own pixel count (3386), not its stored area (4015): a real COCO quirk
    assert masks.area(with_crowd.ignore) == 3386
    by_id = {a["id"]: a for a in src["annotations"]}
    for s, _ in samples:
        for m, ann_id in zip(s.masks, s.meta["ann_ids"], strict=True):
            expected = masks.segmentation_to_rle(by_id[ann_id]["segmentation"], s.image.height, s.image.width)
            assert m.rle == expected
            assert abs(m.area - by_id[ann_id]["area"]) / by_id[ann_id]["area"] < 0.05
