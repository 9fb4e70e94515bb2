"""lvis: coco_url paths, verified negatives first, never non-exhaustive ones, the phrase cap without losing an
annotation, names, bad inputs it refuses, and conformance of masks with the ``lvis`` package."""

from __future__ import annotations

import json
import random
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from pipelines import masks
from pipelines.build.driver import build
from pipelines.demo_data import write_demo
from pipelines.errors import Skip, SkipRecord, StrictModeError
from pipelines.schema import validate
from pipelines.sources import SOURCES
from pipelines.sources.base import BuildOptions, ConvertContext, Shared
from pipelines.sources.lvis import category_names, image_path, sample_negatives, split_categories
from tests.support.data import build_and_read, edit_json

LVIS = "img_ovseg/lvis"
REAL = "lvis-dataset+lvis-api__data__lvis_val_100.json"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("lvis") / "datas", families=["lvis", "ade20k"])


@pytest.fixture
def root(demo, tmp_path) -> Path:
    """A private copy of the demo tree, for tests that edit it."""
    return Path(shutil.copytree(demo, tmp_path / "datas"))


def run(root: Path, out: Path, split: str = "train", **options):
    return build_and_read(root, out, "lvis", split, **options)


def doc(root: Path, split: str) -> dict:
    return json.loads((root / LVIS / f"lvis_v1_{split}.json").read_text())


def edit(root: Path, split: str, fn) -> None:
    edit_json(root / LVIS / f"lvis_v1_{split}.json", fn)


def prompt_ids(sample, names: dict[str, int]) -> list[int]:
    return [names[p] for p in sample.phrases]


@pytest.mark.parametrize("split", ["train", "val"])
def test_demo_builds_with_coco_url_paths_and_lvis_negatives(demo, tmp_path, split):
    manifest, samples, skipped = run(demo, tmp_path / "out", split)
    d = doc(demo, split)
    images = {i["id"]: i for i in d["images"]}
    assert manifest["counts"]["samples"] == len(images) and not skipped
    names = {n: int(i) for i, n in category_names(d["categories"]).items()}
    anns = defaultdict(list)
    for a in d["annotations"]:
        anns[a["image_id"]].append(a)
    for s, image_bytes in samples:
        validate(s)
        img = images[s.meta["image_id"]]
        folder = img["coco_url"].split("/")[-2]
        assert s.image.path == f"img_genseg/coco2017/{folder}/{img['coco_url'].split('/')[-1]}"
        assert image_bytes == (demo / s.image.path).read_bytes()
        assert s.task == "ovseg" and "iscrowd" not in json.dumps(d["annotations"])
        present = {a["category_id"] for a in anns[img["id"]]}
        ids = prompt_ids(s, names)
        assert len(set(ids)) == len(ids) and present <= set(ids)
        negs = [c for c in ids if c not in present]
        assert not set(negs) & set(img["not_exhaustive_category_ids"])  # never a non-exhaustive category
        verified = set(img["neg_category_ids"])
        # verified negatives first: either all of them are in the prompt, or every negative is one of them
        assert verified <= set(negs) or set(negs) <= verified
        if split == "val":  # val fills the prompt: every category but the non-exhaustive absent ones
            assert set(ids) == set(names.values()) - (set(img["not_exhaustive_category_ids"]) - present)
        assert sorted(s.meta["ann_ids"]) == sorted(a["id"] for a in anns[img["id"]])
        for m in s.masks:
            assert names[s.phrases[m.label]] == m.category_id
    if split == "val":  # the demo's first val image lives in train2017, as LVIS v1 val images do
        assert any("/train2017/" in s.image.path for s, _ in samples)


def test_phrase_cap_splits_images_without_losing_annotations(demo, tmp_path):
    cap = 2
    manifest, samples, skipped = run(demo, tmp_path / "out", "train", extra={"lvis_max_phrases": cap})
    d = doc(demo, "train")
    names = {n: int(i) for i, n in category_names(d["categories"]).items()}
    by_image = defaultdict(list)
    for s, _ in samples:
        validate(s)
        assert len(s.phrases) <= cap
        by_image[s.meta["image_id"]].append(s)
    for img in d["images"]:
        parts = by_image[img["id"]]
        present = {a["category_id"] for a in d["annotations"] if a["image_id"] == img["id"]}
        assert len(parts) == -(-len(present) // cap) > 1
        assert [s.key for s in parts] == [f"lvis/train/{img['id']:012d}_p{i:03d}" for i in range(len(parts))]
        assert [s.meta["part"] for s in parts] == [[i, len(parts)] for i in range(len(parts))]
        ann_ids = [a for s in parts for a in s.meta["ann_ids"]]
        assert sorted(ann_ids) == sorted(a["id"] for a in d["annotations"] if a["image_id"] == img["id"])
        positives = [{m.category_id for m in s.masks} for s in parts]
        assert set().union(*positives) == present and sum(map(len, positives)) == len(present)
        for s, pos in zip(parts, positives, strict=True):  # another part's categories are never negatives
            assert not (set(prompt_ids(s, names)) - pos) & present


def test_category_names_use_synonyms_clean_and_disambiguate(demo):
    names = category_names(doc(demo, "train")["categories"])
    by_raw = {c["name"]: names[c["id"]] for c in doc(demo, "train")["categories"]}
    assert by_raw["aerosol_can"] == "aerosol can"
    assert (
        by_raw["bow_(weapon)"] == "bow (weapon)"
        and by_raw["bow_(decorative_ribbons)"] == "bow (decorative ribbons)"
    )
    assert by_raw["mouse_(computer_equipment)"] == "mouse"  # no collision, so the qualifier goes
    assert len(set(names.values())) == len(names)
    cats = [
        {"id": 1, "name": "x_(a)", "synonyms": ["first_syn", "second"]},
        {"id": 2, "name": "y", "synonyms": []},
    ]
    assert category_names(cats) == {1: "first syn", 2: "y"}


def test_image_paths_from_coco_url_or_v05_file_name():
    base = ("img_genseg/coco2017", "img_genseg/coco2014")
    assert image_path({"coco_url": "http://images.cocodataset.org/train2017/000000000139.jpg"}, *base) == (
        "img_genseg/coco2017/train2017/000000000139.jpg",
        None,
    )
    assert image_path({"file_name": "COCO_val2014_000000266409.jpg"}, *base) == (
        "img_genseg/coco2014/val2014/COCO_val2014_000000266409.jpg",
        None,
    )
    assert (
        image_path({"file_name": "val2017/000000266409.jpg"}, *base)[0]
        == "img_genseg/coco2017/val2017/000000266409.jpg"
    )
    for bad in (
        {"coco_url": "http://example.com/pictures/000000000139.jpg"},
        {"coco_url": "http://x/train2017/../a.jpg"},
        {"id": 5},
        {"file_name": "../../etc/passwd"},
    ):
        path, error = image_path(bad, *base)
        assert path is None and error


def test_split_and_negatives_helpers():
    assert split_categories(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_categories([4], 100) == [[4]]
    rng = random.Random(0)
    negs = sample_negatives(
        rng, 4, present=[1], verified=[2, 3, 1, 99], not_exhaustive=[4], all_ids=range(1, 8)
    )
    assert set(negs[:2]) == {2, 3} and not set(negs) & {1, 4, 99} and len(negs) == 4
    assert sample_negatives(rng, 50, [1], [], [2], range(1, 5)) and set(
        sample_negatives(rng, 50, [1], [], [2], range(1, 5))
    ) == {3, 4}


@pytest.mark.parametrize("strict", [False, True])
def test_annotation_with_a_missing_category(root, tmp_path, strict):
    def bad_category(d):
        d["annotations"][0]["category_id"] = 9999

    edit(root, "train", bad_category)
    if strict:
        with pytest.raises(StrictModeError, match="unknown_category"):
            run(root, tmp_path / "out", "train", strict=True)
        return
    manifest, samples, skipped = run(root, tmp_path / "out", "train")
    ann = doc(root, "train")["annotations"][0]
    assert [(s["reason"], s["level"]) for s in skipped] == [("unknown_category", "annotation")]
    assert "9999" in skipped[0]["detail"] and manifest["dropped"] == {"unknown_category": 1}
    assert all(ann["id"] not in s.meta["ann_ids"] for s, _ in samples)
    assert manifest["counts"]["samples"] == len(doc(root, "train")["images"])


@pytest.mark.parametrize("strict", [False, True])
def test_coco_url_without_a_recognisable_folder(root, tmp_path, strict):
    def bad_url(d):
        d["images"][1]["coco_url"] = "http://example.com/pictures/000000900002.jpg"

    edit(root, "train", bad_url)
    if strict:
        with pytest.raises(StrictModeError, match="unrecognised_coco_url"):
            run(root, tmp_path / "out", "train", strict=True)
        return
    manifest, samples, skipped = run(root, tmp_path / "out", "train")
    assert [(s["key"], s["reason"], s["level"]) for s in skipped] == [
        ("lvis/train/000000900002", "unrecognised_coco_url", "record")
    ]
    assert manifest["counts"]["records_in"] == manifest["counts"]["samples"] + 1


def test_index_carries_annotations_unparsed(demo):
    src = SOURCES["lvis"]
    files = src.locate(str(demo), "train")
    items = list(src.index(files, "train", BuildOptions()))
    records = [x for x in items if isinstance(x, dict)]
    assert len([x for x in items if isinstance(x, Shared)]) == 1 and records
    text = Path(files.inputs["annotations"]).read_bytes()
    anns = {a["id"]: a for a in doc(demo, "train")["annotations"]}
    seen = []
    for r in records:  # records hold where each annotation is in the file, not its polygons
        assert "segmentation" not in json.dumps(r)
        for off, n in zip(r["offsets"], r["lengths"], strict=True):
            ann = json.loads(text[off : off + n])
            assert ann == anns[ann["id"]] and ann["image_id"] == r["image"]["id"]
            seen.append(ann["id"])
    assert sorted(seen) == sorted(anns)


# ---------------------------------------------------------------------------------------------- conformance
def _real_records(real_data: Path, tmp_path: Path, cap: int):
    """Index the real LVIS v0.5 sample (no image files needed: to_sample does not read them)."""
    root = tmp_path / "datas"
    (root / "img_genseg/coco2017").mkdir(parents=True)
    src = SOURCES["lvis"]
    files = src.locate(str(root), "val", {"annotations": str(real_data / REAL)})
    options = BuildOptions(extra={"lvis_max_phrases": cap})
    items = list(src.index(files, "val", options))
    shared = next(x.data for x in items if isinstance(x, Shared))
    # the sample has images with only negative labels: nothing to segment, skipped with a reason
    with_anns = {a["image_id"] for a in json.loads((real_data / REAL).read_text())["annotations"]}
    skips = [x for x in items if isinstance(x, Skip)]
    assert skips and all(
        s.reason == "only_negative_labels" and int(s.key.rsplit("/", 1)[1]) not in with_anns for s in skips
    )
    ctx = ConvertContext(data_root=str(root), split="val", options=options, files=files, shared=shared)
    return src, ctx, [x for x in items if isinstance(x, dict)]


@pytest.mark.parametrize("cap", [100, 3])
def test_masks_equal_the_lvis_api_on_the_real_v05_sample(real_data, tmp_path, cap):
    lvis_api = pytest.importorskip("lvis")
    api = lvis_api.LVIS(str(real_data / REAL))
    src, ctx, records = _real_records(real_data, tmp_path, cap)
    seen = []
    for rec in records:
        s = src.to_sample(rec, ctx)
        validate(s)
        assert not ctx.drops
        img = api.imgs[s.meta["image_id"]]
        assert s.image.path == "img_genseg/coco2017/" + "/".join(img["coco_url"].split("/")[-2:])
        assert len(s.phrases) <= cap
        for m, ann_id in zip(s.masks, s.meta["ann_ids"], strict=True):
            ann = api.anns[ann_id]
            assert m.category_id == ann["category_id"]
            np.testing.assert_array_equal(masks.decode(m.rle), api.ann_to_mask(ann))
            seen.append(ann_id)
    assert sorted(seen) == sorted(api.anns)  # every annotation, exactly once
    if cap == 3:
        assert any("_p001" in r["key"] for r in records)


def test_real_v05_names_and_negatives(real_data, tmp_path):
    src, ctx, records = _real_records(real_data, tmp_path, 100)
    cats = json.loads((real_data / REAL).read_text())["categories"]
    assert len(ctx.shared["category_ids"]) == 1230
    names = ctx.shared["category_names"]
    assert len(set(names.values())) == len(names)  # cleaning collisions resolved
    raw = {c["id"]: c for c in cats}
    assert names[str(next(i for i, c in raw.items() if c["name"] == "bow_(weapon)"))] == "bow (weapon)"
    by_name = {n: int(i) for i, n in names.items()}
    for rec in records[:20]:
        s = src.to_sample(rec, ctx)
        ids = [by_name[p] for p in s.phrases]
        pos = {m.category_id for m in s.masks}
        negs = set(ids) - pos
        assert len(ids) == 100 and not negs & set(rec["not_exhaustive"])
        assert {
            c for c in rec["neg"] if c not in pos
        } <= negs  # val fills the prompt: all verified negatives in


@pytest.mark.ray
def test_ray_build_equals_inline_build(demo, tmp_path, ray_local):
    """Ray tasks read their annotations back from the file by offset and write the same bytes as inline."""
    options = BuildOptions(samples_per_shard=2, extra={"lvis_max_phrases": 3})
    build(
        str(demo),
        str(tmp_path / "ray"),
        sources=["lvis", "ade20k_panoptic"],
        splits=["train"],
        options=options,
    )
    ray_local.shutdown()
    build(
        str(demo),
        str(tmp_path / "inline"),
        sources=["lvis", "ade20k_panoptic"],
        splits=["train"],
        options=options,
    )
    for src in ("lvis", "ade20k_panoptic"):
        tars = sorted((tmp_path / "ray" / src / "train").glob("*.tar"))
        assert len(tars) >= 2
        for t in tars:
            assert t.read_bytes() == (tmp_path / "inline" / src / "train" / t.name).read_bytes()


def test_unusable_polygon_is_dropped_and_its_category_is_never_a_negative(root, tmp_path):
    d = doc(root, "train")
    counts = defaultdict(int)
    for a in d["annotations"]:
        counts[a["image_id"], a["category_id"]] += 1
    bad = next(a for a in d["annotations"] if counts[a["image_id"], a["category_id"]] == 1)

    def two_points(d):
        next(a for a in d["annotations"] if a["id"] == bad["id"])["segmentation"] = [[1, 2, 3, 4]]

    edit(root, "train", two_points)
    names = {int(i): n for i, n in category_names(d["categories"]).items()}
    manifest, samples, skipped = run(root, tmp_path / "out", "train")
    assert [(s["reason"], s["level"]) for s in skipped] == [("bad_polygon", "annotation")]
    s = next(s for s, _ in samples if s.meta["image_id"] == bad["image_id"])
    assert bad["id"] not in s.meta["ann_ids"] and names[bad["category_id"]] not in s.phrases


def test_annotation_file_changed_after_indexing(root):
    src = SOURCES["lvis"]
    files = src.locate(str(root), "train")
    items = list(src.index(files, "train", BuildOptions()))
    shared = next(x.data for x in items if isinstance(x, Shared))
    record = next(x for x in items if isinstance(x, dict))
    path = Path(files.inputs["annotations"])
    path.write_text(" " * 7 + path.read_text())  # every offset now points 7 bytes early
    ctx = ConvertContext(
        data_root=str(root), split="train", options=BuildOptions(), files=files, shared=shared
    )
    with pytest.raises(SkipRecord, match="annotation_file_changed"):
        src.to_sample(record, ctx)


def test_a_polygon_with_one_bad_part_keeps_its_good_parts(root, tmp_path):
    d = doc(root, "train")
    target = next(a for a in d["annotations"] if isinstance(a["segmentation"], list))

    def add_bad_part(d):
        next(a for a in d["annotations"] if a["id"] == target["id"])["segmentation"].append([1, 2, 3, 4])

    edit(root, "train", add_bad_part)
    manifest, samples, skipped = run(root, tmp_path / "out", "train")
    assert [(s["reason"], s["level"]) for s in skipped] == [("bad_polygon_part", "annotation")]
    assert manifest["dropped"] == {"bad_polygon_part": 1}
    s = next(s for s, _ in samples if s.meta["image_id"] == target["image_id"])
    assert target["id"] in s.meta["ann_ids"]  # the annotation stays, with its good parts
