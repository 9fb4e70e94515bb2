"""A crafted member never reaches the JSON parser: a sample's JSON member replaced in place by a same-size,
deeply nested ``[[[…]]]`` is found by its digest before anything parses it — on the training read and on
length grouping's measuring read — and is a counted ``digest_mismatch`` replaced like any corrupt sample
(strict: one ``LoaderError`` line naming the key and the shard), never a ``RecursionError``. Where nothing
can be verified (``verify=False``, an index no manifest records), the nesting is a one-line corrupt member."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from pipelines import mixture_file
from pipelines.build import mixture_weights
from pipelines.loader import LoaderError, MixtureLoader
from pipelines.shard_store import INDEX_SUFFIX, Manifest

SOURCE = "coco_panoptic"
SHARD = f"{SOURCE}/train/{SOURCE}-train-000000.tar"


@pytest.fixture(scope="module")
def built(demo_root, tmp_path_factory) -> Path:
    from pipelines.build.driver import build
    from pipelines.build_options import BuildOptions

    out = tmp_path_factory.mktemp("hostile") / "shards"
    build(
        str(demo_root),
        str(out),
        sources=[SOURCE],
        splits=["train"],
        options=BuildOptions(samples_per_shard=4),
    )
    mixture_weights.write(str(out), mixture_weights.compute(str(out), stages={1: [SOURCE]}))
    return out


@pytest.fixture
def out(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "shards"))


def _keys(sample, image_bytes):
    return sample.key


def _rewrite(out: Path, sample: int, payload) -> str:
    """Replace sample ``sample``'s JSON member of shard 0 in place by ``payload(size)`` bytes of the same size
    (the tar keeps its size and layout). Returns the sample's key."""
    tar = out / SHARD
    idx = json.loads(Path(str(tar) + INDEX_SUFFIX).read_bytes())
    off, size = idx["json"][sample]
    new = payload(size)
    assert len(new) == size
    blob = bytearray(tar.read_bytes())
    blob[off : off + size] = new
    tar.write_bytes(bytes(blob))
    return idx["keys"][sample]


def _nested(size: int) -> bytes:
    assert size > 2000, "too shallow to exhaust the parser's recursion limit"
    return b"[" * (size // 2) + b"]" * (size - size // 2)


def _flipped(size: int, out: Path, sample: int) -> bytes:
    tar = out / SHARD
    idx = json.loads(Path(str(tar) + INDEX_SUFFIX).read_bytes())
    off, _ = idx["json"][sample]
    data = bytearray(tar.read_bytes()[off : off + size])
    at = data.index(b'"key"') + 1
    data[at] = ord("K")  # a plain corrupt byte: what every other corrupt sample looks like
    return bytes(data)


def _one_pass(out: Path, **kw) -> tuple[list[str], dict]:
    """One pass over the split's global stream (batch 2, length groups of 4 global batches, one rank)."""
    kw = {"stage": 1, "batch_size": 2, "length_group": 4, "seed": 3, "shuffle_window": 4, **kw}
    loader = MixtureLoader(str(out), transform=_keys, **kw)
    steps = Manifest.read(str(out), SOURCE, "train").samples // 2
    keys = []
    for b in loader:
        keys += b.data
        if len(keys) == 2 * steps:
            return keys, loader.stats().to_dict()
    raise AssertionError("unreachable")


@pytest.mark.parametrize("length_group", [4, 1])
def test_a_nested_member_is_a_counted_digest_mismatch_replaced_like_any_corrupt_sample(out, length_group):
    flipped_out = Path(shutil.copytree(out, out.parent / "flipped"))
    _rewrite(flipped_out, 1, lambda size: _flipped(size, flipped_out, 1))
    bad = _rewrite(out, 1, _nested)
    with pytest.warns(UserWarning, match="digest_mismatch"):
        seen, stats = _one_pass(out, length_group=length_group)
    with pytest.warns(UserWarning, match="digest_mismatch"):
        flipped_seen, flipped_stats = _one_pass(flipped_out, length_group=length_group)
    assert bad not in seen and set(stats["skipped"]) == {"digest_mismatch"}
    assert any(e.startswith(f"{bad}: digest_mismatch: {SHARD} sample 1: ") for e in stats["errors"])
    # the same replacement and the same counts as a sample with one corrupt byte
    assert seen == flipped_seen and stats["skipped"] == flipped_stats["skipped"]


@pytest.mark.parametrize("length_group", [4, 1])
def test_strict_stops_on_a_nested_member_in_one_line_naming_key_and_shard(out, length_group):
    bad = _rewrite(out, 1, _nested)
    with pytest.raises(LoaderError) as e:
        _one_pass(out, length_group=length_group, strict=True)
    assert str(e.value).startswith(f"{bad}: digest_mismatch: {SHARD} sample 1: ")
    assert "\n" not in str(e.value)


def test_unverified_reads_take_a_nested_member_as_corrupt_json(out):
    bad = _rewrite(out, 1, _nested)
    with pytest.warns(UserWarning, match="corrupt_json"):
        seen, stats = _one_pass(out, verify=False)
    assert bad not in seen and stats["skipped"] == {"corrupt_json": stats["skipped"]["corrupt_json"]}
    assert any(e.startswith(f"{bad}: corrupt_json: RecursionError") for e in stats["errors"])
    with pytest.raises(LoaderError, match=f"^{bad}: corrupt_json: RecursionError"):
        _one_pass(out, verify=False, strict=True)


def test_a_nested_index_no_manifest_records_is_a_shard_mismatch(out):
    """A mixture from before member indexes records no index sha256: the index is parsed unverified, and a
    nesting too deep is one ``shard_mismatch`` line for that shard's samples."""
    index = out / (SHARD + INDEX_SUFFIX)
    index.write_bytes(_nested(20_000))  # nothing records its size either
    stage = mixture_file.load(str(out)).stage(1)
    d = stage.datasets[0]
    shards = tuple(dataclasses.replace(s, index_sha256=None) for s in d.shards)
    stage = dataclasses.replace(stage, datasets=(dataclasses.replace(d, shards=shards),))
    with pytest.warns(UserWarning, match="shard_mismatch"):
        seen, stats = _one_pass(out, mixture=stage)
    assert set(stats["skipped"]) == {"shard_mismatch"}
    assert any(f"{SHARD}{INDEX_SUFFIX}: not a member index: maximum recursion" in e for e in stats["errors"])
