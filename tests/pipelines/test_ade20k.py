"""ade20k_panoptic / _semantic / _instance: masks against the raw PNGs, raw vs Mask2Former layouts, the
vocabularies, bad inputs it refuses, and the shipped tables against the real upstream files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import masks
from pipelines.demo.draw import id2rgb, png_bytes
from pipelines.demo_data import write_demo
from pipelines.errors import BuildConfigError, StrictModeError
from pipelines.schema import validate
from pipelines.sources import SOURCES
from pipelines.sources.ade20k import (
    DATA,
    NUM_CLASSES,
    SPLIT_DIRS,
    class_names,
    instance_to_class,
    thing_classes,
    xsam_class_names,
)
from pipelines.sources.genseg import clean_category_name
from tests.support.data import build_and_read

ADE = "img_ovseg/ade20k"
SOURCE_NAMES = ("ade20k_panoptic", "ade20k_semantic", "ade20k_instance")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("ade") / "datas", families=["ade20k"])


@pytest.fixture
def root(demo, tmp_path) -> Path:
    """A private copy of the demo tree, for tests that edit it."""
    return Path(shutil.copytree(demo, tmp_path / "datas"))


def run(root: Path, out: Path, source: str, split: str = "train", overrides: dict | None = None, **options):
    return build_and_read(root, out, source, split, overrides=overrides, with_images=False, **options)


# ---------------------------------------------------------------------------------------------- Mask2Former
# layout
def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _segment(seg_id: int, cls: int, mask: np.ndarray) -> dict:
    return {"id": seg_id, "category_id": cls, "area": int(mask.sum()), "bbox": _bbox(mask), "iscrowd": 0}


def _instance_ann(ann_id: int, stem: str, cls: int, mask: np.ndarray) -> dict:
    return {
        "id": ann_id,
        "image_id": stem,
        "iscrowd": 0,
        "category_id": cls,
        "bbox": _bbox(mask),
        "segmentation": masks.encode(mask)[0],
        "area": int(mask.sum()),
    }


def _m2f_image(base: Path, split: str, stem: str, ins_anns: list[dict]) -> list[dict]:
    """One image's derived files (detectron2 semantic PNG, panoptic PNG); its segments; its instances appended
    to ``ins_anns``. Stuff segments first, then things pasted over, as ``prepare_ade20k_pan_seg.py`` does."""
    sd, things, mapping = SPLIT_DIRS[split], set(thing_classes()), instance_to_class()
    sem = np.asarray(Image.open(base / "annotations" / sd / f"{stem}.png"))
    ins = np.asarray(Image.open(base / "annotations_instance" / sd / f"{stem}.png"))
    (base / "annotations_detectron2" / sd / f"{stem}.png").write_bytes(png_bytes((sem - 1).astype(np.uint8)))
    seg_map = np.zeros(sem.shape, dtype=np.int64)
    segments = []
    for value in np.unique(sem):
        if value == 0 or int(value) - 1 in things:
            continue
        segments.append(_segment(int(value) + 256 * (len(segments) + 1), int(value) - 1, sem == value))
        seg_map[sem == value] = segments[-1]["id"]
    for g in np.unique(ins[..., 1]):
        if g == 0:
            continue
        mask = ins[..., 1] == g
        cls = mapping[int(np.unique(ins[..., 0][mask])[0])]
        segments.append(_segment(cls + 1 + 256 * (len(segments) + 1), cls, mask))
        seg_map[mask] = segments[-1]["id"]
        ins_anns.append(_instance_ann(len(ins_anns) + 1, stem, cls, mask))
    (base / f"ade20k_panoptic_{split}" / f"{stem}.png").write_bytes(png_bytes(id2rgb(seg_map)))
    return segments


def write_mask2former_files(root: Path) -> None:
    """Mask2Former's derived files (what ``prepare_ade20k_{pan,sem,ins}_seg.py`` write) beside the raw demo
    ones, so a test can check that both layouts give the same Samples."""
    base, names, things = root / ADE, class_names(), sorted(thing_classes())
    categories = [
        {"id": c, "name": names[c], "isthing": int(c in things), "color": [c, c, c]}
        for c in range(NUM_CLASSES)
    ]
    for split, sd in SPLIT_DIRS.items():
        if not (base / "images" / sd).is_dir():
            continue
        (base / f"ade20k_panoptic_{split}").mkdir(exist_ok=True)
        (base / "annotations_detectron2" / sd).mkdir(parents=True, exist_ok=True)
        images, pan_anns, ins_anns = [], [], []
        for img_path in sorted((base / "images" / sd).glob("*.jpg")):
            with Image.open(img_path) as im:
                width, height = im.size
            images.append({"id": img_path.stem, "file_name": img_path.name, "width": width, "height": height})
            segments = _m2f_image(base, split, img_path.stem, ins_anns)
            pan_anns.append(
                {"image_id": img_path.stem, "file_name": f"{img_path.stem}.png", "segments_info": segments}
            )
        pan = {"images": images, "annotations": pan_anns, "categories": categories}
        ins_cats = [{"id": c, "name": names[c]} for c in things]
        (base / f"ade20k_panoptic_{split}.json").write_text(json.dumps(pan))
        (base / f"ade20k_instance_{split}.json").write_text(
            json.dumps({"images": images, "annotations": ins_anns, "categories": ins_cats}, indent=1)
        )


def pngs(root: Path, stem: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    sd = {"train": "training", "val": "validation"}[split]
    sem = np.asarray(Image.open(root / ADE / "annotations" / sd / f"{stem}.png"))
    inst = np.asarray(Image.open(root / ADE / "annotations_instance" / sd / f"{stem}.png"))
    return sem, inst


@pytest.mark.parametrize("split", ["train", "val"])
def test_semantic_masks_are_the_label_png_classes(demo, tmp_path, split):
    manifest, samples, skipped = run(demo, tmp_path / "out", "ade20k_semantic", split)
    assert manifest["counts"]["samples"] == len(samples) > 0 and not skipped
    for s in samples:
        validate(s)
        sem, _ = pngs(demo, s.meta["image_id"], split)
        assert sorted(m.category_id for m in s.masks) == sorted(int(v) - 1 for v in np.unique(sem) if v)
        for m in s.masks:
            np.testing.assert_array_equal(masks.decode(m.rle), sem == m.category_id + 1)
            assert s.phrases[m.label] == xsam_class_names()[m.category_id]
        np.testing.assert_array_equal(masks.decode(s.ignore), sem == 0)
        if split == "val":  # evaluation prompts: all 150 classes in id order
            assert s.phrases == list(xsam_class_names())


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_stuff_from_labels_things_from_instances(demo, tmp_path, split):
    manifest, samples, skipped = run(demo, tmp_path / "out", "ade20k_panoptic", split)
    assert manifest["counts"]["samples"] == len(samples) > 0 and not skipped
    things = set(thing_classes())
    for s in samples:
        validate(s)
        sem, inst = pngs(demo, s.meta["image_id"], split)
        stack = np.stack([masks.decode(m.rle) for m in s.masks]).astype(int)
        assert stack.sum(0).max() == 1  # panoptic: segments never overlap
        np.testing.assert_array_equal(stack.sum(0) == 0, masks.decode(s.ignore).astype(bool))
        stuff = [m for m in s.masks if m.category_id not in things]
        thing = [m for m in s.masks if m.category_id in things]
        assert len(thing) == len(np.unique(inst[..., 1])) - 1  # one segment per annotated instance
        for m, g in zip(thing, sorted(set(np.unique(inst[..., 1]).tolist()) - {0}), strict=True):
            mask = inst[..., 1] == g
            np.testing.assert_array_equal(masks.decode(m.rle), mask)
            assert m.category_id == instance_to_class()[int(inst[..., 0][mask][0])]
        for m in stuff:
            np.testing.assert_array_equal(
                masks.decode(m.rle), (sem == m.category_id + 1) & (inst[..., 1] == 0)
            )
        if split == "val":
            assert len(s.phrases) == 150
    # the demo's second image has a thing without an instance: its pixels are unlabelled in panoptic
    s = next(s for s in samples if s.meta["image_id"].endswith("00000002"))
    sem, inst = pngs(demo, s.meta["image_id"], split)
    orphan = np.isin(sem, [c + 1 for c in things]) & (inst[..., 1] == 0)
    assert orphan.any() and masks.decode(s.ignore)[orphan].all()


@pytest.mark.parametrize("source", ["ade20k_panoptic", "ade20k_semantic"])
def test_val_phrases_are_x_sams_evaluation_names_or_lisas_by_option(demo, tmp_path, source):
    names = xsam_class_names()
    assert len(names) == NUM_CLASSES and names[6] == "road, route" and names[8] == "window"
    assert sum(a != clean_category_name(b) for a, b in zip(names, class_names(), strict=True)) > 40
    _, samples, _ = run(demo, tmp_path / "x", source, "val")
    assert samples and all(s.phrases == list(names) for s in samples)
    _, samples, _ = run(demo, tmp_path / "l", source, "val", extra={"ade20k_category_names": "lisa"})
    assert samples and all(s.phrases == [clean_category_name(n) for n in class_names()] for s in samples)


def test_instance_vocabulary_is_the_thing_classes(demo, tmp_path):
    for split in ("train", "val"):
        manifest, samples, skipped = run(demo, tmp_path / split, "ade20k_instance", split)
        assert samples and not skipped
        for s in samples:
            validate(s)
            _, inst = pngs(demo, s.meta["image_id"], split)
            assert [m.category_id for m in s.masks] == [
                instance_to_class()[int(inst[..., 0][inst[..., 1] == g][0])] for g in s.meta["segment_ids"]
            ]
            assert s.ignore is None
            vocab = {clean_category_name(class_names()[c]) for c in thing_classes()}
            assert set(s.phrases) <= vocab
            if split == "val":
                assert len(s.phrases) == len(thing_classes()) == 100


@pytest.mark.parametrize("source", SOURCE_NAMES)
def test_mask2former_prepared_files_give_the_same_samples(root, tmp_path, source):
    write_mask2former_files(root)
    for split in ("train", "val"):
        _, raw, _ = run(root, tmp_path / "raw", source, split, overrides={"layout": "raw"})
        manifest, prepared, skipped = run(
            root, tmp_path / "m2f", source, split, overrides={"layout": "mask2former"}
        )
        assert manifest["info"] == {"layout": "mask2former"} and not skipped
        assert len(raw) == len(prepared) > 0
        for a, b in zip(raw, prepared, strict=True):
            a.meta.pop("segment_ids")
            b.meta.pop("segment_ids")
            assert a == b
    # with the raw files gone, the prepared ones are found without being asked for
    shutil.rmtree(root / ADE / "annotations")
    shutil.rmtree(root / ADE / "annotations_instance")
    assert SOURCES[source].locate(str(root), "train").info == {"layout": "mask2former"}
    with pytest.raises(
        BuildConfigError, match=rf"--path {source}.layout=m2f: not one of \['mask2former', 'raw'\]"
    ):
        SOURCES[source].locate(str(root), "train", {"layout": "m2f"})


# ---------------------------------------------------------------------------------------------- bad inputs
def _bad_then_build(
    root: Path, tmp_path: Path, source: str, reason: str, strict: bool, level: str = "record"
):
    if strict:
        with pytest.raises(StrictModeError, match=reason):
            run(root, tmp_path / "out", source, strict=True)
        return None
    manifest, samples, skipped = run(root, tmp_path / "out", source)
    assert [(s["key"], s["reason"], s["level"]) for s in skipped] == [
        (f"{source}/train/ADE_train_00000002", reason, level)
    ]
    assert manifest["counts"]["records_in"] == manifest["counts"]["samples"] + 1
    return skipped[0]


@pytest.mark.parametrize("strict", [False, True])
def test_label_png_whose_size_differs_from_its_image(root, tmp_path, strict):
    p = root / ADE / "annotations/training/ADE_train_00000002.png"
    sem = np.asarray(Image.open(p))
    p.write_bytes(png_bytes(np.ascontiguousarray(sem[:200, :300])))
    skip = _bad_then_build(root, tmp_path, "ade20k_semantic", "label_size_mismatch", strict)
    assert skip is None or "200x300" in skip["detail"]


@pytest.mark.parametrize("strict", [False, True])
def test_class_value_above_150(root, tmp_path, strict):
    p = root / ADE / "annotations/training/ADE_train_00000002.png"
    sem = np.asarray(Image.open(p)).copy()
    sem[10:20, 10:20] = 151
    p.write_bytes(png_bytes(sem))
    skip = _bad_then_build(root, tmp_path, "ade20k_panoptic", "label_value_out_of_range", strict)
    assert skip is None or "151" in skip["detail"]


@pytest.mark.parametrize("strict", [False, True])
def test_instance_png_without_its_semantic_png(root, tmp_path, strict):
    (root / ADE / "annotations/training/ADE_train_00000002.png").unlink()
    _bad_then_build(root, tmp_path, "ade20k_panoptic", "missing_semantic_png", strict)


def test_instance_with_an_unknown_class_is_dropped_not_the_image(root, tmp_path):
    p = root / ADE / "annotations_instance/training/ADE_train_00000001.png"
    inst = np.asarray(Image.open(p)).copy()
    g = inst[..., 1].max()
    inst[..., 0][inst[..., 1] == g] = 250  # not an Instance100 class
    p.write_bytes(png_bytes(inst))
    manifest, samples, skipped = run(root, tmp_path / "out", "ade20k_instance")
    assert [(s["reason"], s["level"]) for s in skipped] == [("unknown_instance_class", "annotation")]
    s = next(s for s in samples if s.meta["image_id"] == "ADE_train_00000001")
    assert g not in s.meta["segment_ids"] and s.masks


# ---------------------------------------------------------------------------------------------- conformance
def test_shipped_tables_equal_the_real_upstream_files(real_data):
    assert (DATA / "ade20k_classes.json").read_bytes() == (
        real_data / "dvlab-research+LISA__utils__ade20k_classes.json"
    ).read_bytes()
    real_map = real_data / "facebookresearch+Mask2Former__datasets__ade20k_instance_catid_mapping.txt"
    assert (DATA / "ade20k_instance_catid_mapping.txt").read_bytes() == real_map.read_bytes()
    assert class_names() == tuple(
        json.loads((real_data / "dvlab-research+LISA__utils__ade20k_classes.json").read_text())
    )
    rows = [line.split() for line in real_map.read_text().splitlines()[1:] if line.strip()]
    assert instance_to_class() == {
        int(i): int(s) - 1 for i, s, _ in rows
    }  # Mask2Former's map_id, 1-based keys
    assert len(instance_to_class()) == len(thing_classes()) == 100


def test_shipped_tables_are_package_data():
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"*.json", "*.txt"' in pyproject and (DATA / "__init__.py").exists()
    assert (DATA / "LICENSE-LISA.txt").read_text().lstrip().startswith("Apache License")
    assert "Permission is hereby granted" in (DATA / "LICENSE-Mask2Former.txt").read_text()
