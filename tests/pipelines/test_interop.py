"""Other tools open our shards: Hugging Face `datasets` (the "webdataset" builder, and a shard
folder with its dataset card as README.md), plain `webdataset.WebDataset`, and `tar tf` (members in key
order). Everything offline: HF_HUB_OFFLINE=1, the datasets cache under tmp_path."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import webdataset as wds

from pipelines.build.driver import build
from pipelines.inspect import cards
from pipelines.schema import Sample, from_wds, validate
from pipelines.sources.base import BuildOptions
from tests.support.data import manifest

SOURCES = ("coco_panoptic", "coco_instance")


@pytest.fixture(scope="module")
def shards(demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interop") / "shards"
    # 3 samples per shard, so a split spans several shards and order across shards is exercised too
    build(
        str(demo_root),
        str(out),
        sources=list(SOURCES),
        splits=["train", "val"],
        options=BuildOptions(samples_per_shard=3),
    )
    return out


@pytest.fixture
def offline_hf(tmp_path, monkeypatch) -> Path:
    """No network, and a datasets cache of this test's own."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


def shard_paths(out: Path, source: str, split: str) -> list[str]:
    return [str(out / source / split / s["file"]) for s in manifest(out, source, split)["shards"]]


def our_samples(out: Path, source: str, split: str) -> list[tuple[Sample, bytes]]:
    return [from_wds(it) for it in wds.WebDataset(shard_paths(out, source, split), shardshuffle=False)]


def test_split_spans_several_shards(shards):
    assert len(manifest(shards, "coco_panoptic", "train")["shards"]) >= 2


@pytest.mark.parametrize("source", SOURCES)
def test_webdataset_reads_our_shards(shards, source):
    for split in ("train", "val"):
        m = manifest(shards, source, split)
        items = list(wds.WebDataset(shard_paths(shards, source, split), shardshuffle=False))
        assert len(items) == m["counts"]["samples"]
        keys = [it["__key__"] for it in items]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        for it in items:
            assert set(it) >= {"__key__", "json", "jpg"}
            sample, image = from_wds(it)
            validate(sample)
            assert sample.key == it["__key__"] and image[:3] == b"\xff\xd8\xff"
        # the decoding pipeline webdataset users write works too
        decoded = next(
            iter(
                wds.WebDataset(shard_paths(shards, source, split), shardshuffle=False)
                .decode("pil")
                .to_tuple("__key__", "jpg", "json")
            )
        )
        key, image, meta = decoded
        assert image.size == (meta["image"]["width"], meta["image"]["height"]) and meta["key"] == key


@pytest.mark.parametrize("source", SOURCES)
def test_hf_datasets_webdataset_builder_reads_our_shards(shards, source, offline_hf):
    import datasets

    files = {split: str(shards / source / split / "*.tar") for split in ("train", "val")}
    # plain call, the builder guessing column types (fine here; see pipelines/inspect/hf.py for why real data
    # needs explicit features, tested below)
    ds = datasets.load_dataset("webdataset", data_files=files, cache_dir=str(offline_hf))
    assert set(ds) == {"train", "val"}
    for split in ("train", "val"):
        ours = our_samples(shards, source, split)
        rows = ds[split]
        assert rows.num_rows == manifest(shards, source, split)["counts"]["samples"] == len(ours)
        assert rows["__key__"] == [s.key for s, _ in ours]
        for row, (sample, _) in zip(rows, ours, strict=True):
            assert row["jpg"].size == (sample.image.width, sample.image.height)
            got = Sample.from_dict(row["json"])
            validate(got)
            assert [m.rle for m in got.masks] == [m.rle for m in sample.masks]
            assert got.conversation == sample.conversation and got.phrases == sample.phrases
    assert any(offline_hf.rglob("*.arrow"))  # the cache went to this test's folder


def test_hf_datasets_loads_a_shard_folder_through_its_card(shards, offline_hf, tmp_path):
    """`pipelines.inspect.cards --readme` writes the card into <out>/<source>/README.md; its `configs` globs
    make `datasets.load_dataset("<out>/<source>")` find every split."""
    import datasets

    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    cards.main(["--out", str(out), "--cards-dir", str(tmp_path / "cards"), "--readme"])
    ds = datasets.load_dataset(str(out / "coco_instance"), cache_dir=str(offline_hf))
    assert {s: ds[s].num_rows for s in ds} == {
        s: manifest(out, "coco_instance", s)["counts"]["samples"] for s in ("train", "val")
    }


@pytest.mark.parametrize("source", SOURCES)
def test_tar_lists_members_in_key_order(shards, source):
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("no tar binary")
    for split in ("train", "val"):
        all_keys = []
        for path in shard_paths(shards, source, split):
            names = subprocess.run(
                [tar, "tf", path], capture_output=True, text=True, check=True
            ).stdout.split()
            keys = [n.rsplit("/", 1)[0] + "/" + n.rsplit("/", 1)[1].split(".", 1)[0] for n in names]
            # each key's members are adjacent (json + image), and keys ascend
            runs = [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
            assert runs == sorted(runs) and len(set(runs)) == len(runs), path
            assert all(names.count(f"{k}.json") == 1 for k in runs)
            all_keys += runs
        assert all_keys == sorted(all_keys)  # shards follow each other in key order as well
        assert len(all_keys) == manifest(shards, source, split)["counts"]["samples"]


def test_hf_features_survive_what_schema_guessing_does_not(tmp_path, offline_hf):
    """A shard whose first samples have no ``ignore`` and one ``meta`` key, then a sample with both, and a PNG
    among JPEGs: ``pipelines.inspect.hf.load_shards`` (explicit features) reads every Sample back exactly."""
    import io

    import numpy as np
    from PIL import Image

    from pipelines import masks
    from pipelines.inspect.hf import load_shards
    from pipelines.schema import ImageRef, MaskTarget, Turn, to_wds

    h, w = 24, 32
    m = np.zeros((h, w), np.uint8)
    m[4:20, 4:28] = 1
    rle = masks.encode(m)[0]
    d = tmp_path / "out" / "mixed" / "train"
    d.mkdir(parents=True)
    expected = []
    with wds.TarWriter(str(d / "mixed-train-000000.tar")) as tw:
        for i in range(8):
            ext = "png" if i == 3 else "jpg"
            buf = io.BytesIO()
            Image.new("RGB", (w, h), (10 * i, 0, 0)).save(buf, format="PNG" if ext == "png" else "JPEG")
            s = Sample(
                key=f"mixed/train/{i:04d}",
                source="mixed",
                task="genseg",
                split="train",
                image=ImageRef(f"x/{i}.{ext}", w, h),
                conversation=[Turn("user", "<image>\n<p>thing</p>"), Turn("assistant", "<SEG>.")],
                phrases=["thing"],
                masks=[MaskTarget(rle, 0, category_id=1)],
                ignore=rle if i == 6 else None,
                meta={"image_id": i, **({"no_target": False, "extra": [1, 2]} if i == 6 else {})},
            )
            tw.write(to_wds(s, buf.getvalue(), ext))
            expected.append((s, ext))
    ds = load_shards(tmp_path / "out", "mixed", ["train"], cache_dir=str(offline_hf))["train"]
    assert ds.num_rows == 8
    for row, (s, ext) in zip(ds, expected, strict=True):
        assert row["json"] == json.loads(s.to_json())  # exactly the Sample, no null-filled keys
        assert row[ext].size == (w, h) and row["png" if ext == "jpg" else "jpg"] is None


@pytest.mark.slow
def test_every_source_opens_in_hf_datasets_and_webdataset(demo_root, tmp_path, offline_hf):
    """Every registered source's demo shards (all splits) load through ``pipelines.inspect.hf.load_shards``
    and the dataset card's ``dataset_info``, each Sample JSON exactly as written, and through plain
    webdataset."""
    import datasets

    from pipelines.inspect.hf import load_shards
    from pipelines.shard_store import list_manifests
    from pipelines.sources import SOURCES as registry

    out = cards.build_demo(tmp_path, data_root=demo_root)
    by_source: dict[str, list[str]] = {}
    for m in list_manifests(str(out)):
        by_source.setdefault(m.source, []).append(m.split)
    assert set(by_source) == set(registry)  # the demo data has every source
    cards.write_readmes(cards.render_cards(str(out)), str(out))
    for source, splits in sorted(by_source.items()):
        ds = load_shards(out, source, cache_dir=str(offline_hf))
        via_card = datasets.load_dataset(str(out / source), cache_dir=str(offline_hf))
        assert sorted(ds) == sorted(via_card) == sorted(splits)
        for s in splits:
            items = list(wds.WebDataset(shard_paths(out, source, s), shardshuffle=False))
            assert ds[s]["__key__"] == via_card[s]["__key__"] == [it["__key__"] for it in items], (source, s)
            for row, it in zip(ds[s], items, strict=True):
                assert row["json"] == json.loads(it["json"]), (source, s, it["__key__"])
                validate(Sample.from_dict(row["json"]))
