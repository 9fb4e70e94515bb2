"""Scoring on real COCO files from public repositories (XSAM_REAL_DATA=../shared/real_data)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from orchestrate.evaluation import ground_truth as gt
from orchestrate.evaluation.run import score_predictions
from pipelines.build.driver import build
from tests.support.evaluation import set_lines, write_jsonl

PAN = "cocodataset+panopticapi__sample_data__"
MMDET = "open-mmlab+mmdetection__tests__data__coco_dummy__annotations__instances_val2017.json"


def _coco_base(tmp_path: Path) -> Path:
    base = tmp_path / "datas/img_genseg/coco2017"
    for d in ("annotations", "val2017", "panoptic_val2017"):
        (base / d).mkdir(parents=True)
    return base


@pytest.fixture
def real_panoptic(real_data, tmp_path) -> tuple[Path, Path]:
    return build_real_panoptic(real_data, tmp_path)


def build_real_panoptic(real_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """panopticapi's two real sample images built as ``coco_panoptic/val``: ``(datas, shards)``."""
    base = _coco_base(tmp_path)
    shutil.copy(real_data / f"{PAN}panoptic_examples.json", base / "annotations/panoptic_val2017.json")
    for image_id in ("000000142238", "000000439180"):
        shutil.copy(real_data / f"{PAN}input_images__{image_id}.jpg", base / f"val2017/{image_id}.jpg")
        shutil.copy(
            real_data / f"{PAN}panoptic_examples__{image_id}.png", base / f"panoptic_val2017/{image_id}.png"
        )
    build(
        str(tmp_path / "datas"),
        str(tmp_path / "shards"),
        sources=["coco_panoptic"],
        splits=["val"],
    )
    return tmp_path / "datas", tmp_path / "shards"


def test_real_panoptic_ground_truth_scores_100_and_crowd_rules_apply(real_panoptic, tmp_path):
    datas, shards = real_panoptic
    name = "coco_panoptic/val"
    evs = gt.open_set(str(shards), str(datas), name)
    crowd = {k: sorted(c for _, c in v[1]) for k, v in evs.crowd.items()}
    assert crowd == {f"{name}/000000142238": [1], f"{name}/000000439180": [1, 19]}
    lines = set_lines(shards, datas, name)
    result = score_predictions(str(write_jsonl(tmp_path / "p.jsonl", lines)), str(shards), str(datas))[name]
    assert all(v == 100.0 for v in result.values()), result
    # a predicted person segment exactly on the person crowd region: ignored, not a false positive
    key = f"{name}/000000142238"
    sample = next(s for sh in evs.shards for s in gt.iter_shard_samples(evs, sh) if s.key == key)
    region = gt.crowd_regions(evs, key, (sample.image.height, sample.image.width))[1]
    on_crowd = copy.deepcopy(lines)
    line = next(x for x in on_crowd if x["key"] == key)
    line["panoptic"].append({"rle": region, "category_id": 1})
    result = score_predictions(str(write_jsonl(tmp_path / "c.jsonl", on_crowd)), str(shards), str(datas))[
        name
    ]
    assert result["PQ"] == 100.0
    line["panoptic"][-1]["category_id"] = 3  # the same pixels as a car: a false positive of class 3
    result = score_predictions(str(write_jsonl(tmp_path / "d.jsonl", on_crowd)), str(shards), str(datas))[
        name
    ]
    assert result["PQ"] < 100.0 and result["PQ_st"] == 100.0


def real_instances(real_data: Path, tmp_path: Path) -> tuple[Path, Path, Path, dict]:
    """mmdetection's real COCO instances file (one crowd RLE among polygons) built as ``coco_instance/val``:
    ``(datas, shards, the file, its JSON)``."""
    base = _coco_base(tmp_path)
    src = json.loads((real_data / MMDET).read_text())
    shutil.copy(real_data / MMDET, base / "annotations/instances_val2017.json")
    for img in src["images"]:  # the real JPEGs are not shipped; blank ones of the right size stand in
        Image.new("RGB", (img["width"], img["height"]), (90, 90, 90)).save(
            base / "val2017" / img["file_name"]
        )
    datas, shards = tmp_path / "datas", tmp_path / "shards"
    build(str(datas), str(shards), sources=["coco_instance"], splits=["val"])
    return datas, shards, base / "annotations/instances_val2017.json", src


def test_real_instances_ap_equals_cocoeval_on_the_original_file(real_data, tmp_path):
    """``standard``: COCOeval on the original file (crowd as ignore regions, the file's areas)."""
    datas, shards, base_file, _ = real_instances(real_data, tmp_path)
    base = base_file.parent.parent
    name = "coco_instance/val"
    lines = set_lines(shards, datas, name)
    std = {"protocol": "standard"}
    perfect = score_predictions(
        str(write_jsonl(tmp_path / "p.jsonl", lines)), str(shards), str(datas), **std
    )[name]
    assert perfect["AP"] == 100.0 and perfect["AP50"] == 100.0
    rng = np.random.default_rng(0)
    for line in lines:  # lower, tied and shuffled scores, a wrong category
        for j, inst in enumerate(line["instances"]):
            inst["score"] = float(rng.choice([0.3, 0.5, 0.9]))
            if j == 1:
                inst["category_id"] = 2
    got = score_predictions(str(write_jsonl(tmp_path / "q.jsonl", lines)), str(shards), str(datas), **std)[
        name
    ]
    evs = gt.open_set(str(shards), str(datas), name)
    key_to_id = {s.key: s.meta["image_id"] for sh in evs.shards for s in gt.iter_shard_samples(evs, sh)}
    dets = [
        {
            "image_id": key_to_id[x["key"]],
            "category_id": i["category_id"],
            "segmentation": i["rle"],
            "score": i["score"],
        }
        for x in lines
        for i in x["instances"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(base / "annotations/instances_val2017.json"))
        ev = COCOeval(coco, coco.loadRes(dets), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    expected = {n: (100 * v if v > -1 else None) for n, v in zip(names, ev.stats[:6], strict=True)}
    assert {k: (None if v != v else v) for k, v in got.items()} == expected
    assert got["AP"] < 100.0
