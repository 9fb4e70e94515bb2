"""Fixtures of the evaluation tests: the demo's val sets built once per module, perfect predictions."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrate.evaluation import ground_truth as gt
from pipelines.build.driver import build
from pipelines.build_options import BuildOptions
from tests.support.evaluation import set_lines

VAL_SPLITS = ["val", "val_point", "val_box", "val_scribble", "val_mask"]


@pytest.fixture(scope="session")
def demo_val(demo_root, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """The demo's val splits built inline, two samples per shard (so sets span several shards)."""
    out = tmp_path_factory.mktemp("eval") / "shards"
    build(
        str(demo_root),
        str(out),
        splits=VAL_SPLITS,
        options=BuildOptions(samples_per_shard=2),
    )
    names = [n for n in gt.built_sets(str(out)) if n.split("/")[0] in gt.SOURCE_KINDS]
    return demo_root, out, names


@pytest.fixture(scope="session")
def perfect(demo_val) -> dict[str, list[dict]]:
    datas, shards, names = demo_val
    return {n: set_lines(shards, datas, n) for n in names}


@pytest.fixture
def no_java(monkeypatch):
    """METEOR/CIDEr start Java (slow): the fast tests hide it and check the note instead."""
    monkeypatch.setattr("orchestrate.evaluation.captions.shutil.which", lambda name: None)
