"""Evaluation verifies what it scores: val shards are read through the training loader's checks (member index
against the manifest, each sample's sha256, the manifest's counts), so a ground truth changed in place, a
changed RLE or a removed sample stops ``evaluate.py`` with one line naming the shard and the key (exit 2),
where it used to score the changed data (PQ 100 → 95.24, cIoU 98.40) or 8 of 9 samples."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from orchestrate import evaluate
from orchestrate.evaluation import EvaluationError
from orchestrate.evaluation import ground_truth as gt
from pipelines.errors import run_cli
from pipelines.shard_store import INDEX_SUFFIX, Manifest
from tests.support.evaluation import write_jsonl


@pytest.fixture
def copy(demo_val, tmp_path) -> Path:
    """A private copy of the demo's val shards (the tests change them)."""
    return Path(shutil.copytree(demo_val[1], tmp_path / "shards"))


def _shard(shards: Path, name: str, i: int) -> Path:
    source, split = name.split("/")
    return shards / source / split / f"{source}-{split}-{i:06d}.tar"


def _edit_member(tar: Path, sample: int, old: bytes, new: bytes) -> str:
    """Replace the first ``old`` in sample ``sample``'s JSON member by ``new`` (same length): the tar keeps
    its size, only bytes change. Returns the sample's key."""
    assert len(old) == len(new)
    idx = json.loads(Path(str(tar) + INDEX_SUFFIX).read_bytes())
    off, size = idx["json"][sample]
    blob = bytearray(tar.read_bytes())
    at = bytes(blob[off : off + size]).find(old)
    assert at >= 0, f"sample {sample} has no {old!r}"
    blob[off + at : off + at + len(old)] = new
    tar.write_bytes(bytes(blob))
    return idx["keys"][sample]


def _evaluate(
    demo_val, shards: Path, name: str, lines: list[dict], tmp_path, capsys
) -> tuple[int, list[str]]:
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    argv = ["--predictions", str(path), "--shards", str(shards), "--data-root", str(demo_val[0])]
    argv += ["--sets", name, "--out", str(tmp_path / "o"), "--wandb-mode", "disabled", "-q"]
    rc = run_cli(evaluate.main, argv)
    return rc, capsys.readouterr().err.strip().splitlines()


def test_a_category_id_changed_in_place_is_refused(demo_val, perfect, copy, tmp_path, capsys):
    name = "coco_panoptic/val"
    tar = _shard(copy, name, 0)
    sample = json.loads(next(iter(_members(tar).values())))
    cat = next(m["category_id"] for m in sample["masks"] if not m.get("iscrowd"))
    known = gt.open_set(str(copy), str(demo_val[0]), name).categories
    other = next(c for c in sorted(known) if c != cat and len(str(c)) == len(str(cat)))  # still a category
    key = _edit_member(tar, 0, f'"category_id":{cat}'.encode(), f'"category_id":{other}'.encode())
    assert tar.stat().st_size == (demo_val[1] / tar.relative_to(copy)).stat().st_size
    rc, err = _evaluate(demo_val, copy, name, perfect[name], tmp_path, capsys)
    assert rc == 2 and len(err) == 1, err
    assert str(tar) in err[0] and key in err[0] and "digest_mismatch" in err[0]


def test_a_changed_rle_is_refused(demo_val, perfect, copy, tmp_path, capsys):
    name = "refcoco/val"
    tar = _shard(copy, name, 1)
    raw = _members(tar)
    first = json.loads(next(iter(raw.values())))
    rle = first["masks"][0]["rle"]
    key = _edit_member(tar, 0, rle["counts"].encode(), _other_mask_same_length(rle).encode())
    rc, err = _evaluate(demo_val, copy, name, perfect[name], tmp_path, capsys)
    assert rc == 2 and len(err) == 1, err
    assert str(tar) in err[0] and key in err[0] and "digest_mismatch" in err[0]


def test_a_removed_sample_is_refused(demo_val, perfect, copy, tmp_path, capsys):
    """The shard rewritten without its last sample: its member index (and the manifest) still list it."""
    name = "refcoco/val"
    tar = _shard(copy, name, 0)
    members = _members(tar, images=True)
    keys = list(dict.fromkeys(n.split(".")[0] for n in members))
    gone = keys[-1]
    with tarfile.open(tar, "w") as t:
        for n, data in members.items():
            if not n.startswith(gone + "."):
                info = tarfile.TarInfo(n)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    lines = [x for x in perfect[name] if x["key"] != gone]  # the predictions match what is left
    rc, err = _evaluate(demo_val, copy, name, lines, tmp_path, capsys)
    assert rc == 2 and len(err) == 1, err
    assert str(tar) in err[0] and "shard_mismatch" in err[0]


def test_a_manifest_whose_counts_disagree_is_refused(demo_val, perfect, copy, tmp_path, capsys):
    name = "refcoco/val"
    path = copy / "refcoco/val/manifest.json"
    d = json.loads(path.read_text())
    d["counts"]["samples"] -= 1
    path.write_text(json.dumps(d))
    rc, err = _evaluate(demo_val, copy, name, perfect[name], tmp_path, capsys)
    assert rc == 2 and len(err) == 1, err
    assert str(path) in err[0] and "counts.samples is" in err[0]


def test_evaluation_while_training_and_inference_read_verified(demo_val, copy):
    """The training-time evaluation's subset and ``--export``'s inference read through the same check."""
    from orchestrate.eval_callback import _first_samples
    from orchestrate.evaluation.export_inference import SetJob, ShardPredictor

    name = "refcoco/val"
    evs = gt.open_set(str(copy), str(demo_val[0]), name)
    assert len(_first_samples(evs, 100)) == Manifest.read(str(copy), "refcoco", "val").samples
    tar = _shard(copy, name, 0)
    idx = json.loads(Path(str(tar) + INDEX_SUFFIX).read_bytes())
    key, off = idx["keys"][1], idx["image"][1][1] + 10
    blob = tar.read_bytes()
    tar.write_bytes(blob[:off] + bytes([blob[off] ^ 0xFF]) + blob[off + 1 :])  # one image byte flipped
    with pytest.raises(EvaluationError, match=f"{tar}: {key}: digest_mismatch"):
        _first_samples(evs, 100)
    predictor = ShardPredictor.__new__(ShardPredictor)  # no model: the read fails before the first forward
    predictor.options = type("O", (), {"batch_size": 100})()
    with pytest.raises(EvaluationError, match=f"{key}: digest_mismatch"):
        predictor.predict(SetJob(evs, "per_turn", "teacher", 3), tar.name)


def _other_mask_same_length(rle: dict) -> str:
    """A valid RLE of another mask (one pixel added at the edge of a run) whose string has the same length:
    scored, it would give a cIoU below 100."""
    from pycocotools import mask as mask_utils

    m = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).ravel(order="F")
    edges = np.flatnonzero(np.diff(m.astype(np.int8)))
    for e in edges:
        for at in (e, e + 1):
            x = m.copy()
            x[at] ^= 1
            counts = mask_utils.encode(np.asfortranarray(x.reshape(rle["size"], order="F")))[
                "counts"
            ].decode()
            if len(counts) == len(rle["counts"]) and counts != rle["counts"]:
                return counts
    raise AssertionError("no same-length edit found")


def _members(tar: Path, images: bool = False) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {
            m.name: t.extractfile(m).read()
            for m in t.getmembers()
            if m.isfile() and (images or m.name.endswith(".json"))
        }
