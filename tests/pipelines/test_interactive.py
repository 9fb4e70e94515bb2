"""coco_interactive: one sample per (annotation, prompt type), stored prompts used as given, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines import masks, vprompts
from pipelines.build.driver import build
from pipelines.demo_data import write_demo
from pipelines.errors import StrictModeError
from pipelines.schema import REGION, validate
from pipelines.sources.base import BuildOptions
from tests.support import data

ANN = "img_intseg/coco_int/annotations/coco_interactive_val_psalm.json"


@pytest.fixture
def int_root(tmp_path) -> Path:
    return write_demo(tmp_path / "datas", families=["interactive"])


def read_split(out: Path, split: str = "val"):
    return data.read_split(out, "coco_interactive", split, with_images=False)


def test_one_sample_per_annotation_and_type_with_prompts_as_given(int_root, tmp_path):
    build(str(int_root), str(tmp_path / "out"), sources=["coco_interactive"], splits=["train", "val"])
    items = json.loads((int_root / ANN).read_text())
    anns = {a["id"]: a for it in items for a in it["anns"]}
    manifest, samples, _ = read_split(tmp_path / "out")
    assert len(samples) == 4 * len(anns) == manifest["counts"]["samples"]
    assert [s.key for s in samples] == sorted(s.key for s in samples)
    for s in samples:
        validate(s)
        kind = s.meta["prompt_type"]
        assert s.key.endswith(f"_{kind}") and s.phrases == [REGION] and s.regions[0].type == kind
        assert len(s.masks) == 1 and s.masks[0].label == 0
        a = anns[s.meta["ann_id"]]
        np.testing.assert_array_equal(masks.decode(s.masks[0].rle), masks.decode(a["segmentation"]))
        stored = masks.decode(a[f"{kind}_visual_prompt_mask"])
        region = masks.decode(s.regions[0].rle)
        if kind in ("point", "scribble"):  # dilated by a disk of radius 10 / 5
            r = {"point": 10, "scribble": 5}[kind]
            np.testing.assert_array_equal(region, cv2.dilate(stored, vprompts.disk(r)))
        else:
            np.testing.assert_array_equal(region, stored)
    assert read_split(tmp_path / "out", "train")[0]["counts"]["samples"] > 0


def test_bad_prompts_are_skipped_with_a_reason(int_root, tmp_path):
    path = int_root / ANN
    items = json.loads(path.read_text())
    a0, a1 = items[0]["anns"][:2]
    a0["box_visual_prompt_mask"] = masks.encode(np.zeros((240, 320), dtype=bool))[0]  # empty
    a0["mask_visual_prompt_mask"] = masks.encode(np.ones((7, 7), dtype=bool))[0]  # wrong size
    del a1["point_visual_prompt_mask"]  # missing
    a1["segmentation"] = [[1, 2, 3, 4]]  # a polygon with two points: every type of a1 is skipped
    path.write_text(json.dumps(items))
    build(str(int_root), str(tmp_path / "out"), sources=["coco_interactive"], splits=["val"])
    manifest, samples, skipped = read_split(tmp_path / "out")
    assert manifest["skipped"] == {
        "empty_prompt": 1,
        "rle_size_mismatch": 1,
        "missing_visual_prompt": 1,
        "bad_polygon": 3,
    }
    assert manifest["counts"]["records_in"] == len(samples) + 6
    reasons = {r["key"].rsplit("_", 1)[-1]: r["reason"] for r in skipped if str(a0["id"]) in r["key"]}
    assert reasons == {"box": "empty_prompt", "mask": "rle_size_mismatch"}
    with pytest.raises(StrictModeError):
        build(
            str(int_root),
            str(tmp_path / "strict"),
            sources=["coco_interactive"],
            splits=["val"],
            options=BuildOptions(strict=True),
        )
