"""lisa_reasonseg: masks painted like LISA, ignore / flag shapes, explanations, splits, bad inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines import masks, templates
from pipelines.build.driver import build
from pipelines.demo_data import write_demo
from pipelines.errors import StrictModeError
from pipelines.schema import validate
from pipelines.sources.base import BuildOptions
from tests.support import data

LISA = "img_reaseg/lisa"
EXPL = "explanatory/train.json"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("lisa") / "datas", families=["lisa"])


@pytest.fixture
def root(tmp_path) -> Path:
    return write_demo(tmp_path / "datas", families=["lisa"])


def read_split(out: Path, split: str, source: str = "lisa_reasonseg"):
    return data.read_split(out, source, split, with_images=False)


def annos(root: Path, split: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((root / LISA / split).glob("*.json"))}


def fill(points, h=240, w=320) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    poly = np.asarray(points, np.int32)
    cv2.polylines(m, [poly], True, 1, 1)
    cv2.fillPoly(m, [poly], 1)
    return m.astype(bool)


def add_image(root: Path, split: str, stem: str, anno: dict) -> None:
    """A new LISA image (a copy of an existing JPEG) with the given annotation."""
    jpg = next((root / LISA / split).glob("*.jpg"))
    (root / LISA / split / f"{stem}.jpg").write_bytes(jpg.read_bytes())
    (root / LISA / split / f"{stem}.json").write_text(json.dumps(anno))


def shape(label: str, points) -> dict:
    return {"label": label, "points": points, "shape_type": "polygon"}


BOX = [[40, 40], [200, 40], [200, 180], [40, 180]]
SMALL = [[80, 80], [120, 80], [120, 120], [80, 120]]


# ----------------------------------------------------------------------------- samples
def test_train_is_one_multi_turn_sample_per_image(demo, tmp_path):
    build(str(demo), str(tmp_path / "out"), sources=["lisa_reasonseg"])
    manifest, samples, _ = read_split(tmp_path / "out", "train")
    src = annos(demo, "train")
    assert len(samples) == len(src) == manifest["counts"]["samples"]
    for s in samples:
        validate(s)
        a = src[s.meta["image"][: -len(".jpg")]]
        assert s.phrases == a["text"] and len(s.masks) == len(a["text"]) > 1
        assert [m.label for m in s.masks] == list(range(len(a["text"])))
        assert len({json.dumps(m.rle) for m in s.masks}) == 1  # every turn's mask is the same
        assert s.meta["is_sentence"] == a["is_sentence"]
        assert s.meta["query_type"] == ("sentence" if a["is_sentence"] else "phrase")
        questions = [t.text for t in s.conversation if t.role == "user"]
        assert all(f"<p>{p}</p>" in q for p, q in zip(s.phrases, questions, strict=True))


def test_eval_splits_give_one_sample_per_question(demo, tmp_path):
    build(str(demo), str(tmp_path / "out"), sources=["lisa_reasonseg"], splits=["val", "test"])
    for split in ("val", "test"):
        _, samples, _ = read_split(tmp_path / "out", split)
        assert len(samples) == sum(len(a["text"]) for a in annos(demo, split).values()) > 0
        for s in samples:
            validate(s)
            assert len(s.phrases) == 1 and not any(s.meta["explained"])
            assert s.meta["query_type"] in ("sentence", "phrase")


def test_flag_skipped_and_ignore_shape_goes_to_the_ignore_rle(demo, tmp_path):
    build(str(demo), str(tmp_path / "out"), sources=["lisa_reasonseg"])
    _, samples, _ = read_split(tmp_path / "out", "train")
    src = annos(demo, "train")
    seen = set()
    for s in samples:
        shapes = src[s.meta["image"][:-4]]["shapes"]
        target = fill(next(x["points"] for x in shapes if x["label"] == "target"))
        got = masks.decode(s.masks[0].rle).astype(bool)
        ignores = [x for x in shapes if x["label"] == "ignore"]
        if ignores:  # smaller than the target, so painted after it: its pixels leave the target
            ign = fill(ignores[0]["points"])
            np.testing.assert_array_equal(masks.decode(s.ignore).astype(bool), ign)
            np.testing.assert_array_equal(got, target & ~ign)
            seen.add("ignore")
        else:
            assert s.ignore is None
            np.testing.assert_array_equal(got, target)  # a flag shape adds nothing
        if any(x["label"] == "flag" for x in shapes):
            assert s.meta["shapes"]["flag"] == 1
            seen.add("flag")
    assert seen == {"ignore", "flag"}


def test_shapes_are_painted_largest_first(root, tmp_path):
    # file order small-target-then-big-ignore: painting in file order would leave no target at all
    add_image(
        root,
        "val",
        "zz_nested",
        {
            "text": ["the thing"],
            "is_sentence": False,
            "shapes": [shape("target", SMALL), shape("ignore", BOX)],
        },
    )
    build(str(root), str(tmp_path / "out"), sources=["lisa_reasonseg"], splits=["val"])
    _, samples, _ = read_split(tmp_path / "out", "val")
    (s,) = [s for s in samples if s.key.startswith("lisa_reasonseg/val/zz_nested")]
    small, big = fill(SMALL), fill(BOX)
    np.testing.assert_array_equal(masks.decode(s.masks[0].rle).astype(bool), small)
    np.testing.assert_array_equal(masks.decode(s.ignore).astype(bool), big & ~small)


def test_explanations_are_chosen_per_turn_with_the_sample_rng(root, tmp_path):
    questions = [f"what is object number {i}?" for i in range(24)]
    add_image(
        root, "train", "many", {"text": questions, "is_sentence": True, "shapes": [shape("target", BOX)]}
    )
    expl = json.loads((root / LISA / "explanatory/train.json").read_text())
    expl.append({"image": "many.jpg", "query": questions[0], "outputs": "Because  it is\nthe one."})
    (root / LISA / "explanatory/train.json").write_text(json.dumps(expl))
    explained = {e["image"] for e in expl}

    def run(out: str, seed: int = 0):
        build(str(root), str(tmp_path / out), sources=["lisa_reasonseg"], options=BuildOptions(seed=seed))
        return {s.key: s for s in read_split(tmp_path / out, "train")[1]}

    a, b, c = run("a"), run("b"), run("c", seed=1)
    many = a["lisa_reasonseg/train/many"]
    flags = many.meta["explained"]
    assert 0 < sum(flags) < len(flags)  # an independent draw per turn, not one per sample
    answers = [t.text for t in many.conversation if t.role == "assistant"]
    for flag, q, ans in zip(
        flags, [t.text for t in many.conversation if t.role == "user"], answers, strict=True
    ):
        assert ans.startswith("Because it is the one. ") == flag
        bodies = [x.split("{sent}")[1] for x in templates.REASEG_EXPLAIN_QUESTIONS]
        assert any(q.endswith(body) for body in bodies) == flag
    assert {k: s.conversation for k, s in a.items()} == {k: s.conversation for k, s in b.items()}
    assert c["lisa_reasonseg/train/many"].meta["explained"] != flags
    for s in a.values():  # images without an explanation never ask for one
        if s.meta["image"] not in explained:
            assert not any(s.meta["explained"])


def test_json_in_cp1252_and_sizes_from_the_image_header(root, tmp_path):
    add_image(
        root,
        "test",
        "cp",
        {"text": ["the café sign"], "is_sentence": False, "shapes": [shape("target", BOX)]},
    )
    p = root / LISA / "test" / "cp.json"
    p.write_bytes(p.read_text().replace("\\u00e9", "é").encode("cp1252"))
    build(str(root), str(tmp_path / "out"), sources=["lisa_reasonseg"], splits=["test"])
    _, samples, _ = read_split(tmp_path / "out", "test")
    (s,) = [s for s in samples if s.meta["image"] == "cp.jpg"]
    assert s.phrases == ["the café sign"] and (s.image.height, s.image.width) == (240, 320)


# ----------------------------------------------------------------------------- bad input
def test_polygon_with_fewer_than_3_points_is_dropped(root, tmp_path):
    add_image(
        root,
        "val",
        "two_points",
        {
            "text": ["a"],
            "is_sentence": False,
            "shapes": [shape("target", BOX), shape("target", [[1, 1], [9, 9]])],
        },
    )
    add_image(
        root,
        "val",
        "only_two",
        {"text": ["b"], "is_sentence": False, "shapes": [shape("target", [[1, 1], [9, 9]])]},
    )
    build(str(root), str(tmp_path / "out"), sources=["lisa_reasonseg"], splits=["val"])
    manifest, samples, skipped = read_split(tmp_path / "out", "val")
    assert manifest["dropped"] == {"bad_polygon": 2}
    assert manifest["skipped"] == {"empty_mask": 1}  # the image whose only shape was that polygon
    assert {r["key"] for r in skipped if r["reason"] == "bad_polygon"} == {
        "lisa_reasonseg/val/two_points_q000/shape_1",
        "lisa_reasonseg/val/only_two_q000/shape_0",
    }
    assert any(s.meta["image"] == "two_points.jpg" for s in samples)
    with pytest.raises(StrictModeError, match="bad_polygon"):
        build(
            str(root),
            str(tmp_path / "strict"),
            sources=["lisa_reasonseg"],
            splits=["val"],
            options=BuildOptions(strict=True),
        )


def test_image_whose_mask_is_empty_is_skipped(root, tmp_path):
    add_image(
        root,
        "train",
        "nothing",
        {"text": ["where?"], "is_sentence": False, "shapes": [shape("ignore", BOX), shape("flag", SMALL)]},
    )
    build(str(root), str(tmp_path / "out"), sources=["lisa_reasonseg"])
    manifest, samples, skipped = read_split(tmp_path / "out", "train")
    assert manifest["skipped"] == {"empty_mask": 1}
    assert [r["key"] for r in skipped] == ["lisa_reasonseg/train/nothing"]
    assert manifest["counts"]["records_in"] == len(samples) + 1
    with pytest.raises(StrictModeError, match="empty_mask"):
        build(
            str(root), str(tmp_path / "strict"), sources=["lisa_reasonseg"], options=BuildOptions(strict=True)
        )


def test_missing_image_or_json_and_malformed_json_are_skipped(root, tmp_path):
    d = root / LISA / "test"
    (d / "orphan.json").write_text(json.dumps({"text": ["x"], "shapes": [shape("target", BOX)]}))
    (d / "lonely.jpg").write_bytes(next(d.glob("*.jpg")).read_bytes())
    add_image(root, "test", "broken", {})
    (d / "broken.json").write_text("{not json")
    build(str(root), str(tmp_path / "out"), sources=["lisa_reasonseg"], splits=["test"])
    manifest, _, _ = read_split(tmp_path / "out", "test")
    assert manifest["skipped"] == {"missing_image": 1, "missing_annotation": 1, "malformed_json": 1}


def test_the_explanation_is_stored_so_a_plain_stored_rendering_still_draws_it(demo, tmp_path):
    """An image whose stored (use 0) rendering explained no turn re-draws its explanation in about half of its
    turns over later uses: the converter keeps it in ``meta["explanation"]`` (before, it was only recoverable
    from an explained stored turn, so such an image never saw it again)."""
    from pipelines.loader.redraw import reaseg_counts, redraw

    expl = {e["image"]: " ".join(e["outputs"].split()) for e in json.loads((demo / LISA / EXPL).read_text())}
    plain = None
    for seed in range(40):  # a build whose stored rendering of an explained image drew "plain" on every turn
        _, samples, _ = data.build_and_read(
            demo, tmp_path / f"s{seed}", "lisa_reasonseg", with_images=False, seed=seed
        )
        for s in samples:
            assert s.meta.get("explanation") == expl.get(s.meta["image"])  # absent when there is none
            if s.meta.get("explanation") and not any(s.meta["explained"]):
                plain = s
        if plain:
            break
    assert plain is not None and len(plain.phrases) > 1

    def count(sample) -> tuple[int, int]:
        totals = {"reaseg_turns": 0, "reaseg_explained_turns": 0, "reaseg_unexplained_samples": 0}
        for use in range(1, 201):
            r = redraw(sample, 0, use)
            for k, v in reaseg_counts(r).items():
                totals[k] += v
            answers = [t.text for t in r.conversation if t.role == "assistant"]
            assert [a.startswith(plain.meta["explanation"]) for a in answers] == r.meta["explained"]
        return totals

    totals = count(plain)
    assert totals == count(plain)  # a pure function of (seed, key, use)
    assert totals["reaseg_turns"] == 200 * len(plain.phrases) and totals["reaseg_unexplained_samples"] == 0
    assert 0.4 < totals["reaseg_explained_turns"] / totals["reaseg_turns"] < 0.6
    # what a shard written before the explanation was stored gives: never again, counted
    old = replace(plain, meta={k: v for k, v in plain.meta.items() if k != "explanation"})
    assert count(old)["reaseg_explained_turns"] == 0 and count(old)["reaseg_unexplained_samples"] == 200


def test_paper_preset_skips_train_images_without_an_explanation(demo, tmp_path):
    kept = data.build_and_read(demo, tmp_path / "d", "lisa_reasonseg", with_images=False)
    paper = data.build_and_read(demo, tmp_path / "p", "lisa_reasonseg", with_images=False, preset="paper")
    (m_keep, s_keep, _), (m_paper, s_paper, skipped) = kept, paper
    explained = {e["image"] for e in json.loads((demo / LISA / EXPL).read_text())}
    assert {s.meta["image"] for s in s_paper} == {s.meta["image"] for s in s_keep} & explained
    assert len(s_paper) == len(s_keep) - 1 and m_paper["skipped"] == {"no_explanation": 1}
    assert [r["reason"] for r in skipped] == ["no_explanation"] and "no_explanation" not in m_keep["skipped"]
    # an eval split is never filtered; strict mode does not stop on this deliberate filter
    _, val, _ = data.build_and_read(demo, tmp_path / "v", "lisa_reasonseg", "val", preset="paper")
    assert val
    data.build_and_read(demo, tmp_path / "strict", "lisa_reasonseg", preset="paper", strict=True)
