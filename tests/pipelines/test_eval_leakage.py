"""The eval-leakage guard: RefCOCO/+/g/gRefCOCO eval images are gathered first and left out of COCO train."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.build.driver import build
from pipelines.build.eval_guard import REASON, EvalGuard
from pipelines.demo_data import write_demo
from pipelines.errors import Skip
from pipelines.sources.base import BuildOptions
from pipelines.sources.readers import safe_pickle
from tests.support.data import read_split

REFER = "img_refseg/refcocos"


@pytest.fixture
def root(tmp_path) -> Path:
    return write_demo(tmp_path / "datas", families=["coco", "refer"])


def eval_ids_on_disk(root: Path) -> set[int]:
    ids = set()
    for p in (root / REFER).glob("*/refs(*).p"):
        ids |= {r["image_id"] for r in safe_pickle.load_file(p) if r["split"] != "train"}
    return ids


def coco_ids(root: Path, split: str) -> set[int]:
    d = json.loads((root / f"img_genseg/coco2017/annotations/instances_{split}2017.json").read_text())
    return {i["id"] for i in d["images"]}


def split_of(out: Path, source: str, split: str = "train"):
    manifest, samples, skipped = read_split(out, source, split, with_images=False)
    return manifest, {s.meta["image_id"] for s in samples}, skipped


def test_eval_images_are_gathered_before_anything_is_converted(root, tmp_path):
    out = tmp_path / "out"
    build(str(root), str(out), sources=["coco_instance"])  # no refer source is built, the guard still runs
    data = json.loads((out / "eval_images.json").read_text())
    assert set(data["image_ids"]) == eval_ids_on_disk(root) and data["errors"] == []
    got = {(e["source"], e["split"]) for e in data["eval_splits"]}
    assert got == {
        (s, sp) for s in ("refcoco", "refcoco+", "grefcoco") for sp in ("val", "testA", "testB")
    } | {("refcocog", "val"), ("refcocog", "test")}
    assert all(not e["file"].startswith("/") for e in data["eval_splits"])  # hash independent of the mount


def test_coco_train_splits_leave_eval_images_out(root, tmp_path):
    out = tmp_path / "out"
    build(str(root), str(out), sources=["coco_panoptic", "coco_instance"], splits=["train", "val"])
    leaked = eval_ids_on_disk(root) & coco_ids(root, "train")
    assert len(leaked) == 2  # the demo makes two refcoco eval images COCO train2017 images
    for source in ("coco_panoptic", "coco_instance"):
        manifest, ids, skipped = split_of(out, source)
        assert manifest["skipped"] == {REASON: 2}
        assert ids == coco_ids(root, "train") - leaked
        assert {r["key"] for r in skipped} == {f"{source}/train/{i:012d}" for i in leaked}
        assert "eval_images" in {i["role"] for i in manifest["inputs"]}
        val, _, _ = split_of(out, source, "val")  # only training splits are guarded
        assert val["skipped"] == {} and "eval_images" not in {i["role"] for i in val["inputs"]}


def test_keep_eval_images_keeps_them(root, tmp_path):
    out = tmp_path / "out"
    build(str(root), str(out), sources=["coco_instance"], options=BuildOptions(keep_eval_images=True))
    manifest, ids, _ = split_of(out, "coco_instance")
    assert manifest["skipped"] == {} and ids == coco_ids(root, "train")
    assert (out / "eval_images.json").exists()


def test_strict_build_is_not_stopped_by_the_guard(root, tmp_path):
    build(str(root), str(tmp_path / "out"), sources=["coco_instance"], options=BuildOptions(strict=True))
    manifest, _, _ = split_of(tmp_path / "out", "coco_instance")
    assert manifest["skipped"] == {REASON: 2}


def test_a_changed_eval_set_rebuilds_the_guarded_shards(root, tmp_path):
    out = tmp_path / "out"
    build(str(root), str(out), sources=["coco_instance"])
    shutil.rmtree(root / REFER)
    build(str(root), str(out), sources=["coco_instance"])
    manifest, ids, _ = split_of(out, "coco_instance")
    assert manifest["skipped"] == {} and ids == coco_ids(root, "train")
    assert json.loads((out / "eval_images.json").read_text())["image_ids"] == []


def test_any_source_can_opt_in():
    """The mechanism is generic: a source lists guarded splits; records carry image.id (e.g. coco_vgd
    later)."""

    class Vgd:
        eval_image_guard_splits = ("train",)

    guard = EvalGuard(path="mem://eval_images.json", image_ids=frozenset({16}), keep=False)
    assert guard.for_split(Vgd(), "train") is guard
    assert guard.for_split(Vgd(), "val") is None and guard.for_split(object(), "train") is None
    assert EvalGuard(guard.path, guard.image_ids, keep=True).for_split(Vgd(), "train") is None
    items = [{"key": "v/train/a", "image": {"id": 16}}, {"key": "v/train/b", "image": {"id": 17}}]
    out = list(guard.exclude(items))
    assert isinstance(out[0], Skip) and out[0].reason == REASON and out[1] is items[1]


def test_llava_instruct_and_psg_gcg_leave_eval_images_out(tmp_path):
    """Both read COCO train2017 images: their records carry the COCO id, so the guard leaves eval images
    out."""
    from pipelines.sources.base import SourceFiles
    from pipelines.sources.gcg import PsgGcg
    from pipelines.sources.llava import LlavaInstruct

    guard = EvalGuard(path="mem://eval_images.json", image_ids=frozenset({16}), keep=False)
    chat = [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]
    llava = tmp_path / "llava.json"
    images = ["coco/train2017/000000000016.jpg", "coco/train2017/000000000017.jpg", "gqa/images/16.jpg", None]
    llava.write_text(
        json.dumps([{"id": str(i), "image": im, "conversations": chat} for i, im in enumerate(images)])
    )
    psg = tmp_path / "psg.json"
    psg.write_text(
        json.dumps(
            [
                {"file_name": "000000000016.jpg", "image_id": 16, "caption": "a b c", "groundings": {}},
                {"file_name": "000000000017.jpg", "image_id": 17, "caption": "a b c", "groundings": {}},
            ]
        )
    )
    for src, path in ((LlavaInstruct(), llava), (PsgGcg(), psg)):
        assert guard.for_split(src, "train") is guard
        files = SourceFiles(data_root=str(tmp_path), inputs={"annotations": str(path)}, dirs={"images": "x"})
        out = list(guard.exclude(src.index(files, "train", BuildOptions())))
        left_out = [x for x in out if isinstance(x, Skip) and x.reason == REASON]
        assert len(left_out) == 1 and "image 16 " in left_out[0].detail
        kept = [x for x in out if isinstance(x, dict)]
        # llava: the gqa image has no COCO id; the text-only record (kept, the paper's default) has no image
        ids = [x["image"]["id"] if x["image"]["file_name"] else "text" for x in kept]
        assert ids == ([17, None, "text"] if src.name == "llava_instruct" else [17])
