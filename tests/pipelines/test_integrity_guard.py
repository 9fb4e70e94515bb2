"""The eval-leakage guard fails closed, and a refer split whose refs cannot be loaded is a
build error for that source (not one skipped record)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.build.driver import build
from pipelines.demo_data import write_demo
from pipelines.errors import BuildConfigError, BuildError
from pipelines.sources.base import BuildOptions
from tests.support.data import read_split

REFS = "img_refseg/refcocos/refcoco/refs(unc).p"


@pytest.fixture
def root(tmp_path) -> Path:
    root = write_demo(tmp_path / "datas", families=["coco", "refer"])
    p = root / REFS
    p.write_bytes(p.read_bytes()[:40])  # a corrupt (truncated) refs pickle
    return root


def test_corrupt_refs_stops_a_guarded_build_naming_the_file(root, tmp_path):
    with pytest.raises(
        BuildConfigError, match=r"eval-leakage guard: refcoco: .*refs\(unc\)\.p.*--keep-eval-images"
    ):
        build(str(root), str(tmp_path / "out"), sources=["coco_instance"])
    assert not (tmp_path / "out/coco_instance/train/manifest.json").exists()  # nothing trained on can leak


def test_keep_eval_images_lets_the_guarded_build_go_on(root, tmp_path):
    build(
        str(root),
        str(tmp_path / "out"),
        sources=["coco_instance"],
        options=BuildOptions(keep_eval_images=True),
    )
    manifest, _, _ = read_split(tmp_path / "out", "coco_instance", with_images=False)
    assert manifest["counts"]["samples"] > 0


def test_unguarded_splits_are_not_stopped_by_the_guard(root, tmp_path):
    build(str(root), str(tmp_path / "out"), sources=["coco_instance"], splits=["val"])
    assert (tmp_path / "out/coco_instance/val/manifest.json").exists()


def test_refer_split_with_unloadable_refs_is_a_build_error_not_a_skip(root, tmp_path):
    with pytest.raises(BuildError, match=r"refcoco/val: refs file .*refs\(unc\)\.p cannot be loaded"):
        build(str(root), str(tmp_path / "out"), sources=["refcoco"], splits=["val"])
    assert not (tmp_path / "out/refcoco/val/manifest.json").exists()
