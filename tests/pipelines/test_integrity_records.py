"""docs/integrity.md: no record crashes a build. Every hostile value of an annotation file is a skip (or a
dropped annotation) with its own reason and the record's key; every image/PNG decode is guarded; only regular
files are opened; an unreadable annotation path is one line naming it; a dead worker names its chunk."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from pipelines import validate
from pipelines.build import driver
from pipelines.build.chunks import Chunk
from pipelines.demo_data import write_demo
from pipelines.errors import BuildConfigError, BuildError, MalformedJSON, MaskFormatError, StrictModeError
from pipelines.sources.readers.jsonstream import iter_items
from tests.support.data import build_and_read, edit_json

COCO = "img_genseg/coco2017"
ADE = "img_ovseg/ade20k"


@pytest.fixture
def coco_root(tmp_path) -> Path:
    return write_demo(tmp_path / "datas", families=["coco"])


def _first_ann(d: dict) -> dict:
    return [a for a in d["annotations"] if not a["iscrowd"]][0]


def _set_coord(value):
    return lambda d: _first_ann(d)["segmentation"][0].__setitem__(0, value)


def _uncompressed(counts):
    def edit(d):
        a, img = _first_ann(d), d["images"][0]
        a["image_id"] = img["id"]
        a["segmentation"] = {"size": [img["height"], img["width"]], "counts": counts}

    return edit


# every malformed value of an instances annotation: (edit, reason of the dropped annotation)
INSTANCE_CASES = {
    "nan": (_set_coord(float("nan")), "bad_coordinate"),  # pycocotools segfaulted
    "infinity": (_set_coord(float("inf")), "bad_coordinate"),
    "1e300": (_set_coord(1e300), "bad_coordinate"),
    "string_coordinate": (_set_coord("12"), "bad_coordinate"),
    "rle_count_beyond_uint32": (_uncompressed([5, 2**40, 3]), "bad_rle"),  # OverflowError
    "rle_negative_run": (_uncompressed([-5, 10]), "bad_rle"),
    "rle_runs_past_the_image": (_uncompressed([0, 10**8]), "bad_rle"),
    "id_beyond_int64": (
        lambda d: _first_ann(d).__setitem__("id", 2**70),
        "bad_id",
    ),  # OverflowError in the scan
    "missing_category_id": (lambda d: _first_ann(d).pop("category_id"), "missing_key"),  # KeyError
    "segmentation_is_a_number": (lambda d: _first_ann(d).__setitem__("segmentation", 7), "wrong_type"),
}


@pytest.mark.parametrize("case", sorted(INSTANCE_CASES))
def test_malformed_instance_annotation_is_dropped_with_its_reason(coco_root, tmp_path, case):
    edit, reason = INSTANCE_CASES[case]
    edit_json(coco_root / COCO / "annotations/instances_train2017.json", edit)
    m, _, skipped = build_and_read(coco_root, tmp_path / "out", "coco_instance", with_images=False)
    assert m["dropped"] == {reason: 1}
    (row,) = [r for r in skipped if r["level"] == "annotation"]
    assert row["reason"] == reason and row["key"].startswith("coco_instance/train/")
    assert m["counts"]["records_in"] == m["counts"]["samples"] + m["counts"]["skipped"]


def test_deep_nesting_in_an_annotation_is_dropped_not_a_recursion_error(coco_root, tmp_path):
    path = coco_root / COCO / "annotations/instances_train2017.json"
    d = json.loads(path.read_text())
    _first_ann(d)["segmentation"] = "DEEP"
    path.write_text(json.dumps(d).replace('"DEEP"', "[" * 100_000 + "]" * 100_000))
    m, _, skipped = build_and_read(coco_root, tmp_path / "out", "coco_instance", with_images=False)
    assert m["dropped"] == {"too_deep": 1}
    assert "instances_train2017.json byte" in next(r["detail"] for r in skipped if r["reason"] == "too_deep")


def test_strict_stops_at_a_malformed_value_naming_it(coco_root, tmp_path):
    edit_json(coco_root / COCO / "annotations/instances_train2017.json", _set_coord(float("nan")))
    with pytest.raises(StrictModeError, match="bad_coordinate"):
        build_and_read(coco_root, tmp_path / "out", "coco_instance", strict=True)


def _bomb_png(w: int, h: int) -> bytes:
    """A valid RGB PNG of ``w x h`` black pixels: ~1 MB on disk, ``3·w·h`` bytes decoded."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    raw = zlib.compress(b"".join(b"\x00" * (3 * w + 1) for _ in range(h)), 9)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _panoptic_png(root: Path) -> Path:
    d = json.loads((root / COCO / "annotations/panoptic_train2017.json").read_text())
    return root / COCO / "panoptic_train2017" / d["annotations"][0]["file_name"]


PANOPTIC_CASES = {
    "segments_info_not_a_list": (
        lambda r: edit_json(
            _pan_json(r), lambda d: d["annotations"][0].__setitem__("segments_info", {"a": 1})
        ),
        "wrong_type",
    ),
    "segment_without_id": (
        lambda r: edit_json(_pan_json(r), lambda d: d["annotations"][0]["segments_info"][0].pop("id")),
        "missing_key",
    ),
    "empty_png": (lambda r: _panoptic_png(r).write_bytes(b""), "corrupt_panoptic_png"),  # cv2.error
    "truncated_png": (
        lambda r: _panoptic_png(r).write_bytes(_panoptic_png(r).read_bytes()[:100]),
        "corrupt_panoptic_png",
    ),
    "bomb_png": (lambda r: _panoptic_png(r).write_bytes(_bomb_png(4000, 4000)), "image_too_large"),
}


def _pan_json(root: Path) -> Path:
    return root / COCO / "annotations/panoptic_train2017.json"


@pytest.mark.parametrize("case", sorted(PANOPTIC_CASES))
def test_malformed_panoptic_entry_or_png_is_skipped(coco_root, tmp_path, case):
    plant, reason = PANOPTIC_CASES[case]
    plant(coco_root)
    # 4000x4000 = 16 Mpx: over the limit given here, so the header check refuses it before OpenCV allocates
    m, _, skipped = build_and_read(
        coco_root, tmp_path / "out", "coco_panoptic", with_images=False, max_image_pixels=4_000_000
    )
    assert m["skipped"] == {reason: 1}
    assert [r["key"] for r in skipped if r["level"] == "record"][0].startswith("coco_panoptic/train/")


def test_ade20k_png_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    root = write_demo(tmp_path / "datas", families=["ade20k"])
    (root / ADE / "annotations/training/ADE_train_00000002.png").write_bytes(_bomb_png(4000, 4000))
    m, _, skipped = build_and_read(
        root, tmp_path / "out", "ade20k_semantic", with_images=False, max_image_pixels=4_000_000
    )
    assert m["skipped"] == {"image_too_large": 1}
    assert "4000x4000" in skipped[0]["detail"]


def test_lisa_coordinate_far_outside_the_image_is_dropped(tmp_path):
    root = write_demo(tmp_path / "datas", families=["lisa"])
    path = next((root / "img_reaseg/lisa/train").glob("*.json"))
    d = json.loads(path.read_text())
    d["shapes"].append({"label": "target", "points": [[0, 0], [1e300, 0], [5, 5]], "shape_type": "polygon"})
    path.write_text(json.dumps(d))
    m, _, _ = build_and_read(root, tmp_path / "out", "lisa_reasonseg", with_images=False)
    assert m["dropped"].get("bad_coordinate") == 1


def _first_image(root: Path) -> Path:
    d = json.loads((root / COCO / "annotations/instances_train2017.json").read_text())
    return root / COCO / "train2017" / d["images"][0]["file_name"]


def test_fifo_image_is_refused_not_opened(coco_root, tmp_path):
    p = _first_image(coco_root)
    p.unlink()
    os.mkfifo(p)  # open() on it would block forever
    m, _, skipped = build_and_read(coco_root, tmp_path / "out", "coco_instance", with_images=False)
    assert m["skipped"] == {"not_a_regular_file": 1}
    assert "FIFO" in skipped[0]["detail"]


def test_unreadable_image_is_a_skip(coco_root, tmp_path):
    p = _first_image(coco_root)
    p.unlink()
    os.symlink(p.name, p)  # a symlink loop: ELOOP on every open (permissions do not stop root)
    m, _, skipped = build_and_read(coco_root, tmp_path / "out", "coco_instance", with_images=False)
    assert m["skipped"] == {"unreadable_file": 1}
    assert p.name in skipped[0]["detail"]


@pytest.mark.parametrize("kind", ["folder", "fifo", "loop"])
def test_annotation_path_that_cannot_be_read_is_one_line_naming_it(coco_root, tmp_path, kind):
    p = coco_root / COCO / "annotations/instances_train2017.json"
    p.unlink()
    {"folder": p.mkdir, "fifo": lambda: os.mkfifo(p), "loop": lambda: os.symlink(p.name, p)}[kind]()
    with pytest.raises(BuildConfigError, match=r"instances_train2017\.json") as e:
        build_and_read(coco_root, tmp_path / "out", "coco_instance")
    assert "\n" not in str(e.value)


def test_ijson_input_nested_past_the_bound_is_refused_before_ijson(tmp_path):
    p = tmp_path / "refs.json"
    p.write_text('[{"a": ' + "[" * 1_000_000 + "]" * 1_000_000 + "}]")  # ijson's C backend died on this
    with pytest.raises(MalformedJSON, match=r"refs\.json: JSON nested deeper than 64 levels at byte 69"):
        list(iter_items(str(p), "item"))


def test_file_depth_scan_tells_strings_and_escapes_apart(tmp_path):
    p = tmp_path / "ok.json"
    p.write_text(json.dumps([{"text": "[" * 500 + '\\"' + "{" * 500, "q": 'a "quoted" [x]'}]))
    assert validate.file_too_deep(str(p)) is None
    assert validate.file_too_deep(str(p), block_size=7) is None  # state carried across blocks
    assert len(list(iter_items(str(p), "item"))) == 1


def test_compressed_rle_runs_are_checked_like_pycocotools_reads_them():
    from pipelines.masks import encode

    m = np.zeros((7, 9), np.uint8)
    m[2:5, 3:8] = 1
    rle = encode(m)[0]
    validate.check_rle(rle, 7, 9)  # a real one passes
    with pytest.raises(MaskFormatError, match="bad_rle"):
        validate.check_rle({"size": [7, 9], "counts": rle["counts"] + "0"}, 7, 9)  # one run too many


@pytest.mark.ray
def test_a_dead_worker_names_its_chunk_and_records(ray_local):
    @ray_local.remote(max_retries=0)
    def segfault():
        import ctypes

        ctypes.string_at(0)  # SIGSEGV in the worker process

    chunk = Chunk(
        3, "/out/_index/000003.jsonl", 250, "coco_instance/train/000000000009", "coco_instance/train/9", "d"
    )
    with pytest.raises(
        BuildError, match=r"chunk 3 \(250 records, coco_instance/train/000000000009 \.\. .*died"
    ):
        driver._chunk_result(segfault.remote(), chunk, "coco_instance/train")
