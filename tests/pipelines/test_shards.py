"""Shard determinism, resume and crash consistency (docs/contracts.md#shards-and-manifests), inline and under
in-process Ray."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.build.driver import build
from pipelines.demo import coco
from pipelines.sources.base import BuildOptions

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def coco20(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco20") / "datas"
    coco.write(root, random.Random(7), n_train=20, n_val=2)
    return root


def shard_hashes(out: Path) -> dict[str, str]:
    hashes = {}
    for m in sorted(out.glob("*/*/manifest.json")):
        for s in json.loads(m.read_text())["shards"]:
            hashes[f"{m.parent.relative_to(out)}/{s['file']}"] = s["sha256"]
    return hashes


def files_under(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_two_builds_are_byte_identical(coco20, tmp_path):
    opts = BuildOptions(samples_per_shard=6)
    both = ["coco_panoptic", "coco_instance"]
    build(str(coco20), str(tmp_path / "a"), sources=both, options=opts)
    build(str(coco20), str(tmp_path / "b"), sources=both, options=opts)
    a, b = shard_hashes(tmp_path / "a"), shard_hashes(tmp_path / "b")
    assert a == b and len(a) == 8  # 2 sources x ceil(20 / 6) shards
    for rel in a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_rerun_reuses_complete_shards_and_option_change_rebuilds(coco20, tmp_path):
    out = str(tmp_path / "out")
    first = build(str(coco20), out, sources=["coco_panoptic"], options=BuildOptions(samples_per_shard=6))
    assert [r.reused_shards for r in first] == [0]
    again = build(str(coco20), out, sources=["coco_panoptic"], options=BuildOptions(samples_per_shard=6))
    assert [r.reused_shards for r in again] == [4]
    reseeded = build(
        str(coco20), out, sources=["coco_panoptic"], options=BuildOptions(samples_per_shard=6, seed=1)
    )
    assert [r.reused_shards for r in reseeded] == [0]
    assert not (tmp_path / "out/coco_panoptic/train/_index").exists()


def test_shrinking_input_removes_stale_shards(coco20, tmp_path):
    out = tmp_path / "out"
    build(str(coco20), str(out), sources=["coco_instance"], options=BuildOptions(samples_per_shard=3))
    build(str(coco20), str(out), sources=["coco_instance"], options=BuildOptions(samples_per_shard=10))
    tars = sorted(p.name for p in (out / "coco_instance/train").glob("*.tar"))
    assert tars == ["coco_instance-train-000000.tar", "coco_instance-train-000001.tar"]


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from pipelines.build import shards
    from pipelines.build.driver import build
    from pipelines.sources.base import BuildOptions

    calls = 0
    real = shards._convert_one

    def convert_then_die(*args, **kwargs):
        global calls
        calls += 1
        if calls == {kill_at}:  # mid-shard: the shard being written is left as a temporary file
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    shards._convert_one = convert_then_die
    build({data!r}, {out!r}, sources=["coco_panoptic"], options=BuildOptions(samples_per_shard=4))
    """
)


def _kill_then_rerun(coco20, ref, out, kill_at: int):
    """SIGKILL a build of ``coco20`` at its ``kill_at``-th conversion, re-run it, check it equals ``ref``."""
    script = KILLER.format(root=str(ROOT), kill_at=kill_at, data=str(coco20), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    left = files_under(out)
    assert any(".tmp-" in f for f in left), left  # the kill really happened mid-write
    assert not (out / "coco_panoptic/train/manifest.json").exists()
    results = build(
        str(coco20), str(out), sources=["coco_panoptic"], options=BuildOptions(samples_per_shard=4)
    )
    assert shard_hashes(out) == shard_hashes(ref)
    assert files_under(out) == files_under(ref)  # no temporaries, no work folder left
    for f in files_under(ref):
        if f.endswith(".tar") or f.endswith(".jsonl"):
            assert (out / f).read_bytes() == (ref / f).read_bytes()
    return results


def test_sigkill_mid_build_then_rerun_is_byte_identical(coco20, tmp_path):
    ref = tmp_path / "ref"
    build(str(coco20), str(ref), sources=["coco_panoptic"], options=BuildOptions(samples_per_shard=4))
    results = _kill_then_rerun(coco20, ref, tmp_path / "out", kill_at=10)
    assert results[0].reused_shards == 2  # shards 0 and 1 were complete before the kill


@pytest.mark.slow
def test_sigkill_at_20_random_points_then_rerun_is_byte_identical(coco20, tmp_path):
    """20 kill points drawn (seeded) over the build's conversions: every re-run equals an uninterrupted
    build."""
    ref = tmp_path / "ref"
    build(str(coco20), str(ref), sources=["coco_panoptic"], options=BuildOptions(samples_per_shard=4))
    points = random.Random(20).choices(range(1, 21), k=20)  # 20 records: conversions 1..20
    for i, kill_at in enumerate(points):
        results = _kill_then_rerun(coco20, ref, tmp_path / f"out{i}", kill_at)
        assert results[0].reused_shards == (kill_at - 1) // 4  # the shards completed before the kill


@pytest.mark.ray
def test_ray_build_equals_inline_build(coco20, tmp_path, ray_local):
    opts = BuildOptions(samples_per_shard=5)
    both = ["coco_panoptic", "coco_instance"]
    results = build(str(coco20), str(tmp_path / "ray"), sources=both, options=opts, num_workers=2)
    assert {r.source: r.samples for r in results} == {"coco_panoptic": 20, "coco_instance": 20}
    ray_local.shutdown()
    build(str(coco20), str(tmp_path / "inline"), sources=both, options=opts)
    assert shard_hashes(tmp_path / "ray") == shard_hashes(tmp_path / "inline")
