"""COCO panoptic / instances sources: round trip, labels, crowd handling, every bad input."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import masks
from pipelines.build.driver import build
from pipelines.demo_data import write_demo
from pipelines.errors import BuildConfigError, StrictModeError
from pipelines.schema import validate
from pipelines.sources.base import BuildOptions
from pipelines.sources.readers.jsonstream import MalformedJSON
from tests.support.data import member_exts, read_split

ANN = "img_genseg/coco2017/annotations"


@pytest.fixture
def coco_root(tmp_path) -> Path:
    return write_demo(tmp_path / "datas", families=["coco"])


def test_panoptic_round_trip_masks_equal_png(coco_root, tmp_path):
    out = tmp_path / "out"
    build(str(coco_root), str(out), sources=["coco_panoptic"], options=BuildOptions(samples_per_shard=3))
    manifest, samples, _ = read_split(out, "coco_panoptic")
    assert manifest["counts"]["samples"] == len(samples) == 8
    assert [s.key for s, _ in samples] == sorted(s.key for s, _ in samples)
    pan = json.loads((coco_root / ANN / "panoptic_train2017.json").read_text())
    by_image = {a["image_id"]: a for a in pan["annotations"]}
    names = {c["id"]: c["name"] for c in pan["categories"]}
    for sample, image in samples:
        validate(sample)
        src = coco_root / sample.image.path
        assert image == src.read_bytes()  # original bytes, never re-encoded
        ann = by_image[sample.meta["image_id"]]
        id_map = masks.rgb2id(
            np.asarray(
                Image.open(coco_root / "img_genseg/coco2017/panoptic_train2017" / ann["file_name"]).convert(
                    "RGB"
                )
            )
        )
        segs = {s["id"]: s for s in ann["segments_info"]}
        assert len(sample.masks) == sum(1 for s in segs.values() if not s["iscrowd"])
        for m, seg_id in zip(sample.masks, sample.meta["ann_ids"], strict=True):
            np.testing.assert_array_equal(masks.decode(m.rle), (id_map == seg_id).astype(np.uint8))
            # the label points at this segment's cleaned category name in the prompt
            raw = names[segs[seg_id]["category_id"]]
            # paper naming (the archive's tag_categories): '-merged', '-other', '-stuff' dropped
            paper = raw.replace("-merged", "").replace("-other", "").replace("-stuff", "").replace("-", " ")
            assert sample.phrases[m.label] == paper
        # paper default: every category is in the prompt
        assert len(sample.phrases) == len(pan["categories"])
        assert sample.conversation[0].text.startswith("<image>\n")


def test_panoptic_crowd_goes_to_ignore_and_names_are_cleaned(coco_root, tmp_path):
    out = tmp_path / "out"
    build(str(coco_root), str(out), sources=["coco_panoptic"])
    _, samples, _ = read_split(out, "coco_panoptic")
    crowded = [s for s, _ in samples if s.meta["num_crowd"]]
    assert crowded and all(s.ignore is not None and masks.area(s.ignore) > 0 for s in crowded)
    phrases = set(samples[0][0].phrases)
    assert {"sky", "wall", "grass", "person"} <= phrases and not {"sky other", "wall other"} & phrases
    assert not any("-" in p for p in phrases)
    main_out = tmp_path / "main"
    build(
        str(coco_root),
        str(main_out),
        sources=["coco_panoptic"],
        options=BuildOptions(extra={"coco_category_names": "main"}),
    )
    _, main_samples, _ = read_split(main_out, "coco_panoptic")
    assert {"sky other", "wall other", "grass", "person"} <= set(main_samples[0][0].phrases)


@pytest.mark.parametrize("num_class", [None, 4])
def test_val_prompts_list_the_whole_vocabulary_in_id_order(coco_root, tmp_path, num_class):
    out = tmp_path / "out"
    build(
        str(coco_root),
        str(out),
        sources=["coco_panoptic", "coco_instance"],
        splits=["val"],
        options=BuildOptions(genseg_num_class=num_class),
    )
    for source, kind in (("coco_panoptic", "panoptic"), ("coco_instance", "instances")):
        cats = json.loads((coco_root / ANN / f"{kind}_val2017.json").read_text())["categories"]
        _, samples, _ = read_split(out, source, "val")
        assert samples
        for s, _ in samples:
            names = [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
            assert s.phrases == [
                n.replace("-merged", "").replace("-other", "").replace("-", " ") for n in names
            ]
            assert all(
                s.phrases[m.label] and m.category_id == sorted(cats, key=lambda c: c["id"])[m.label]["id"]
                for m in s.masks
            )


def test_instances_crowd_is_not_a_target(coco_root, tmp_path):
    out = tmp_path / "out"
    build(str(coco_root), str(out), sources=["coco_instance"], splits=["train", "val"])
    inst = json.loads((coco_root / ANN / "instances_train2017.json").read_text())
    crowd_ids = {a["id"] for a in inst["annotations"] if a["iscrowd"]}
    assert crowd_ids
    _, samples, _ = read_split(out, "coco_instance")
    target_ids = {i for s, _ in samples for i in s.meta["ann_ids"]}
    assert not (target_ids & crowd_ids)
    assert len(target_ids) == len(inst["annotations"]) - len(crowd_ids)


def test_num_class_option_samples_categories_like_x_sam_main(coco_root, tmp_path):
    out = tmp_path / "out"
    build(str(coco_root), str(out), sources=["coco_panoptic"], options=BuildOptions(genseg_num_class=4))
    _, samples, _ = read_split(out, "coco_panoptic")
    for s, _ in samples:
        present = {m.category_id for m in s.masks}
        assert len(s.phrases) >= len(present)
        assert len(s.phrases) <= max(4, len(present) + s.meta["num_crowd"])


# ----------------------------------------------------------------------------- bad input
def _corrupt(coco_root: Path) -> dict:
    """Apply every bad input to the demo instances train file; returns what to expect."""
    path = coco_root / ANN / "instances_train2017.json"
    d = json.loads(path.read_text())
    imgs = d["images"]
    img_dir = coco_root / "img_genseg/coco2017/train2017"
    anns_of = lambda iid: [a for a in d["annotations"] if a["image_id"] == iid]  # noqa: E731
    # 0: missing image file
    (img_dir / imgs[0]["file_name"]).unlink()
    # 1: truncated JPEG
    p = img_dir / imgs[1]["file_name"]
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    # 2: decompression bomb: a JPEG whose header claims 30000x30000
    p = img_dir / imgs[2]["file_name"]
    data = bytearray(p.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")
    p.write_bytes(bytes(data))
    # 3: every annotation of image 3 broken differently: RLE of the wrong size, bad polygons, unknown category
    a3 = [a for a in anns_of(imgs[3]["id"]) if not a["iscrowd"]]
    a3[0]["segmentation"] = {"size": [7, 7], "counts": masks.encode(np.ones((7, 7), bool))[0]["counts"]}
    a3[1]["segmentation"] = [[1, 2, 3, 4]]
    for a in a3[2:]:
        a["category_id"] = 4242
    d["annotations"].append(
        {**a3[0], "id": 888888, "category_id": 4243, "segmentation": [[1, 1, 9, 1, 9, 9]]}
    )
    # 4: an odd-length polygon on one annotation of an otherwise good image
    a4 = [a for a in anns_of(imgs[4]["id"]) if not a["iscrowd"]]
    a4[0]["segmentation"] = [[1, 2, 3, 4, 5, 6, 7]]
    # 5: duplicate image id
    d["images"].append(dict(imgs[5]))
    # 6: annotation pointing at a missing image
    d["annotations"].append({**a4[-1], "id": 999999, "image_id": 123456789})
    # 7: paths leaving the data root
    imgs[6]["file_name"] = "../../../etc/passwd"
    imgs[7]["file_name"] = "/etc/passwd"
    path.write_text(json.dumps(d))
    return {
        "record": {
            "missing_image": 1,
            "corrupt_image": 1,
            "image_too_large": 1,
            "no_usable_segment": 1,
            "duplicate_image_id": 1,
            "path_outside_root": 2,
        },
        "annotation": {
            "rle_size_mismatch": 1,
            "bad_polygon": 2,
            "unknown_category": len(a3) - 1,
            "annotation_without_image": 1,
        },
    }


def test_every_bad_input_is_skipped_with_a_reason(coco_root, tmp_path):
    expected = _corrupt(coco_root)
    out = tmp_path / "out"
    build(str(coco_root), str(out), sources=["coco_instance"])
    manifest, samples, skipped = read_split(out, "coco_instance")
    assert manifest["skipped"] == expected["record"]
    dropped = {k: v for k, v in manifest["dropped"].items()}
    assert dropped == expected["annotation"]
    # nothing lost: records in = samples out + skipped, and every skip is listed with its key
    c = manifest["counts"]
    assert c["records_in"] == c["samples"] + c["skipped"] == 9
    assert len(samples) == 2  # image 4 (one polygon dropped) and image 5 (its duplicate skipped)
    assert sum(r["level"] == "record" for r in skipped) == c["skipped"]
    assert all(r["key"].startswith("coco_instance/train/") and r["detail"] for r in skipped)


def test_strict_stops_at_the_first_bad_record(coco_root, tmp_path):
    _corrupt(coco_root)
    with pytest.raises(StrictModeError, match="duplicate_image_id|missing_image|path_outside_root"):
        build(
            str(coco_root),
            str(tmp_path / "out"),
            sources=["coco_instance"],
            options=BuildOptions(strict=True),
        )


def test_malformed_json_names_file_and_position(coco_root, tmp_path):
    path = coco_root / ANN / "instances_train2017.json"
    text = path.read_text()
    path.write_text(text[:200] + "}{oops" + text[200:])
    with pytest.raises(MalformedJSON, match=r"instances_train2017\.json: malformed JSON near byte \d+"):
        build(str(coco_root), str(tmp_path / "out"), sources=["coco_instance"])


def test_panoptic_png_of_wrong_size_is_skipped(coco_root, tmp_path):
    png_dir = coco_root / "img_genseg/coco2017/panoptic_train2017"
    first = sorted(png_dir.iterdir())[0]
    Image.open(first).resize((10, 10)).save(first)
    build(str(coco_root), str(tmp_path / "out"), sources=["coco_panoptic"])
    manifest, _, _ = read_split(tmp_path / "out", "coco_panoptic")
    assert manifest["skipped"] == {"rle_size_mismatch": 1}


def test_symlinked_folders_inside_the_root_are_followed(tmp_path):
    """X-SAM's layout links image folders; a link inside the root is fine, only annotation paths are
    untrusted."""
    real = write_demo(tmp_path / "real", families=["coco"])
    root = tmp_path / "datas" / "img_genseg"
    root.mkdir(parents=True)
    (root / "coco2017").symlink_to(real / "img_genseg/coco2017")
    build(str(tmp_path / "datas"), str(tmp_path / "out"), sources=["coco_instance"])
    manifest, _, _ = read_split(tmp_path / "out", "coco_instance")
    assert manifest["counts"]["samples"] == 8


def test_missing_named_source_is_a_configuration_error(tmp_path):
    from pipelines.build.driver import BuildConfigError

    (tmp_path / "datas").mkdir()
    with pytest.raises(BuildConfigError, match="not found"):
        build(str(tmp_path / "datas"), str(tmp_path / "out"), sources=["coco_panoptic"])
    with pytest.raises(BuildConfigError, match="unknown source"):
        build(str(tmp_path / "datas"), str(tmp_path / "out"), sources=["coco_panoptix"])
    with pytest.raises(BuildConfigError, match=r"--path names unknown source\(s\) \['coco_panoptix'\]"):
        build(str(tmp_path / "datas"), str(tmp_path / "out"), overrides={"coco_panoptix": {"images": "x"}})


def test_an_unknown_path_role_of_a_known_source_is_refused_listing_its_roles(tmp_path):
    (tmp_path / "datas").mkdir()
    with pytest.raises(
        BuildConfigError,
        match=r"--path coco_panoptic\.annotation=…: coco_panoptic has no input role 'annotation'; "
        r"its roles: annotations, images, panoptic$",
    ):  # a typo used to be ignored: the default annotation file was read instead
        build(
            str(tmp_path / "datas"), str(tmp_path / "out"), overrides={"coco_panoptic": {"annotation": "x"}}
        )


def test_every_source_declares_the_path_roles_its_locate_reads():
    import inspect

    from pipelines.sources import SOURCES

    for src in SOURCES.values():
        assert src.path_roles and len(set(src.path_roles)) == len(src.path_roles), src.name
        text = inspect.getsource(inspect.getmodule(type(src)))
        missing = [r for r in src.path_roles if f'"{r}"' not in text]
        assert not missing, f"{src.name}: roles {missing} are not read by its module"


def test_image_bytes_png_images_are_kept_as_png(coco_root, tmp_path):
    d = json.loads((coco_root / ANN / "instances_train2017.json").read_text())
    img = d["images"][0]
    p = coco_root / "img_genseg/coco2017/train2017" / img["file_name"]
    buf = io.BytesIO()
    Image.open(p).save(buf, format="PNG")
    p.write_bytes(buf.getvalue())
    build(str(coco_root), str(tmp_path / "out"), sources=["coco_instance"])
    assert member_exts(tmp_path / "out", "coco_instance").count("png") == 1
    shutil.rmtree(tmp_path / "out")
