"""coco_vgd: slots and labels, prompts near their instances, both input forms, determinism, bad inputs,
guard."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipelines import masks
from pipelines.build.driver import BuildConfigError, build
from pipelines.demo_data import write_demo
from pipelines.errors import StrictModeError
from pipelines.schema import REGION, validate
from pipelines.sources.base import BuildOptions
from pipelines.vprompts import PROMPT_TYPES
from tests.support import data

VGD = "img_vgdseg/coco_vgd"
VAL_SPLITS = [f"val_{t}" for t in PROMPT_TYPES]


@pytest.fixture
def vgd_root(tmp_path) -> Path:
    return write_demo(tmp_path / "datas", families=["vgd"])


def read_split(out: Path, source: str, split: str):
    return data.read_split(out, source, split, with_images=False)


def _bbox_grown(rle: dict, by: float) -> tuple[float, float, float, float]:
    x, y, w, h = masks.bbox(rle)
    return x - by, y - by, x + w + by, y + h + by


def _inside(inner: dict, outer: tuple[float, float, float, float]) -> bool:
    x, y, w, h = masks.bbox(inner)
    return x >= outer[0] and y >= outer[1] and x + w <= outer[2] and y + h <= outer[3]


def test_generated_train_slots_labels_and_prompts(vgd_root, tmp_path):
    out = tmp_path / "out"
    build(str(vgd_root), str(out), sources=["coco_vgd"])
    manifest, samples, _ = read_split(out, "coco_vgd", "train")
    assert manifest["info"] == {"prompts": "generated"} and len(samples) == 6
    inst = json.loads((vgd_root / VGD / "coco2017/annotations/instances_train2017.json").read_text())
    anns = {a["id"]: a for a in inst["annotations"]}
    types = Counter()
    for s in samples:
        validate(s)
        slots = s.meta["slot_category_ids"]
        assert s.phrases == [REGION] * len(slots) and len(set(slots)) == len(slots)
        assert [r.label for r in s.regions] == list(range(len(slots)))
        assert s.conversation[0].text.count("<p><region></p>") == len(slots)
        # every non-crowd instance of a slot's category is a target labelled by that slot
        image_anns = [a for a in anns.values() if a["image_id"] == s.meta["image_id"] and not a["iscrowd"]]
        expected = sorted(a["id"] for a in image_anns if a["category_id"] in slots)
        assert sorted(s.meta["ann_ids"]) == expected
        for m in s.masks:
            assert slots[m.label] == m.category_id
        # each region's prompt comes from an instance of its slot's category and lies near it
        for r, aid in zip(s.regions, s.meta["prompt_ann_ids"], strict=True):
            types[r.type] += 1
            assert anns[aid]["category_id"] == slots[r.label]
            src = next(m.rle for m, i in zip(s.masks, s.meta["ann_ids"], strict=True) if i == aid)
            assert masks.area(r.rle) > 0 and _inside(r.rle, _bbox_grown(src, 40))
    assert set(types) <= set(PROMPT_TYPES) and len(types) >= 3  # types drawn per region
    # a category with two instances: one region, two targets
    assert any(len(s.masks) > len(s.regions) for s in samples)
    assert any(s.ignore is not None for s in samples)  # the crowd instance


def test_released_val_one_split_per_prompt_type(vgd_root, tmp_path):
    out = tmp_path / "out"
    build(str(vgd_root), str(out), sources=["coco_vgd"], splits=VAL_SPLITS)
    released = json.loads((vgd_root / VGD / "annotations/img_vgdseg_coco_val.json").read_text())
    prompts = {a["id"]: a["visual_prompts"] for e in released for a in e["annotations"]}
    for split, kind in zip(VAL_SPLITS, PROMPT_TYPES, strict=True):
        manifest, samples, skipped = read_split(out, "coco_vgd", split)
        assert manifest["info"] == {"prompts": "released"} and len(samples) == 3
        assert [s.key for s in samples] == sorted(s.key for s in samples)  # the file is shuffled
        for s in samples:
            validate(s)
            assert {r.type for r in s.regions} == {kind}
            assert s.meta["slot_category_ids"] == sorted(s.meta["slot_category_ids"])  # eval: id order
            for r, aid in zip(s.regions, s.meta["prompt_ann_ids"], strict=True):
                assert r.rle == prompts[aid][f"{kind}_visual_prompt"]  # used as given
        if kind == "scribble":  # one instance has no scribble and is its category's only one
            assert manifest["dropped"] == {"no_visual_prompt": 1}
        else:
            assert manifest["dropped"] == {} and skipped == []


def test_rebuild_is_byte_identical_and_seed_changes_prompts(vgd_root, tmp_path):
    sha = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build(str(vgd_root), str(tmp_path / name), sources=["coco_vgd"], options=BuildOptions(seed=seed))
        m = json.loads((tmp_path / name / "coco_vgd/train/manifest.json").read_text())
        sha[name] = [s["sha256"] for s in m["shards"]]
    assert sha["a"] == sha["b"] != sha["c"]


def test_coco_instances_fallback_when_coco_vgd_is_absent(tmp_path):
    root = write_demo(tmp_path / "datas", families=["coco"])
    build(str(root), str(tmp_path / "out"), sources=["coco_vgd"], splits=["train", "val_box"])
    for split in ("train", "val_box"):
        manifest, samples, _ = read_split(tmp_path / "out", "coco_vgd", split)
        assert manifest["dirs"]["images"] == f"img_genseg/coco2017/{split.split('_')[0]}2017"
        assert samples and all(validate(s) is None for s in samples)
    with pytest.raises(BuildConfigError, match="not found"):
        build(str(tmp_path / "datas"), str(tmp_path / "o2"), sources=["coco_interactive"])


def test_eval_guard_applies_to_the_train_split(tmp_path):
    root = write_demo(tmp_path / "datas", families=["vgd", "refer"])
    build(str(root), str(tmp_path / "out"), sources=["coco_vgd"], splits=["train", "val_mask"])
    manifest, samples, _ = read_split(tmp_path / "out", "coco_vgd", "train")
    assert manifest["skipped"] == {"eval_image_leak": 2}  # demo refer eval images 16 (val) and 30 (testA)
    assert {s.meta["image_id"] for s in samples} == {9, 23, 37, 44}
    assert read_split(tmp_path / "out", "coco_vgd", "val_mask")[0]["skipped"] == {}


# ----------------------------------------------------------------------------- bad input
def test_instance_too_small_for_any_prompt_is_dropped_not_retried(vgd_root, tmp_path):
    path = vgd_root / VGD / "coco2017/annotations/instances_train2017.json"
    d = json.loads(path.read_text())
    first = d["images"][0]["id"]
    for a in d["annotations"]:  # every instance of image 0 shrinks to 2x2 px: the record cannot be prompted
        if a["image_id"] == first:
            a["segmentation"] = [[10.0, 10.0, 12.0, 10.0, 12.0, 12.0, 10.0, 12.0]]
    path.write_text(json.dumps(d))
    build(str(vgd_root), str(tmp_path / "out"), sources=["coco_vgd"])
    manifest, samples, skipped = read_split(tmp_path / "out", "coco_vgd", "train")
    assert manifest["skipped"] == {"mask_too_small_for_prompt": 1}
    # the demo's 4-pixel instance whose category has no other instance: dropped, its image still written
    assert manifest["dropped"] == {"mask_too_small_for_prompt": 1}
    rows = {(r["level"], r["reason"]) for r in skipped}
    assert rows == {("record", "mask_too_small_for_prompt"), ("annotation", "mask_too_small_for_prompt")}
    assert len(samples) == 5
    with pytest.raises(StrictModeError, match="mask_too_small_for_prompt"):
        build(
            str(vgd_root), str(tmp_path / "strict"), sources=["coco_vgd"], options=BuildOptions(strict=True)
        )


def test_released_prompt_of_the_wrong_size_is_skipped(vgd_root, tmp_path):
    path = vgd_root / VGD / "annotations/img_vgdseg_coco_val.json"
    entries = json.loads(path.read_text())
    wrong = masks.encode(np.ones((7, 7), dtype=bool))[0]
    for a in entries[0]["annotations"]:  # every point prompt of one image: that record is skipped
        a["visual_prompts"]["point_visual_prompt"] = wrong
    entries[1]["annotations"][0]["visual_prompts"]["box_visual_prompt"] = wrong  # one prompt of another
    entries.append(json.loads(json.dumps(entries[2])))  # and a duplicated image
    path.write_text(json.dumps(entries))
    out = tmp_path / "out"
    build(str(vgd_root), str(out), sources=["coco_vgd"], splits=["val_point", "val_box"])
    manifest, samples, skipped = read_split(out, "coco_vgd", "val_point")
    assert manifest["skipped"] == {"rle_size_mismatch": 1, "duplicate_image_id": 1}
    assert len(samples) == 2
    assert any(r["reason"] == "rle_size_mismatch" and "[7, 7]" in r["detail"] for r in skipped)
    box, _, box_skipped = read_split(out, "coco_vgd", "val_box")
    assert box["dropped"].get("rle_size_mismatch", 0) >= 1
    assert any(r["level"] == "annotation" and r["key"].endswith("/box") for r in box_skipped)
    with pytest.raises(StrictModeError, match="rle_size_mismatch|duplicate_image_id"):
        build(
            str(vgd_root),
            str(tmp_path / "strict"),
            sources=["coco_vgd"],
            splits=["val_point"],
            options=BuildOptions(strict=True),
        )
