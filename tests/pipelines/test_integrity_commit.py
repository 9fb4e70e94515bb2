"""docs/integrity.md: a split commits atomically. The manifest, written last, names the build generation;
mixture.json pins each manifest's generation; a rebuild removes the old manifest before it replaces a shard,
so a killed rebuild with changed options leaves nothing that describes partly-new shards (the loader and
train.py refuse, in one line); a re-run re-reads a "complete" shard's sha256 and rebuilds it if it changed."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from pipelines.build import driver, mixture_weights, shards
from pipelines.build_options import BuildOptions
from pipelines.loader import LoaderError, MixtureLoader
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
    mixture_weights.write(str(out), mixture_weights.compute(str(out), stages={1: [SOURCE]}))
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
    assert d["split_sha256"] == m.content_sha256() and "manifest_sha256" not in d
    next(iter(_loader(out)))  # loads


def test_two_identical_builds_write_a_byte_identical_mixture(demo_root, tmp_path):
    """mixture.json pins what identifies each split (shards, counts, options, inputs' hashes), not the
    manifest's bytes, which hold the build's wall time."""
    for name in ("a", "b"):
        driver.build(
            str(demo_root), str(tmp_path / name), sources=[SOURCE], options=BuildOptions(samples_per_shard=4)
        )
    a, b = ((tmp_path / n / "mixture.json").read_bytes() for n in ("a", "b"))
    manifests = [(tmp_path / n / SOURCE / "train/manifest.json").read_bytes() for n in ("a", "b")]
    assert manifests[0] != manifests[1]  # their wall times differ ...
    assert a == b  # ... and the mixtures do not
    driver.build(
        str(demo_root), str(tmp_path / "c"), sources=[SOURCE], options=BuildOptions(samples_per_shard=3)
    )
    assert (tmp_path / "c/mixture.json").read_bytes() != a  # other shards: another mixture
    m = Manifest.read(str(tmp_path / "a"), SOURCE, "train")
    changed = dataclasses.replace(m.shards[0], sha256="0" * 64)
    assert dataclasses.replace(m, shards=(changed, *m.shards[1:])).content_sha256() != m.content_sha256()


def test_a_killed_rebuild_with_changed_options_is_refused(demo_root, tmp_path, monkeypatch):
    from orchestrate.run_errors import RunSetupError
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
