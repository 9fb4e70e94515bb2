"""Build presets: ``paper`` turns off this project's deliberate data choices for an exact X-SAM reproduction
(the eval-image guard, covering refseg sentence combinations, LISA images without an explanation kept)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from pipelines.build.driver import build
from pipelines.build_options import BuildOptions, manifest_preset
from pipelines.demo_data import write_demo
from pipelines.errors import BuildConfigError
from pipelines.sources.refer import combinations
from tests.support import data

SOURCES = ["coco_panoptic", "refcoco", "lisa_reasonseg"]
PAPER_EXTRA = {"lisa_unexplained": "skip", "refseg_combinations": "archive"}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The demo (coco, refer, lisa) train splits built with the default preset and with ``paper``."""
    tmp = tmp_path_factory.mktemp("preset")
    root = write_demo(tmp / "datas", families=["coco", "refer", "lisa"])
    build(str(root), str(tmp / "default"), sources=SOURCES)
    build(str(root), str(tmp / "paper"), sources=SOURCES, options=BuildOptions(preset="paper"))
    return root, tmp / "default", tmp / "paper"


def test_the_manifest_records_the_preset_and_the_options_it_set(builds):
    _, default, paper = builds
    for source in SOURCES:
        d, p = data.manifest(default, source), data.manifest(paper, source)
        # the default writes no preset field (its manifests and fingerprints are as before); absent = default
        assert "preset" not in d["options"] and manifest_preset(d) == "default"
        assert p["options"]["preset"] == "paper" and manifest_preset(p) == "paper"
        assert p["options"]["keep_eval_images"] is True and p["options"]["extra"] == PAPER_EXTRA
        assert d["options"]["keep_eval_images"] is False and d["options"]["extra"] == {}
        assert d["fingerprint"] != p["fingerprint"]  # the preset is part of the split's identity


def test_paper_counts_against_the_default(builds):
    _, default, paper = builds
    d, p = data.manifest(default, "coco_panoptic"), data.manifest(paper, "coco_panoptic")
    leaks = d["skipped"]["eval_image_leak"]
    assert leaks == 2 and "eval_image_leak" not in p["skipped"]  # the demo's two RefCOCO eval images
    assert p["counts"]["samples"] == d["counts"]["samples"] + leaks
    d, p = data.manifest(default, "lisa_reasonseg"), data.manifest(paper, "lisa_reasonseg")
    assert p["skipped"] == {"no_explanation": 1} and p["counts"]["samples"] == d["counts"]["samples"] - 1
    d, p = data.manifest(default, "refcoco"), data.manifest(paper, "refcoco")
    assert p["counts"]["samples"] == d["counts"]["samples"]  # same count, other sentence choices


def test_paper_refseg_uses_the_archives_sentence_combinations(builds):
    _, default, paper = builds
    pairs = {}
    for name, out in (("default", default), ("paper", paper)):
        _, samples, _ = data.read_split(out, "refcoco", with_images=False)
        pairs[name] = {(s.key.rsplit("_", 1)[0], p) for s in samples for p in s.phrases}
    # the covering order uses every sentence of every object; the archive's product order does not (demo: 20
    # of 26 image-sentence pairs)
    assert pairs["paper"] < pairs["default"]
    for counts in ([3, 3, 3], [2, 1, 4], [1], [5, 2]):
        total = min(math.prod(counts), sum(counts))
        want = list(itertools.islice(itertools.product(*(range(n) for n in counts)), total))
        assert [tuple(c) for c in combinations(counts, "archive")] == want
        assert len(combinations(counts)) == total  # the same count either way
    assert {c[0] for c in combinations([3, 3, 3], "archive")} == {0}  # the first object: sentence 0 only
    assert {c[0] for c in combinations([3, 3, 3])} == {0, 1, 2}


def test_a_rerun_with_another_preset_rebuilds(builds, tmp_path):
    root = builds[0]
    out = tmp_path / "out"
    build(str(root), str(out), sources=["lisa_reasonseg"])
    first = data.manifest(out, "lisa_reasonseg")
    build(str(root), str(out), sources=["lisa_reasonseg"], options=BuildOptions(preset="paper"))
    assert manifest_preset(data.manifest(out, "lisa_reasonseg")) == "paper"
    assert data.manifest(out, "lisa_reasonseg")["counts"]["samples"] == first["counts"]["samples"] - 1
    build(str(root), str(out), sources=["lisa_reasonseg"])
    again = data.manifest(out, "lisa_reasonseg")
    assert again["fingerprint"] == first["fingerprint"] and again["counts"] == first["counts"]


def test_preset_options_and_cli():
    assert BuildOptions().to_dict() == BuildOptions(preset="default").to_dict()
    assert "preset" not in BuildOptions().to_dict()
    assert BuildOptions(preset=" Paper ").preset == "paper"
    with pytest.raises(BuildConfigError, match="option preset"):
        BuildOptions(preset="exact")
    # the preset wins over the options it sets
    p = BuildOptions(preset="paper", keep_eval_images=False, extra={"refseg_combinations": "covering"})
    assert p.keep_eval_images and p.extra.refseg_combinations == "archive"
    from orchestrate import build_shards

    args = build_shards.parse_args(["--data-root", "d", "--out", "o", "--preset", "paper"])
    assert build_shards.options_from(args).to_dict()["preset"] == "paper"
    args = build_shards.parse_args(["--data-root", "d", "--out", "o"])
    assert "preset" not in build_shards.options_from(args).to_dict()
    assert manifest_preset({}) == manifest_preset({"options": {}}) == "default"  # written before presets
