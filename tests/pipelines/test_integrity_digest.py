"""docs/integrity.md: every byte trained on is verified. The writer puts a member index beside each shard
(offsets, sizes, a sha256 per sample; its own sha256 in the manifest); the loader reads through it and checks
each sample as it reads it: a flipped byte in an image, a phrase or an RLE is a counted ``digest_mismatch``
(strict: an error); a same-named shard of another build, or one with extra samples, is a
``shard_mismatch``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.build import mixture_weights
from pipelines.loader import LoaderError, MixtureLoader
from pipelines.shard_store import INDEX_SUFFIX, Manifest, index_shard, sample_digest

SOURCE, NAME = "coco_panoptic", "coco_panoptic/train"


def _build(demo_root: Path, out: Path, per_shard: int) -> Path:
    from pipelines.build.driver import build
    from pipelines.build_options import BuildOptions

    build(
        str(demo_root),
        str(out),
        sources=[SOURCE],
        splits=["train"],
        options=BuildOptions(samples_per_shard=per_shard),
    )
    mixture_weights.write(str(out), mixture_weights.compute(str(out), stages={1: [SOURCE]}))
    return out


@pytest.fixture(scope="module")
def builds(demo_root, tmp_path_factory) -> tuple[Path, Path]:
    """The demo's COCO panoptic train split built twice: 4 and 5 samples per shard (shard 0 of the second
    holds the first's 4 samples and one more)."""
    base = tmp_path_factory.mktemp("digest")
    return _build(demo_root, base / "a", 4), _build(demo_root, base / "b", 5)


@pytest.fixture
def out(builds, tmp_path) -> Path:
    return Path(shutil.copytree(builds[0], tmp_path / "shards"))


def _shard(out: Path, i: int = 0) -> Path:
    return out / SOURCE / "train" / f"{SOURCE}-train-{i:06d}.tar"


def _index(out: Path, i: int = 0) -> dict:
    return json.loads(Path(str(_shard(out, i)) + INDEX_SUFFIX).read_bytes())


def _keys(sample, image_bytes):
    return sample.key


def _one_pass(out: Path, **kw) -> tuple[list[str], dict]:
    """One pass over the split's global stream (batch 1, one rank: one position per step); an unusable
    sample's position holds a replacement drawn from the split."""
    loader = MixtureLoader(str(out), stage=1, batch_size=1, seed=3, transform=_keys, shuffle_window=4, **kw)
    total = Manifest.read(str(out), SOURCE, "train").samples
    keys = []
    for b in loader:
        keys += b.data
        if len(keys) == total:
            return keys, loader.stats().to_dict()
    raise AssertionError("unreachable")


def _flip(out: Path, sample: int, where: str) -> str:
    """Change one byte of sample ``sample`` of shard 0: in its image, after a ``<p>`` or inside an RLE's
    ``counts``; the tar keeps its size (only bytes change). Returns the sample's key."""
    tar, idx = _shard(out), _index(out)
    blob = bytearray(tar.read_bytes())
    if where == "image":
        _, off, size = idx["image"][sample]
        pos = off + size // 2
    else:
        off, size = idx["json"][sample]
        needle = {"phrase": b"<p>", "rle": b'"counts":"'}[where]
        found = bytes(blob[off : off + size]).find(needle)
        assert found >= 0, f"sample {sample} has no {needle!r}"
        pos = off + found + len(needle)
    blob[pos] = ord("Z") if blob[pos] != ord("Z") else ord("Y")
    tar.write_bytes(bytes(blob))
    return idx["keys"][sample]


def test_the_writer_indexes_every_member_and_the_manifest_records_the_index(out):
    m = Manifest.read(str(out), SOURCE, "train")
    import hashlib

    import fsspec

    for entry in m.shards:
        tar = out / SOURCE / "train" / entry.file
        raw = Path(str(tar) + INDEX_SUFFIX).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == entry.index_sha256
        idx = json.loads(raw)
        scan = index_shard(fsspec.filesystem("file"), str(tar))
        assert idx["keys"] == scan.keys and idx["samples"] == entry.samples == scan.n
        assert idx["bytes"] == entry.bytes and idx["sha256"] == entry.sha256
        data = tar.read_bytes()
        for j, (jo, jl) in enumerate(idx["json"]):
            image = idx["image"][j]
            img = data[image[1] : image[1] + image[2]] if image else None
            assert sample_digest(data[jo : jo + jl], img) == idx["digest"][j]


@pytest.mark.parametrize("where", ["image", "phrase", "rle"])
def test_a_flipped_byte_is_a_counted_digest_mismatch_and_strict_stops(out, where):
    clean, _ = _one_pass(out)
    bad = _flip(out, 1, where)
    with pytest.warns(UserWarning, match="digest_mismatch"):
        seen, stats = _one_pass(out)
    assert set(stats["skipped"]) == {"digest_mismatch"} and stats["skipped"]["digest_mismatch"] >= 1
    assert bad not in seen and len(seen) == len(clean) and set(seen) == set(clean) - {bad}
    with pytest.raises(LoaderError, match="digest_mismatch"):
        _one_pass(out, strict=True)
    # the check can be switched off (to measure its cost): then the changed sample goes through
    seen, stats = _one_pass(out, verify=False)
    assert bad in seen and stats["skipped"] == {}


def test_a_same_named_shard_from_another_build_is_refused(builds, out):
    other, ours = builds[1], _index(out)["keys"]
    for files in ([".tar"], [".tar", ".tar" + INDEX_SUFFIX]):  # the tar alone, or with its own index
        for suffix in files:
            shutil.copy(
                str(_shard(other)).removesuffix(".tar") + suffix,
                str(_shard(out)).removesuffix(".tar") + suffix,
            )
        with pytest.warns(UserWarning, match="shard_mismatch"):
            seen, stats = _one_pass(out)
        assert set(stats["skipped"]) == {"shard_mismatch"} and stats["skipped"]["shard_mismatch"] >= 4
        assert not set(seen) & set(ours)
        with pytest.raises(LoaderError, match=r"shard_mismatch.*coco_panoptic-train-000000\.tar"):
            _one_pass(out, strict=True)


def test_a_shard_with_extra_samples_is_detected_without_an_index_too(builds, out):
    """A build from before member indexes (no ``.idx.json``, no ``index_sha256``): the header scan finds
    more samples than the manifest lists."""
    for p in out.rglob("*" + INDEX_SUFFIX):
        p.unlink()
    for name in ("mixture.json", f"{SOURCE}/train/manifest.json"):
        text = (out / name).read_text()
        d = json.loads(text)
        _drop_index_sha(d)
        (out / name).write_text(json.dumps(d))
    seen, stats = _one_pass(out)  # the old build reads as before
    assert stats["skipped"] == {} and len(seen) == Manifest.read(str(out), SOURCE, "train").samples
    shutil.copy(_shard(builds[1]), _shard(out))  # 5 samples where the manifest lists 4
    with pytest.warns(UserWarning, match="shard_mismatch"):
        seen, stats = _one_pass(out)
    assert set(stats["skipped"]) == {"shard_mismatch"} and stats["skipped"]["shard_mismatch"] >= 4
    assert any("5 samples, the manifest lists 4" in e for e in stats["errors"])


def _drop_index_sha(x) -> None:
    if isinstance(x, dict):
        x.pop("index_sha256", None)
        for v in x.values():
            _drop_index_sha(v)
    elif isinstance(x, list):
        for v in x:
            _drop_index_sha(v)
