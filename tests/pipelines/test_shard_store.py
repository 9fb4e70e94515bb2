"""The shard store (docs/contracts.md#shards-and-manifests): typed manifests read back exactly as written, one
tar reader checked against ``tarfile``, the per-flag counts the mixture relies on, and the errors for old or
broken builds."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import pytest
import webdataset as wds

from pipelines import shard_store
from pipelines.build import mixture_weights
from pipelines.build.driver import build
from pipelines.build_options import BuildOptions
from pipelines.mixture_file import EXCLUDE_FLAGS
from pipelines.schema import ImageRef, Sample, Turn, from_wds, to_wds
from pipelines.shard_store import Manifest, ShardStoreError

SOURCES = ["grefcoco", "coco_panoptic", "llava_instruct"]
BUILT = ["coco_panoptic/train", "coco_panoptic/val", "grefcoco/train", "grefcoco/val", "llava_instruct/train"]


@pytest.fixture(scope="module")
def built(demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "shards"
    build(
        str(demo_root),
        str(out),
        sources=SOURCES,
        splits=("train", "val"),
        options=BuildOptions(samples_per_shard=3),
    )
    return out


def tar_groups(path: Path) -> list[dict]:
    """webdataset-style items of a tar read with ``tarfile`` alone: the reference the store is checked
    against."""
    items: list[dict] = []
    with tarfile.open(path) as tar:
        for ti in tar:
            key, _, ext = ti.name.rpartition("/")[2].partition(".")
            key = f"{ti.name.rpartition('/')[0]}/{key}"
            if not items or items[-1]["__key__"] != key:
                items.append({"__key__": key})
            items[-1][ext] = tar.extractfile(ti).read()
            items[-1].setdefault("_offsets", {})[ext] = (ti.offset_data, ti.size)
    return items


# ---------------------------------------------------------------------------------------------- manifests
def test_manifest_round_trip_is_the_json_the_writer_wrote(built):
    paths = sorted(built.glob("*/*/manifest.json"))
    assert len(paths) == len(BUILT)
    for path in paths:
        written = json.loads(path.read_text())
        m = Manifest.read(str(built), path.parent.parent.name, path.parent.name)
        assert m.to_dict() == written and m.extra == {}
        assert Manifest.from_dict(m.to_dict()) == m
        assert (m.name, m.samples, m.url) == (
            f"{m.source}/{m.split}",
            written["counts"]["samples"],
            str(path),
        )
        assert [s.file for s in m.shards] == [s["file"] for s in written["shards"]]
    # Manifest.write gives the same bytes as the writer (canonical JSON), and keys a newer writer adds survive
    m = Manifest.read(str(built), "grefcoco", "train")
    before = (built / "grefcoco/train/manifest.json").read_bytes()
    assert Path(m.write(str(built))).read_bytes() == before
    newer = Manifest.from_dict({**m.to_dict(), "future_field": [1, 2]})
    assert newer.extra == {"future_field": [1, 2]} and newer.to_dict()["future_field"] == [1, 2]


def test_list_manifests_sorted_filtered_and_empty(built, tmp_path):
    all_ = shard_store.list_manifests(str(built))
    assert [m.name for m in all_] == BUILT  # the demo has no llava_instruct val
    assert [m.name for m in shard_store.list_manifests(str(built), ["grefcoco"], ["val"])] == ["grefcoco/val"]
    assert [m.split for m in shard_store.list_manifests(f"file://{built}", splits=["train"])] == ["train"] * 3
    assert shard_store.list_manifests(str(tmp_path / "nothing here")) == []
    assert shard_store.list_manifests(str(tmp_path)) == []


def test_missing_and_malformed_manifests_are_errors_naming_the_file(built, tmp_path):
    with pytest.raises(shard_store.MissingManifestError, match="lvis/train/manifest.json: no manifest"):
        Manifest.read(str(built), "lvis", "train")
    d = tmp_path / "x" / "train"
    d.mkdir(parents=True)
    good = json.loads((built / "grefcoco/train/manifest.json").read_text())
    for broken, match in (
        ("{not json", "not valid JSON"),
        (json.dumps({k: v for k, v in good.items() if k != "shards"}), r"missing key\(s\) \['shards'\]"),
        (json.dumps({**good, "counts": {"masks": 1}}), "counts has no 'samples'"),
        (json.dumps({**good, "shards": [{"file": "a.tar", "samples": 1}]}), "shard entry is malformed"),
        (json.dumps([1]), "not a JSON object"),
    ):
        (d / "manifest.json").write_text(broken)
        with pytest.raises(ShardStoreError, match=match) as e:
            Manifest.read(str(tmp_path), "x", "train")
        assert str(d / "manifest.json") in str(e.value)


# ---------------------------------------------------------------------------------------------- flag counts
def test_writer_counts_flags_in_every_manifest(built):
    for m in shard_store.list_manifests(str(built)):
        flagged = sum(
            bool(s.meta.get("no_target")) for s, _ in shard_store.iter_samples(str(built), m.source, m.split)
        )
        assert m.counts["no_target"] == m.flag_count("no_target") == flagged, m.name
        if m.source == "grefcoco":
            assert flagged > 0  # the demo has no-target expressions in both splits
    # the mixture takes N_d from the manifest: grefcoco's trainable samples leave the no-target ones out
    g = mixture_weights.compute(str(built), stage3_extra=["grefcoco"]).stage(3).datasets[-1]
    m = Manifest.read(str(built), "grefcoco", "train")
    assert (g.name, g.samples, g.excluded) == (
        "grefcoco/train",
        m.samples - m.counts["no_target"],
        {"no_target": m.counts["no_target"]},
    )


def test_a_manifest_without_a_flag_count_asks_for_a_rebuild(built, tmp_path):
    out = tmp_path / "old"
    for source in ("grefcoco", "coco_panoptic"):
        d = out / source / "train"
        d.mkdir(parents=True)
        m = json.loads((built / source / "train" / "manifest.json").read_text())
        del m["counts"]["no_target"]  # as written before the writer counted flags
        (d / "manifest.json").write_text(json.dumps(m))
    old = Manifest.read(str(out), "grefcoco", "train")
    with pytest.raises(
        ShardStoreError,
        match=r"grefcoco/train/manifest.json: counts has no 'no_target'.*rebuild grefcoco/train",
    ):
        old.flag_count("no_target")
    with pytest.raises(ShardStoreError, match="rebuild grefcoco/train"):
        mixture_weights.compute(str(out), stage3_extra=["grefcoco"])
    # a source that cannot carry the flag never needs the count
    assert mixture_weights.compute(str(out)).stage(1).names == ["coco_panoptic/train"]


def test_markers_without_flag_counts_are_rebuilt(demo_root, tmp_path):
    out = tmp_path / "shards"
    opts = BuildOptions(samples_per_shard=3)
    (first,) = build(str(demo_root), str(out), sources=["grefcoco"], options=opts)
    want = json.loads((out / "grefcoco/train/manifest.json").read_text())
    marker = out / "grefcoco/train/_parts/000000.json"
    part = json.loads(marker.read_text())
    del part["stats"]["no_target"]  # a completion marker from before flags were counted
    marker.write_text(json.dumps(part))
    (again,) = build(str(demo_root), str(out), sources=["grefcoco"], options=opts)
    assert again.reused_shards == first.shards - 1  # only the old marker's shard was converted again
    got = json.loads((out / "grefcoco/train/manifest.json").read_text())
    assert got["counts"] == want["counts"] and got["shards"] == want["shards"]


def test_every_flag_the_mixture_excludes_is_counted():
    flags = set(EXCLUDE_FLAGS) | {f for fs in mixture_weights.FLAGGED_SOURCES.values() for f in fs}
    assert flags <= set(shard_store.COUNTED_FLAGS)


# ---------------------------------------------------------------------------------------------- the tar
# reader
def test_member_reader_matches_tarfile_on_the_demo_shards(built):
    fs = fsspec.filesystem("file")
    n = 0
    for m in shard_store.list_manifests(str(built)):
        pairs = list(shard_store.iter_samples(str(built), m.source, m.split))
        ref = [g for s in m.shards for g in tar_groups(built / m.source / m.split / s.file)]
        assert len(pairs) == len(ref) == m.samples
        for (sample, image), g in zip(pairs, ref, strict=True):
            want_sample, want_image = from_wds({k: v for k, v in g.items() if k != "_offsets"})
            assert sample == want_sample and image == want_image and sample.key == g["__key__"]
        for s in m.shards:
            path = built / m.source / m.split / s.file
            groups = tar_groups(path)
            idx = shard_store.index_shard(fs, str(path), expected=s.samples)
            assert (idx.n, idx.error, idx.keys) == (s.samples, None, [g["__key__"] for g in groups])
            for j, g in enumerate(groups):
                assert (int(idx.json_off[j]), int(idx.json_len[j])) == g["_offsets"]["json"]
                ext = idx.img_ext[j]
                if ext is None:  # a sample without image (llava_instruct's text-only conversations)
                    assert set(g["_offsets"]) == {"json"}
                    continue
                assert (int(idx.img_off[j]), int(idx.img_len[j])) == g["_offsets"][ext]
            with open(path, "rb") as f:
                members = list(shard_store.iter_members(f, read_data=False))
            with tarfile.open(path) as tar:
                names = [ti.name for ti in tar]
            assert [f"{x.key}.{x.ext}" for x in members] == names
            n += 1
    assert n >= 6


def test_png_and_image_less_samples_and_the_ranged_reader(tmp_path):
    """Samples written by webdataset's own TarWriter: a png, a jpg and a chat sample without an image."""
    d = tmp_path / "mixed" / "train"
    d.mkdir(parents=True)
    samples = [
        Sample(
            key=f"mixed/train/{i:03d}",
            source="mixed",
            task="chat",
            split="train",
            image=None if ext is None else ImageRef(f"x/{i}.{ext}", 2, 2),
            conversation=[Turn("user", "hi" if ext is None else "<image>\nhi"), Turn("assistant", "ok")],
        )
        for i, ext in enumerate(["png", None, "jpg"])
    ]
    images = [b"\x89PNG fake", None, b"\xff\xd8 fake"]
    with wds.TarWriter(str(d / "mixed-train-000000.tar"), encoder=False) as w:
        for s, img, ext in zip(samples, images, ["png", "jpg", "jpg"], strict=True):
            w.write(to_wds(s, img, ext))
    size = (d / "mixed-train-000000.tar").stat().st_size
    Manifest(
        schema=1,
        source="mixed",
        task="chat",
        split="train",
        shards=(shard_store.ShardEntry("mixed-train-000000.tar", 3, size),),
        counts={"samples": 3},
    ).write(str(tmp_path))
    assert list(shard_store.iter_samples(str(tmp_path), "mixed", "train")) == list(
        zip(samples, images, strict=True)
    )
    stats = {"shards_indexed": 0, "bytes_read": 0}
    rel = "mixed/train/mixed-train-000000.tar"
    reader = shard_store.ShardReader(str(tmp_path), None, 4, stats)
    raws = reader.read(rel, 3, 0, 3)
    assert [(r.key, r.image) for r in raws] == [(s.key, img) for s, img in zip(samples, images, strict=True)]
    assert [Sample.from_dict(json.loads(r.json)) for r in raws] == samples
    assert stats["shards_indexed"] == 1 and 0 < stats["bytes_read"] <= size
    # a shard with fewer complete samples than its manifest lists says so, in place of the missing ones
    (tail,) = shard_store.ShardReader(str(tmp_path), None, 4, stats).read(rel, 4, 3, 4)
    assert (tail.key, tail.reason) == (None, "truncated_shard")
    assert "3 complete samples, the manifest lists 4" in tail.detail
    reader.read(rel, 3, 0, 1)  # the first reader's index is cached: no second scan
    assert stats["shards_indexed"] == 2  # one scan per reader


def test_a_shard_cut_short_is_reported_not_read_as_complete(built, tmp_path):
    m = Manifest.read(str(built), "coco_panoptic", "train")
    raw = (built / "coco_panoptic/train" / m.shards[0].file).read_bytes()
    groups = tar_groups(built / "coco_panoptic/train" / m.shards[0].file)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: groups[1]["_offsets"]["json"][0] + 10])  # inside the second sample's JSON
    idx = shard_store.index_shard(fsspec.filesystem("file"), str(cut))
    assert idx.n == 1 and idx.reason == "truncated_shard" and "ends at byte" in idx.error
    with open(cut, "rb") as f, pytest.raises(tarfile.TarError):  # streamed: the short read itself fails
        list(shard_store.group_samples(shard_store.iter_members(f)))


# ---------------------------------------------------------------------------------------------- header fast
# path
def tarfile_index(path: Path) -> tuple[list[tuple], str | None]:
    """What ``index_shard`` finds, computed by ``tarfile`` alone (the scan it did before its header fast
    path): ``([(key, json offset, json size, image offset, image size, image ext)], error)``."""
    size = path.stat().st_size
    rows: list[tuple] = []
    key, group = None, {}

    def close():
        if key is not None and "json" in group:
            ext = next((e for e in ("jpg", "png") if e in group), None)
            rows.append((key, *group["json"], *(group[ext] if ext else (-1, -1)), ext))

    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for ti in tar:
                if not ti.isfile():
                    continue
                if ti.offset_data + ti.size > size:
                    end = ti.offset_data + ti.size
                    return rows, f"member {ti.name} ends at byte {end} of a {size}-byte file"
                head, _, base = ti.name.rpartition("/")
                if "." not in base or base.startswith("."):
                    continue
                k, ext = (
                    f"{head}/{base.split('.', 1)[0]}" if head else base.split(".", 1)[0],
                    base.split(".", 1)[1],
                )
                if k != key:
                    close()
                    key, group = k, {}
                group[ext] = (ti.offset_data, ti.size)
        close()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        return rows, f"{type(e).__name__}: {e}"
    return rows, None


def store_index(path: Path) -> tuple[list[tuple], str | None]:
    idx = shard_store.index_shard(fsspec.filesystem("file"), str(path))
    cols = (idx.json_off, idx.json_len, idx.img_off, idx.img_len)
    rows = [(k, *(int(c[j]) for c in cols), idx.img_ext[j]) for j, k in enumerate(idx.keys)]
    return rows, idx.error


def test_header_scan_equals_tarfile_on_every_truncation_and_corruption(built, tmp_path):
    for path in sorted(built.glob("*/*/*.tar")):
        assert store_index(path) == tarfile_index(path) and store_index(path)[1] is None
    src = sorted((built / "grefcoco/train").glob("*.tar"))[0]
    raw = src.read_bytes()
    cut = tmp_path / "cut.tar"
    cuts = sorted({*range(0, len(raw), 211), *(b + d for b in range(0, len(raw), 512) for d in (-1, 0, 1))})
    for n in cuts:
        cut.write_bytes(raw[:n])
        assert store_index(cut) == tarfile_index(cut), n
    # a changed byte in the headers of the first members (pax header, pax data, ustar header): name, mode,
    # size, checksum, type flag, magic, prefix, pax record, a NUL
    for block in range(9):
        for field in (0, 3, 100, 104, 125, 131, 149, 156, 257, 345, 511):
            for value in (0, ord("0"), ord("9"), ord("x"), 0x80):
                bad = bytearray(raw)
                bad[block * 512 + field] = value
                cut.write_bytes(bad)
                assert store_index(cut) == tarfile_index(cut), (block, field, value)


def _fix_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def test_header_scan_equals_tarfile_on_other_writers(tmp_path):
    """Headers our writer never writes are tarfile's to read: long and non-ASCII names, GNU and ustar formats,
    directories and links, other pax records, base-256 numbers, an unparsable number under a valid
    checksum."""
    files = {
        "a/" + "k" * 120 + ".json": b"{}",  # pax path record / GNU long name / ustar prefix
        "a/b" * 40 + "/x.json": b"{}",  # > 100 characters: a ustar prefix
        "a/é.json": b"{}",
        "a/plain.json": b"{}",
        "a/plain.jpg": b"\xff" * 700,
    }
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"fmt{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in reversed(files.items()):  # plain names first: the fast path reads those
                if fmt == tarfile.USTAR_FORMAT and (len(name.rsplit("/", 1)[1]) > 100 or not name.isascii()):
                    continue
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime = len(data), 0.5 if fmt == tarfile.PAX_FORMAT else 0
                tar.addfile(ti, io.BytesIO(data))
            d = tarfile.TarInfo("a")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("a/link.json")
            link.type, link.linkname = tarfile.SYMTYPE, "a/plain.json"
            tar.addfile(link)
        assert store_index(path) == tarfile_index(path), fmt
        rows = store_index(path)[0]
        assert ("a/plain", "jpg") in [(r[0], r[5]) for r in rows] and len(rows) >= 2
    raw = bytearray((tmp_path / f"fmt{tarfile.USTAR_FORMAT}.tar").read_bytes())
    assert raw[:12] == b"a/plain.jpg\0"
    v7_directory = ((11, b"/"), (156, b"\0"))  # an old-style directory (its 700 bytes are not skipped)
    for edits in (
        [(100, b"\x80")],
        [(108, b"9")],
        [(136, b"z")],
        [(329, b"8")],
        [(124, b"\xff")],
        v7_directory,
    ):
        bad = bytearray(raw)
        for field, value in edits:  # in the first header, which the fast path would read
            bad[field : field + len(value)] = value
        _fix_checksum(memoryview(bad)[:512])
        (tmp_path / "bad.tar").write_bytes(bad)
        assert store_index(tmp_path / "bad.tar") == tarfile_index(tmp_path / "bad.tar"), edits
