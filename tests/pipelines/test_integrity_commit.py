"""Issue 20 item 1: a split commits atomically. The manifest, written last, names the build generation;
mixture.json pins each manifest's generation; a rebuild removes the old manifest before it replaces a shard,
so a killed rebuild with changed options leaves nothing that describes partly-new shards (the loader and
train.py refuse, in one line); a re-run re-reads a "complete" shard's sha256 and rebuilds it if it changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.build import driver, mixture, shards
from pipelines.build_options import BuildOptions
from pipelines.loader.stream import LoaderError, MixtureLoader
from pipelines.shard_store import Manifest

SOURCE = "coco_panoptic"


def _build(demo_root: Path, out: Path, per_shard: int = 4):
    res = driver.build(
        str(demo_root),
        str(out),
        sources=[SOURCE],
        splits=["train"],
        options=BuildOptions(samples_per_shard=per_shard),
    )
    mixture.write(str(out), mixture.compute(str(out), stages={1: [SOURCE]}))
    return res[0]


def _loader(out: Path) -> MixtureLoader:
    return MixtureLoader(str(out), stage=1, batch_size=1, transform=lambda s, b: s.key)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_the_manifest_names_the_generation_and_the_mixture_pins_it(demo_root, tmp_path):
    out = tmp_path / "shards"
    _build(demo_root, out)
    m = Manifest.read(str(out), SOURCE, "train")
    d = json.loads((out / "mixture.json").read_text())["stages"]["1"]["datasets"][0]
    assert len(m.generation) == 16 and d["generation"] == m.generation
    import hashlib

    assert (
        d["manifest_sha256"]
        == hashlib.sha256((out / SOURCE / "train/manifest.json").read_bytes()).hexdigest()
    )
    next(iter(_loader(out)))  # loads


def test_a_killed_rebuild_with_changed_options_is_refused(demo_root, tmp_path, monkeypatch):
    from orchestrate.errors import RunSetupError
    from orchestrate.runner import check_data

    out = tmp_path / "shards"
    _build(demo_root, out, per_shard=4)
    real = shards.convert_chunk

    def dies_at_chunk_1(*args, **kw):
        if args[4].index == 1:
            raise _Killed()
        return real(*args, **kw)

    monkeypatch.setattr(shards, "convert_chunk", dies_at_chunk_1)
    with pytest.raises(_Killed):
        _build(demo_root, out, per_shard=3)  # shard 0 is rewritten with 3 samples, then the build dies
    monkeypatch.undo()
    assert not (out / SOURCE / "train/manifest.json").exists()  # the old generation is gone, not half-true
    with pytest.raises(LoaderError, match=r"^coco_panoptic/train: its manifest is gone .* has not finished"):
        _loader(out)
    with pytest.raises(RunSetupError, match=r"coco_panoptic/train: its manifest is gone"):
        check_data(str(out), str(out / "mixture.json"), 1)
    # the build finished: the mixture it writes matches again
    _build(demo_root, out, per_shard=3)
    assert len(list(_loader(out).stream.stage.datasets)) == 1


def test_an_old_mixture_over_a_newer_generation_is_refused(demo_root, tmp_path):
    out = tmp_path / "shards"
    _build(demo_root, out, per_shard=4)
    old = (out / "mixture.json").read_bytes()
    gen4 = Manifest.read(str(out), SOURCE, "train").generation
    _build(demo_root, out, per_shard=3)
    gen3 = Manifest.read(str(out), SOURCE, "train").generation
    assert gen3 != gen4
    (out / "mixture.json").write_bytes(old)
    with pytest.raises(
        LoaderError, match=rf"generation {gen4}, its manifest now commits {gen3} .*rewrite mixture"
    ):
        _loader(out)


def test_a_rerun_rebuilds_a_complete_shard_whose_bytes_changed(demo_root, tmp_path):
    out = tmp_path / "shards"
    first = _build(demo_root, out)
    tar = out / SOURCE / "train" / f"{SOURCE}-train-000000.tar"
    good = tar.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # same size: only a sha256 check sees it
    tar.write_bytes(bytes(bad))
    again = _build(demo_root, out)
    assert again.reused_shards == first.shards - 1 and tar.read_bytes() == good
    shutil.rmtree(out / SOURCE / "train" / "_parts")  # no markers: everything is rebuilt, identically
    assert _build(demo_root, out).reused_shards == 0 and tar.read_bytes() == good
