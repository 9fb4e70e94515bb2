"""Balance-resampling mixture: arithmetic against hand-computed values, manifests → mixture.json,
validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipelines import mixture_file
from pipelines.build import mixture_weights
from pipelines.build.mixture_weights import MixtureError, balance_weights
from pipelines.shard_store import ShardStoreError
from tests.support.data import write_source


def fake_manifest(out: Path, source: str, n: int, task: str = "genseg", shard_size: int = 1000) -> None:
    """A manifest only (no tar files): enough for mixture arithmetic at real scale."""
    sizes = [shard_size] * (n // shard_size) + ([n % shard_size] if n % shard_size else [])
    shards = [
        {"file": f"{source}-train-{k:06d}.tar", "samples": s, "bytes": s * 100, "sha256": "0" * 64}
        for k, s in enumerate(sizes)
    ]
    d = out / source / "train"
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(
        json.dumps(
            {
                "schema": 1,
                "source": source,
                "task": task,
                "split": "train",
                "shards": shards,
                "counts": {"samples": n},
                "fingerprint": "f",
            }
        )
    )


# ---------------------------------------------------------------------------------------------- arithmetic
def test_balance_weights_small_source_among_million_sample_ones():
    # hand-computed (40-digit decimal): ΣN = 2,000,239; f_lisa = 239/2,000,239;
    # r_lisa = sqrt(0.1·2,000,239/239) = sqrt(836.920083…) = 28.929571…; the big ones have f ≈ 0.49994 > t → r
    # = 1
    w = balance_weights({"a": 1_000_000, "b": 1_000_000, "lisa": 239}, t=0.1)
    assert w["lisa"]["fraction"] == pytest.approx(1.194857214562859738e-4, rel=1e-12)
    assert w["lisa"]["repeat"] == pytest.approx(28.92957109398631178, rel=1e-12)
    assert w["a"]["repeat"] == w["b"]["repeat"] == 1.0
    assert w["lisa"]["probability"] == pytest.approx(0.003445173492449392905, rel=1e-12)
    assert w["a"]["probability"] == pytest.approx(0.4982774132537753035, rel=1e-12)
    assert w["lisa"]["epoch_samples"] == 6914  # int(239 · 28.9296) as the recipe's ConcatDataset
    assert sum(v["epoch_samples"] for v in w.values()) == 2_006_914
    assert math.fsum(v["probability"] for v in w.values()) == pytest.approx(1.0, abs=1e-15)


def test_balance_weights_edges():
    # every dataset above t: no resampling, p = f
    w = balance_weights({"x": 300, "y": 700})
    assert [w["x"]["repeat"], w["y"]["repeat"]] == [1.0, 1.0]
    assert w["x"]["probability"] == pytest.approx(0.3)
    # t = 0 disables resampling; t = 1 up-weights everything below 100%: r = sqrt(1/f)
    assert balance_weights({"x": 1, "y": 99}, t=0.0)["x"]["repeat"] == 1.0
    w = balance_weights({"x": 1, "y": 3}, t=1.0)
    assert w["x"]["repeat"] == pytest.approx(2.0) and w["y"]["repeat"] == pytest.approx(math.sqrt(4 / 3))
    assert w["x"]["probability"] == pytest.approx(2 / (2 + 3 * math.sqrt(4 / 3)))
    for bad in ({"x": 0}, {"x": -3}, {"x": 2.5}):
        with pytest.raises(MixtureError):
            balance_weights(bad)
    for t in (float("nan"), float("inf"), -0.1):
        with pytest.raises(MixtureError):
            balance_weights({"x": 1}, t=t)


# ---------------------------------------------------------------------------------------------- manifests →
# mixture.json
def test_compute_from_manifests_at_recipe_scale(tmp_path):
    sizes = {"llava_instruct": 624_610, "coco_panoptic": 118_287, "refcoco": 120_624, "lisa_reasonseg": 239}
    for src, n in sizes.items():
        fake_manifest(tmp_path, src, n)
    mix = mixture_weights.compute(str(tmp_path))
    s3 = mix.stage(3)
    assert s3.names == [
        "llava_instruct/train",
        "coco_panoptic/train",
        "refcoco/train",
        "lisa_reasonseg/train",
    ]
    total = sum(sizes.values())
    lisa = s3.datasets[3]
    assert lisa.samples == 239 and lisa.repeat == pytest.approx(math.sqrt(0.1 * total / 239))
    assert s3.datasets[0].repeat == 1.0  # LLaVA: f ≈ 0.72 > t
    assert s3.samples_per_epoch == sum(int(n * max(1, math.sqrt(0.1 * total / n))) for n in sizes.values())
    assert s3.steps_per_epoch(64) == sum(-(-d.epoch_samples // 64) for d in s3.datasets)
    missing = [m["dataset"] for m in s3.missing]
    assert missing == [
        "refcoco+/train",
        "refcocog/train",
        "grandf_gcg/train",
        "refcocog_gcg/train",
        "psg_gcg/train",
        "flickr_gcg/train",
        "coco_vgd/train",
    ]
    # stage 1 is COCO panoptic alone; stage 2's LLaVA-Pretrain was not built
    assert mix.stage(1).names == ["coco_panoptic/train"] and mix.stage(1).probabilities == [1.0]
    assert mix.stage(2).datasets == () and mix.stage(2).missing[0]["dataset"] == "llava_pretrain/train"
    # the shard list is complete and relative to --out: training never lists folders
    pan = s3.datasets[1]
    assert (
        len(pan.shards) == 119 and pan.shards[0].file == "coco_panoptic/train/coco_panoptic-train-000000.tar"
    )
    assert sum(sh.samples for sh in pan.shards) == pan.shard_samples == 118_287


def test_write_load_round_trip_and_validation(tmp_path):
    fake_manifest(tmp_path, "coco_panoptic", 5000)
    fake_manifest(tmp_path, "lisa_reasonseg", 239)
    path = mixture_weights.write(str(tmp_path), mixture_weights.compute(str(tmp_path)))
    assert path == str(tmp_path / "mixture.json")
    loaded = mixture_file.load(str(tmp_path))
    assert loaded == mixture_file.load(path)
    assert loaded.to_dict() == json.loads((tmp_path / "mixture.json").read_text())
    assert loaded.stage(3).digest() == mixture_weights.compute(str(tmp_path)).stage(3).digest()
    # a hand-edited file that breaks an invariant is refused on load
    d = json.loads((tmp_path / "mixture.json").read_text())
    for field, value, match in (
        ("probability", 0.9, "sum to"),
        ("probability", float("nan"), "finite"),
        ("probability", -0.2, "finite and > 0"),
        ("repeat", 0.5, "< 1"),
        ("samples", 0, "positive int"),
    ):
        bad = json.loads(json.dumps(d))
        bad["stages"]["3"]["datasets"][0][field] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(MixtureError, match=match):
            mixture_file.load(str(tmp_path / "bad.json"))
    with pytest.raises(KeyError, match="no stage"):
        loaded.stage(4)
    # stages are ints in code; the file keys (and labels) them "1", "2", "3" since JSON keys are strings
    assert sorted(loaded.stages) == [1, 2, 3] and sorted(d["stages"]) == ["1", "2", "3"]
    assert [d["stages"][k]["stage"] for k in ("1", "2", "3")] == ["1", "2", "3"]
    with pytest.raises(TypeError, match="is an int"):
        loaded.stage("3")


def test_flagged_samples_left_out_of_n(tmp_path):
    """gRefCOCO no-target samples (``meta.no_target``) are not counted in N_d unless asked for."""
    flagged = {1, 4, 5, 9}
    write_source(tmp_path, "grefcoco", [6, 6], task="chat", flagged=flagged)
    write_source(tmp_path, "coco_panoptic", [20])
    mix = mixture_weights.compute(str(tmp_path), stage3_extra=["grefcoco"])
    g = mix.stage(3).datasets[-1]
    assert (g.name, g.samples, g.shard_samples, g.excluded) == ("grefcoco/train", 8, 12, {"no_target": 4})
    assert g.repeat == pytest.approx(max(1.0, math.sqrt(0.1 * 28 / 8)))
    # the count comes from the manifest, never from the shards
    write_source(tmp_path, "grefcoco", [6, 6], flagged=flagged, manifest_counts={"no_target": 3})
    g = mixture_weights.compute(str(tmp_path), stage3_extra=["grefcoco"]).stage(3).datasets[-1]
    assert g.excluded == {"no_target": 3} and g.samples == 9
    # a manifest written before the writer counted flags is an error naming it, asking for a rebuild
    write_source(tmp_path, "grefcoco", [6, 6], flagged=flagged, manifest_counts={"no_target": None})
    with pytest.raises(
        ShardStoreError, match=r"grefcoco/train/manifest.json: counts has no 'no_target'.*rebuild"
    ):
        mixture_weights.compute(str(tmp_path), stage3_extra=["grefcoco"])
    # ... unless the flag is not excluded: then nothing needs the count
    g = mixture_weights.compute(str(tmp_path), stage3_extra=["grefcoco"], exclude_flags=())
    assert g.stage(3).datasets[-1].samples == 12
    write_source(tmp_path, "grefcoco", [6, 6], flagged=flagged)
    # opting out of the exclusion keeps them
    g = mixture_weights.compute(str(tmp_path), stage3_extra=["grefcoco"], exclude_flags=()).stage(3)
    assert g.datasets[-1].samples == 12 and g.exclude_flags == ()
    # a source whose every sample is flagged is listed as missing, not given a zero weight
    write_source(tmp_path, "grefcoco", [3], flagged={0, 1, 2})
    s3 = mixture_weights.compute(str(tmp_path), stage3_extra=["grefcoco"]).stage(3)
    assert "grefcoco/train" not in s3.names
    assert any(m["dataset"] == "grefcoco/train" and "no trainable" in m["reason"] for m in s3.missing)


def test_cli_rewrites_and_rejects_unknown_extra(tmp_path, capsys):
    fake_manifest(tmp_path, "coco_panoptic", 1000)
    fake_manifest(tmp_path, "ade20k_panoptic", 20_000, task="ovseg")
    assert (
        mixture_weights.main(["--out", str(tmp_path), "--t", "0.5", "--stage3-extra", "ade20k_panoptic"]) == 0
    )
    assert "mixture written to" in capsys.readouterr().out
    mix = mixture_file.load(str(tmp_path))
    assert mix.t == 0.5 and mix.stage(3).names == ["coco_panoptic/train", "ade20k_panoptic/train"]
    assert mix.stage(3).datasets[0].repeat == pytest.approx(math.sqrt(0.5 * 21_000 / 1000))
    with pytest.raises(MixtureError, match="unknown source"):
        mixture_weights.main(["--out", str(tmp_path), "--stage3-extra", "ade20k_panoptik"])


def test_build_writes_mixture(demo_root, tmp_path):
    from pipelines.build.driver import build
    from pipelines.sources.base import BuildOptions

    out = tmp_path / "shards"
    build(
        str(demo_root),
        str(out),
        sources=["coco_panoptic"],
        options=BuildOptions(samples_per_shard=3),
    )
    mix = mixture_file.load(str(out))
    manifest = json.loads((out / "coco_panoptic" / "train" / "manifest.json").read_text())
    s1 = mix.stage(1)
    assert s1.names == ["coco_panoptic/train"] and s1.datasets[0].samples == manifest["counts"]["samples"]
    assert [sh.file.rsplit("/", 1)[-1] for sh in s1.datasets[0].shards] == [
        s["file"] for s in manifest["shards"]
    ]
