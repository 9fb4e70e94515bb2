"""refcoco / refcoco+ / refcocog / grefcoco: samples, splits, layouts and every bad input."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from pipelines import masks
from pipelines.build.driver import build
from pipelines.demo.refer import dumps_py2
from pipelines.demo_data import write_demo
from pipelines.errors import BuildError, StrictModeError
from pipelines.schema import validate
from pipelines.sources.base import BuildOptions
from pipelines.sources.readers import safe_pickle
from pipelines.sources.refer import combinations
from tests.support.data import read_split

BASE = "img_refseg/refcocos"
UNC = ["train", "val", "testA", "testB"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A read-only demo tree for tests that do not change it."""
    return write_demo(tmp_path_factory.mktemp("refer") / "datas", families=["refer"])


@pytest.fixture
def root(tmp_path) -> Path:
    """A demo tree a test may corrupt."""
    return write_demo(tmp_path / "datas", families=["refer"])


def refs_of(root: Path, dataset: str = "refcoco", name: str = "refs(unc).p") -> list[dict]:
    return safe_pickle.load_file(root / BASE / dataset / name)


def write_refs(root: Path, refs: list[dict], dataset: str = "refcoco", name: str = "refs(unc).p") -> None:
    (root / BASE / dataset / name).write_bytes(dumps_py2(refs))


def instances(root: Path, dataset: str = "refcoco") -> tuple[dict, dict]:
    d = json.loads((root / BASE / dataset / "instances.json").read_text())
    return {i["id"]: i for i in d["images"]}, {a["id"]: a for a in d["annotations"]}


def unique_sents(ref: dict) -> set[str]:
    return {" ".join(s["sent"].lower().split()) for s in ref["sentences"]}


# ----------------------------------------------------------------------------- train
def test_train_puts_every_object_of_an_image_in_one_multi_turn_sample(demo, tmp_path):
    out = tmp_path / "out"
    build(str(demo), str(out), sources=["refcoco"])
    manifest, samples, _ = read_split(out, "refcoco", "train")
    images, anns = instances(demo)
    refs = [r for r in refs_of(demo) if r["split"] == "train"]
    objects = defaultdict(list)
    for r in refs:
        objects[r["image_id"]].append(r)
    per_image = defaultdict(list)
    for s, image in samples:
        validate(s)
        per_image[s.meta["image_id"]].append(s)
        # image path from instances.json, never the ref's decoy "<name>_<N>.jpg"
        img = images[s.meta["image_id"]]
        assert s.image.path == f"{BASE}/images/train2014/{img['file_name']}"
        assert image == (demo / s.image.path).read_bytes()
        n = len(objects[s.meta["image_id"]])
        assert len(s.phrases) == len(s.masks) == n == sum(t.role == "assistant" for t in s.conversation)
        assert [t.text.count("<SEG>") for t in s.conversation if t.role == "assistant"] == [1] * n
        assert sorted(m.label for m in s.masks) == list(range(n))
        assert sorted(s.meta["ann_ids"]) == sorted(r["ann_id"] for r in objects[s.meta["image_id"]])
        for m, ann_id in zip(s.masks, s.meta["ann_ids"], strict=True):
            want = masks.polygons_to_rle(anns[ann_id]["segmentation"], img["height"], img["width"])
            np.testing.assert_array_equal(masks.decode(m.rle), masks.decode(want))
            assert f"<p>{s.phrases[m.label]}</p>" in s.conversation[2 * m.label].text
        assert s.conversation[0].text.startswith("<image>\n")
    # X-SAM's count per image (min(prod n, sum n)), and unlike X-SAM every sentence is used
    for iid, objs in objects.items():
        counts = [len(unique_sents(r)) for r in objs]
        assert len(per_image[iid]) == min(int(np.prod(counts)), sum(counts))
        used = {p for s in per_image[iid] for p in s.phrases}
        assert used == set().union(*(unique_sents(r) for r in objs))
    assert manifest["counts"]["samples"] == len(samples) == sum(len(v) for v in per_image.values())


def test_identical_sentences_keep_distinct_labels(demo, tmp_path):
    build(str(demo), str(tmp_path / "out"), sources=["refcoco"])
    _, samples, _ = read_split(tmp_path / "out", "refcoco", "train")
    twice = [s for s, _ in samples if s.phrases.count("a person") == 2]
    assert twice
    for s in twice:
        labels = [i for i, p in enumerate(s.phrases) if p == "a person"]
        targets = [m for m in s.masks if m.label in labels]
        assert len({m.label for m in targets}) == 2
        assert targets[0].rle != targets[1].rle  # two different people, each with its own label


def test_sentences_are_lower_cased_and_deduplicated_per_object(demo, tmp_path):
    build(str(demo), str(tmp_path / "out"), sources=["refcoco"], splits=["val"])
    _, samples, _ = read_split(tmp_path / "out", "refcoco", "val")
    refs = [r for r in refs_of(demo) if r["split"] == "val"]
    assert any(len(unique_sents(r)) < len(r["sentences"]) for r in refs)  # the demo has a case duplicate
    assert len(samples) == sum(len(unique_sents(r)) for r in refs)
    assert all(p == p.lower() for s, _ in samples for p in s.phrases)
    merged = [s for s, _ in samples if len(s.meta["sent_ids"][0]) == 2]
    assert merged  # both sent_ids of "The RED x" / "the red x" are kept


def test_chunk_option_splits_samples_like_x_sam_main(demo, tmp_path):
    out = tmp_path / "out"
    build(str(demo), str(out), sources=["refcoco"], options=BuildOptions(extra={"refseg_chunk": 2}))
    _, samples, _ = read_split(out, "refcoco", "train")
    by_combo = defaultdict(list)
    for s, _ in samples:
        validate(s)
        assert 1 <= len(s.phrases) <= 2
        by_combo[s.key.rsplit("_", 1)[0]].append(s)
    assert all(len(v) == 2 and sum(len(s.phrases) for s in v) == 3 for v in by_combo.values())


def test_combinations_cover_every_sentence():
    for counts in ([3, 3], [2, 2], [2, 4], [1, 1, 1], [4], [3, 1, 2]):
        combos = combinations(counts)
        assert len(combos) == min(int(np.prod(counts)), sum(counts))
        for i, n in enumerate(counts):
            assert {c[i] for c in combos} == set(range(n))
        assert len({tuple(c) for c in combos}) == len(combos)


# ----------------------------------------------------------------------------- eval splits and datasets
def test_eval_splits_give_one_sample_per_sentence(demo, tmp_path):
    out = tmp_path / "out"
    build(str(demo), str(out), sources=["refcoco", "refcoco+"], splits=UNC[1:])
    for source in ("refcoco", "refcoco+"):
        refs = refs_of(demo, source)
        for split in UNC[1:]:
            _, samples, _ = read_split(out, source, split)
            want = sum(len(unique_sents(r)) for r in refs if r["split"] == split)
            assert len(samples) == want > 0
            for s, _ in samples:
                validate(s)
                assert len(s.phrases) == len(s.masks) == 1 and s.masks[0].label == 0
                assert s.conversation[1].text.count("<SEG>") == 1


def test_refcocog_uses_umd_splits(demo, tmp_path):
    out = tmp_path / "out"
    results = build(str(demo), str(out), sources=["refcocog"], splits=["train", "val", "test", "testA"])
    assert [r.split for r in results] == ["train", "val", "test"]
    refs = refs_of(demo, "refcocog", "refs(umd).p")
    for split in ("val", "test"):
        _, samples, _ = read_split(out, "refcocog", split)
        assert len(samples) == sum(len(unique_sents(r)) for r in refs if r["split"] == split)


def test_refcocop_folder_is_an_alias_of_refcoco_plus(root, tmp_path):
    (root / BASE / "refcoco+").rename(root / BASE / "refcocop")
    build(str(root), str(tmp_path / "out"), sources=["refcoco+"], splits=["val"])
    manifest, samples, _ = read_split(tmp_path / "out", "refcoco+", "val")
    assert samples and manifest["info"]["dataset_dir"] == f"{BASE}/refcocop"
    assert all(s.key.startswith("refcoco+/val/") for s, _ in samples)


def test_grefcoco_multi_target_union_and_no_target_kept(demo, tmp_path):
    out = tmp_path / "out"
    build(str(demo), str(out), sources=["grefcoco"], splits=UNC)
    images, anns = instances(demo, "grefcoco")
    for split in UNC:
        _, samples, _ = read_split(out, "grefcoco", split)
        no_target = [s for s, _ in samples if s.meta["no_target"]]
        assert len(no_target) == len(
            {r["image_id"] for r in refs_of(demo, "grefcoco") if r["split"] == split}
        )
        for s in no_target:
            validate(s)  # the schema accepts a refseg turn whose <SEG> has no mask
            assert s.masks == [] and len(s.phrases) == 1 and s.conversation[1].text.count("<SEG>") == 1
            assert s.meta["ann_ids"] == [[]]
        multi = [(s, t) for s, _ in samples for t, ids in enumerate(s.meta["ann_ids"]) if len(ids) > 1]
        assert multi
        for s, t in multi:
            img = images[s.meta["image_id"]]
            union = np.zeros((img["height"], img["width"]), np.uint8)
            for a in s.meta["ann_ids"][t]:
                union |= masks.decode(
                    masks.polygons_to_rle(anns[a]["segmentation"], img["height"], img["width"])
                )
            (m,) = [m for m in s.masks if m.label == t]
            np.testing.assert_array_equal(masks.decode(m.rle), union)


def test_grefcoco_official_json_is_read_like_the_pickle(root, tmp_path):
    build(str(root), str(tmp_path / "a"), sources=["grefcoco"], splits=["val"])
    d = root / BASE / "grefcoco"
    (d / "grefs(unc).json").write_text(json.dumps(refs_of(root, "grefcoco")))
    (d / "refs(unc).p").unlink()
    build(str(root), str(tmp_path / "b"), sources=["grefcoco"], splits=["val"])
    a, b = (json.loads((tmp_path / x / "grefcoco/val/manifest.json").read_text()) for x in "ab")
    assert b["info"]["refs_format"] == "json"
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


@pytest.mark.parametrize(
    "layout",
    [
        "img_refseg/refcocos/images/mscoco/images/train2014",
        "img_genseg/coco2014/train2014",
        "img_genseg/coco2017/train2017",
    ],
)
def test_image_folder_is_probed_and_recorded(root, tmp_path, layout):
    src = root / BASE / "images" / "train2014"
    dst = root / layout
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, dst)
    if layout.endswith("train2017"):  # COCO 2017 names train2014 images by id only
        for p in dst.iterdir():
            p.rename(dst / p.name.replace("COCO_train2014_", ""))
    build(str(root), str(tmp_path / "out"), sources=["refcoco"], splits=["val"])
    manifest, samples, _ = read_split(tmp_path / "out", "refcoco", "val")
    assert manifest["info"]["images_layout"] == layout and manifest["counts"]["skipped"] == 0
    assert samples and all(s.image.path.startswith(layout + "/") for s, _ in samples)


# ----------------------------------------------------------------------------- bad input
def test_ref_whose_ann_id_is_not_in_instances_json_is_skipped(root, tmp_path):
    refs = refs_of(root)
    bad_val = next(r for r in refs if r["split"] == "val")
    bad_train = next(r for r in refs if r["split"] == "train")
    bad_val["ann_id"] = bad_train["ann_id"] = 987654
    write_refs(root, refs)
    out = tmp_path / "out"
    build(str(root), str(out), sources=["refcoco"], splits=["train", "val"])
    manifest, samples, skipped = read_split(out, "refcoco", "val")
    assert manifest["skipped"] == {"unknown_ann_id": 1}
    assert [r["reason"] for r in skipped] == ["unknown_ann_id"] and "987654" in skipped[0]["detail"]
    assert bad_val["ref_id"] not in {i for s, _ in samples for ids in s.meta["ref_ids"] for i in ids}
    # train: the object is dropped from its image's samples, which are still written
    manifest, samples, skipped = read_split(out, "refcoco", "train")
    assert manifest["dropped"] == {"unknown_ann_id": 1} and samples
    assert all(987654 not in s.meta["ann_ids"] for s, _ in samples)
    with pytest.raises(StrictModeError, match="unknown_ann_id"):
        build(
            str(root),
            str(tmp_path / "strict"),
            sources=["refcoco"],
            splits=["val"],
            options=BuildOptions(strict=True),
        )


def test_ref_with_no_sentence_is_skipped(root, tmp_path):
    refs = refs_of(root)
    empty = [r for r in refs if r["split"] == "testA"][:2]
    empty[0]["sentences"] = []
    empty[1]["sentences"] = [{"tokens": [], "raw": "  ", "sent_id": 999, "sent": "  "}]
    write_refs(root, refs)
    build(str(root), str(tmp_path / "out"), sources=["refcoco"], splits=["testA"])
    manifest, samples, skipped = read_split(tmp_path / "out", "refcoco", "testA")
    assert manifest["skipped"] == {"no_sentences": 2}
    assert {r["reason"] for r in skipped} == {"no_sentences"}
    assert manifest["counts"]["records_in"] == len(samples) + 2
    with pytest.raises(StrictModeError, match="no_sentences"):
        build(
            str(root),
            str(tmp_path / "strict"),
            sources=["refcoco"],
            splits=["testA"],
            options=BuildOptions(strict=True),
        )


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_refs_pickle_carrying_a_callable_is_refused_and_nothing_runs(root, tmp_path):
    victim = tmp_path / "pwned"
    refs = refs_of(root)
    refs[0]["sentences"][0]["sent"] = _Payload(str(victim))
    (root / BASE / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    out = tmp_path / "out"
    # the split cannot be built at all: a build error naming the file, builtins.open is io.open
    with pytest.raises(
        BuildError, match=r"refcoco/train: refs file .*refs\(unc\)\.p .*refused to load global io\.open"
    ):
        build(str(root), str(out), sources=["refcoco"], splits=["train", "val"])
    guard = json.loads((out / "eval_images.json").read_text())
    assert any("refs(unc).p" in e for e in guard["errors"])
    assert not victim.exists()


def test_bad_polygon_drops_one_object_and_skips_a_single_turn_sample(root, tmp_path):
    path = root / BASE / "refcoco" / "instances.json"
    d = json.loads(path.read_text())
    val_ref = next(r for r in refs_of(root) if r["split"] == "val")
    (ann,) = [a for a in d["annotations"] if a["id"] == val_ref["ann_id"]]
    ann["segmentation"] = [[1, 2, 3, 4]]
    path.write_text(json.dumps(d))
    build(str(root), str(tmp_path / "out"), sources=["refcoco"], splits=["val"])
    manifest, _, _ = read_split(tmp_path / "out", "refcoco", "val")
    assert manifest["skipped"] == {"bad_polygon": len(unique_sents(val_ref))}


def test_samples_of_one_image_decode_it_once(demo, tmp_path, monkeypatch):
    """Train samples of an image are consecutive; the writer's full-decode check runs once per image."""
    from pipelines.build import image_check as image_checks

    calls = []
    real = image_checks._decode_jpeg
    monkeypatch.setattr(image_checks, "_decode_jpeg", lambda data, rel: calls.append(rel) or real(data, rel))
    monkeypatch.setattr(image_checks, "_last_ok", None)
    build(str(demo), str(tmp_path / "out"), sources=["refcoco"])
    _, samples, _ = read_split(tmp_path / "out", "refcoco", "train")
    assert len(samples) > len(set(calls)) == len(calls) == len({s.image.path for s, _ in samples})


# ----------------------------------------------------------------------------- executors
@pytest.mark.ray
def test_ray_build_equals_inline_build(demo, tmp_path, ray_local):
    build(
        str(demo),
        str(tmp_path / "ray"),
        sources=["refcoco", "grefcoco"],
        splits=["train", "val"],
        options=BuildOptions(samples_per_shard=4),
    )
    ray_local.shutdown()
    build(
        str(demo),
        str(tmp_path / "inline"),
        sources=["refcoco", "grefcoco"],
        splits=["train", "val"],
        options=BuildOptions(samples_per_shard=4),
    )
    for m in sorted((tmp_path / "inline").glob("*/*/manifest.json")):
        other = tmp_path / "ray" / m.relative_to(tmp_path / "inline")
        a, b = json.loads(m.read_text()), json.loads(other.read_text())
        assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]] and a["shards"]
