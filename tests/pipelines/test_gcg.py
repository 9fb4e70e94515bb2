"""GCG sources: span cleaning and shifting, overlaps, answer layout, masks, image-folder probe,
val/test, every bad input (skipped with a reason; an error under strict), round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines import masks
from pipelines.build.driver import build
from pipelines.demo.gcg import rle
from pipelines.demo_data import write_demo
from pipelines.errors import SkipRecord, StrictModeError
from pipelines.schema import validate
from pipelines.sources.base import BuildOptions
from pipelines.sources.gcg import (
    Caption,
    Grounding,
    find_occurrences,
    place,
    remove_overlaps,
    tag_caption,
)
from tests.support.data import build_and_read, edit_json

TRAIN = "img_gcgseg/grand_f/annotations/train"
VAL_TEST = "img_gcgseg/grand_f/annotations/val_test"
GRANDF = f"{TRAIN}/GranDf_HA_GCG_train.json"


@pytest.fixture
def gcg_root(tmp_path) -> Path:
    return write_demo(tmp_path / "datas", families=["gcg"])


run = build_and_read


def answer(sample) -> str:
    return sample.conversation[1].text


# ---------------------------------------------------------------------------------------------- span unit
# tests
def test_caption_cleaning_shifts_offsets():
    raw = '"A Red Dog sits on the grass."'
    cap = Caption.clean(raw)
    assert cap.text == "a red dog sits on the grass."
    assert (cap.to_clean(1), cap.to_clean(10)) == (0, 9)  # raw [1, 10) = 'A Red Dog'
    assert cap.to_clean(0) == 0 and cap.to_clean(len(raw)) == len(cap.text)  # the quotes clamp to the ends
    # X-SAM order: quotes first, then whitespace (quotes inside surrounding spaces stay)
    assert Caption.clean('  "x y z"  ').text == '"x y z"'
    assert Caption.clean('" x y z "').text == "x y z"


def test_lower_casing_that_changes_length_still_maps_spans():
    raw = "İzmir has a red dog."  # 'İ'.lower() is two characters
    cap = Caption.clean(raw)
    assert len(cap.text) == len(raw) + 1
    p = place(cap, Grounding("a red dog", [10, 19], None), 0, {})
    assert cap.text[p.start : p.end] == "a red dog" and p.start == 11


def test_place_checks_span_text_against_phrase():
    cap = Caption.clean('"A man rides a horse."')
    assert place(cap, Grounding("A Man", [1, 6], None), 0, {}).how == "shifted"
    # offsets counted on the already-stripped caption: accepted only because the text matches exactly
    p = place(cap, Grounding("a horse", [12, 19], None), 0, {})
    assert (p.how, cap.text[p.start : p.end]) == ("unshifted", "a horse")
    for g, reason in [
        (Grounding("a horse", [30, 37], None), "span_outside_caption"),
        (Grounding("a zebra", [1, 6], None), "phrase_not_in_caption"),
        (Grounding("a man", [3, 10], None), "span_text_mismatch"),
        (Grounding("a man", [5, 5], None), "empty_span"),
        (Grounding("a man", ["1", 6], None), "bad_span"),
        (Grounding('""', [1, 6], None), "empty_phrase"),
    ]:
        with pytest.raises(SkipRecord) as e:
            place(cap, g, 0, {})
        assert e.value.reason == reason


def test_find_prefers_whole_words_and_takes_the_kth_repeat():
    text = "the manager talks to the man and the man laughs."
    assert find_occurrences(text, "the man") == [(21, 28), (33, 40)]
    cap = Caption.clean(text)
    seen: dict = {}
    spans = [place(cap, Grounding("the man", None, None), i, seen) for i in range(3)]
    assert [(p.start, p.end) for p in spans] == [
        (21, 28),
        (33, 40),
        (33, 40),
    ]  # a 3rd repeat overlaps -> dropped


def test_overlap_rule_is_xsams_greedy_one():
    from pipelines.sources.gcg import Placed

    ps = [
        Placed(0, "a red dog", 0, 9),
        Placed(1, "red dog", 2, 9),
        Placed(2, "a cat", 14, 19),
        Placed(3, "dog", 9, 12),
        Placed(4, "a cat x", 14, 21),
    ]
    kept, dropped = remove_overlaps(ps)
    assert [p.index for p in kept] == [0, 2]
    # nested; touching (start == last end, as X-SAM's `start > end`); same start (input order wins)
    assert sorted(p.index for p in dropped) == [1, 3, 4]


def test_tag_caption_matches_the_recipe_literal():
    text = "a man in a red shirt is riding a horse"
    tagged = tag_caption(text, [(31, 38), (0, 5)], force_period=True)  # spans in any order
    assert f"{tagged} The segmentation mask is <SEG>." == (
        "<p>a man</p>  in a red shirt is riding <p>a horse</p> . The segmentation mask is <SEG>."
    )
    assert tag_caption(text, [(0, 5)]).endswith("riding a horse")  # paper default: no period forced


# ---------------------------------------------------------------------------------------------- round trips
def _check_common(sample, image, root: Path):
    validate(sample)
    assert image == (root / sample.image.path).read_bytes()
    a = answer(sample)
    assert a.count("<SEG>") == 1 and a.endswith("<SEG>.")
    cap = sample.meta["caption"]
    assert cap == cap.lower() and not cap.startswith('"')
    # phrases appear in the answer in order, each equal to its span's caption text, labels follow span order
    tags = [part.split("</p>")[0] for part in a.split("<p>")[1:]]
    assert tags == sample.phrases == [cap[s:e] for s, e in sample.meta["spans"]]
    assert [m.label for m in sample.masks if m.label >= 0] == list(range(len(sample.phrases)))
    starts = [s for s, _ in sample.meta["spans"]]
    assert starts == sorted(starts)
    for m in sample.masks:
        assert m.rle["size"] == [sample.image.height, sample.image.width] and m.area == masks.area(m.rle) > 0


def test_grandf_round_trip_masks_are_unions_of_the_phrase_rles(gcg_root, tmp_path):
    manifest, samples, skipped = run(gcg_root, tmp_path / "out", "grandf_gcg")
    records = json.loads((gcg_root / GRANDF).read_text())
    assert manifest["counts"]["samples"] == len(samples) == len(records) == 5
    assert manifest["dropped"] == {"overlapping_span": 3}  # the nested 'red …' phrase of records 0, 2 and 4
    assert {s["reason"] for s in skipped} == {"overlapping_span"}
    for (sample, image), rec in zip(samples, records, strict=True):
        _check_common(sample, image, gcg_root)
        by_phrase = {k.strip('"').lower(): v for k, v in rec["groundings"].items()}
        assert len(sample.phrases) == len(by_phrase) - (1 if sample.meta["num_groundings"] == 6 else 0)
        for m in sample.masks:
            want = np.zeros((sample.image.height, sample.image.width), np.uint8)
            for r in by_phrase[sample.phrases[m.label]]["rle_masks"]:
                want |= masks.decode(r)
            np.testing.assert_array_equal(masks.decode(m.rle), want)
    # overlap drops are the recipe, a filter of the error policy: --strict records them and goes on
    strict = run(gcg_root, tmp_path / "strict", "grandf_gcg", strict=True)
    assert strict[0]["dropped"] == manifest["dropped"] and strict[2] == skipped
    # record 2 splits its first phrase over two RLEs: the mask is their union, the whole drawn shape
    assert len(next(iter(records[2]["groundings"].values()))["rle_masks"]) == 2
    # record 0's caption is wrapped in quotes, its offsets count the quote: spans shifted by one
    first = next(iter(records[0]["groundings"].values()))["token_positives"]
    assert samples[0][0].meta["spans"][0] == [first[0] - 1, first[1] - 1]
    assert '"' not in answer(samples[0][0])
    # record 3 has no height/width: the size comes from the image header
    assert "height" not in records[3] and (samples[3][0].image.width, samples[3][0].image.height) == (
        320,
        240,
    )


def test_offsets_counted_on_the_stripped_caption_are_recovered(gcg_root, tmp_path):
    def unshift(recs):
        for g in recs[0]["groundings"].values():
            g["token_positives"] = [g["token_positives"][0] - 1, g["token_positives"][1] - 1]

    edit_json(gcg_root / GRANDF, unshift)
    _, samples, skipped = run(gcg_root, tmp_path / "out", "grandf_gcg")
    s = samples[0][0]
    assert s.meta["unshifted_spans"] == 5 and len(s.phrases) == 5
    assert not [x for x in skipped if x["key"].startswith(s.key) and x["reason"] != "overlapping_span"]


@pytest.mark.parametrize("source", ["psg_gcg", "refcocog_gcg", "flickr_gcg"])
def test_other_sources_round_trip(gcg_root, tmp_path, source):
    manifest, samples, skipped = run(gcg_root, tmp_path / "out", source)
    assert manifest["counts"]["samples"] == len(samples) == 3 and manifest["skipped"] == {}
    assert manifest["dropped"] == {"overlapping_span": 1}
    for sample, image in samples:
        _check_common(sample, image, gcg_root)
    if source == "refcocog_gcg":
        recs = [
            next(iter(r.values()))
            for r in json.loads((gcg_root / TRAIN / "RefCOCOg_GCG_train.json").read_text())
        ]
        for (sample, _), rec in zip(samples, recs, strict=True):
            polys = {r["sentence"].lower(): r["segmentation"] for r in rec["refs"]}
            for m in sample.masks:
                want = masks.polygons_to_rle(
                    polys[sample.phrases[m.label]], sample.image.height, sample.image.width
                )
                np.testing.assert_array_equal(masks.decode(m.rle), masks.decode(want))
    if source == "flickr_gcg":
        coco = json.loads((gcg_root / TRAIN / "flickr_mergedGT_GCG_train.json").read_text())
        by_ann = {a["id"]: a for a in coco["annotations"]}
        for sample, _ in samples:
            kept = [sample.meta["ann_ids"][i] for i in sample.meta["grounding_index"]]
            for m, aid in zip(sample.masks, kept, strict=True):
                np.testing.assert_array_equal(masks.decode(m.rle), masks.decode(by_ann[aid]["sam_mask"]))
        assert (samples[2][0].image.width, samples[2][0].image.height) == (240, 320)  # portrait kept upright


@pytest.mark.parametrize("split", ["val", "test"])
def test_grandf_val_test(gcg_root, tmp_path, split):
    manifest, samples, _ = run(gcg_root, tmp_path / "out", "grandf_gcg", split)
    gt = json.loads((gcg_root / VAL_TEST / f"{split}_gcg_coco_mask_gt.json").read_text())
    assert manifest["counts"]["samples"] == len(samples) == len(gt["images"]) == 2
    for sample, image in samples:
        _check_common(sample, image, gcg_root)
        iid = sample.meta["image_id"]
        assert isinstance(iid, str) and sample.image.path.endswith(f"GranDf_HA_images/val_test/{iid}.jpg")
        assert len(sample.masks) == sum(a["image_id"] == sample.meta["image_id"] for a in gt["annotations"])


def test_val_label_not_in_caption_keeps_its_mask_untagged(gcg_root, tmp_path):
    edit_json(
        gcg_root / VAL_TEST / "val_gcg_coco_caption_gt.json",
        lambda d: d["annotations"][0]["labels"].__setitem__(0, "a green elephant"),
    )
    manifest, samples, skipped = run(gcg_root, tmp_path / "out", "grandf_gcg", "val")
    s = samples[0][0]
    assert [m.label for m in s.masks].count(-1) == 1 and "a green elephant" not in s.phrases
    assert manifest["dropped"] == {"phrase_not_in_caption": 1}


def test_val_label_mask_count_mismatch_is_skipped(gcg_root, tmp_path):
    edit_json(
        gcg_root / VAL_TEST / "val_gcg_coco_caption_gt.json", lambda d: d["annotations"][0]["labels"].pop()
    )
    manifest, _, skipped = run(gcg_root, tmp_path / "out", "grandf_gcg", "val")
    assert manifest["skipped"] == {"label_mask_count_mismatch": 1}


# ---------------------------------------------------------------------------------------------- bad input
def _grandf_first(fn):
    def edit(recs):
        fn(recs[0])

    return edit


def _first_grounding(rec):
    return next(iter(rec["groundings"].values()))


BAD_INPUTS = {
    # name: (source, file, edit, reason, level)
    "span_outside_caption": (
        "grandf_gcg",
        GRANDF,
        _grandf_first(lambda r: _first_grounding(r).update(token_positives=[500, 509])),
        "span_outside_caption",
        "annotation",
    ),
    "phrase_absent": (
        "grandf_gcg",
        GRANDF,
        _grandf_first(
            lambda r: r["groundings"].update(
                {
                    "a green elephant": {
                        "token_positives": [1, 10],
                        "rle_masks": _first_grounding(r)["rle_masks"],
                    }
                }
            )
        ),
        "phrase_not_in_caption",
        "annotation",
    ),
    "rle_wrong_size": (
        "grandf_gcg",
        GRANDF,
        _grandf_first(lambda r: _first_grounding(r).update(rle_masks=[rle(np.ones((100, 100), bool))])),
        "rle_size_mismatch",
        "annotation",
    ),
    "caption_under_three_words": (  # the paper checks Flickr only; gcg_min_words_sources=all checks all four
        "grandf_gcg",
        GRANDF,
        _grandf_first(
            lambda r: r.update(
                caption="a dog",
                groundings={
                    "a dog": {"token_positives": [0, 5], "rle_masks": _first_grounding(r)["rle_masks"]}
                },
            )
        ),
        "short_caption",
        "record",
    ),
    "empty_groundings": (
        "grandf_gcg",
        GRANDF,
        _grandf_first(lambda r: r.update(groundings={})),
        "empty_groundings",
        "record",
    ),
    "no_phrase_placeable": (
        "grandf_gcg",
        GRANDF,
        _grandf_first(lambda r: [g.update(token_positives=[900, 905]) for g in r["groundings"].values()]),
        "no_grounded_phrase",
        "record",
    ),
    "special_token": (
        "grandf_gcg",
        GRANDF,
        _grandf_first(lambda r: r.update(caption=r["caption"] + " <SEG>")),
        "special_token_in_caption",
        "record",
    ),
    "refcocog_sentence_absent": (
        "refcocog_gcg",
        f"{TRAIN}/RefCOCOg_GCG_train.json",
        lambda d: next(iter(d[1].values()))["refs"][0].update(sentence="a flying saucer"),
        "phrase_not_in_caption",
        "annotation",
    ),
    "refcocog_bad_polygon": (
        "refcocog_gcg",
        f"{TRAIN}/RefCOCOg_GCG_train.json",
        lambda d: next(iter(d[1].values()))["refs"][0].update(segmentation=[[1, 2, 3, 4]]),
        "bad_polygon",
        "annotation",
    ),
    "flickr_span_outside": (
        "flickr_gcg",
        f"{TRAIN}/flickr_mergedGT_GCG_train.json",
        lambda d: d["annotations"][0].update(tokens_positive=[[-4, 3]]),
        "span_outside_caption",
        "annotation",
    ),
    "flickr_short_caption": (
        "flickr_gcg",
        f"{TRAIN}/flickr_mergedGT_GCG_train.json",
        lambda d: d["images"][0].update(caption="A  dog"),
        "short_caption",
        "record",
    ),
    "flickr_rle_wrong_size": (
        "flickr_gcg",
        f"{TRAIN}/flickr_mergedGT_GCG_train.json",
        lambda d: d["annotations"][0].update(sam_mask=rle(np.ones((240, 300), bool))),
        "rle_size_mismatch",
        "annotation",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_skipped_with_reason_and_fails_under_strict(gcg_root, tmp_path, name):
    source, rel, edit, reason, level = BAD_INPUTS[name]
    edit_json(gcg_root / rel, edit)
    opts = {"extra": {"gcg_min_words_sources": "all"}} if reason == "short_caption" else {}
    manifest, samples, skipped = run(gcg_root, tmp_path / "out", source, **opts)
    rows = [s for s in skipped if s["reason"] == reason]
    assert rows and all(r["level"] == level and r["detail"] for r in rows)
    table = manifest["skipped"] if level == "record" else manifest["dropped"]
    assert table[reason] == len(rows)
    assert manifest["counts"]["records_in"] == manifest["counts"]["samples"] + manifest["counts"]["skipped"]
    if level == "annotation":  # the rest of that record still became a Sample
        assert any(s.key == rows[0]["key"].rsplit("/", 1)[0] for s, _ in samples)
    first_problem = (
        "span_outside_caption" if name == "no_phrase_placeable" else reason
    )  # strict stops at the drop
    with pytest.raises(StrictModeError, match=first_problem):
        run(gcg_root, tmp_path / "strict", source, strict=True, **opts)


def test_bad_groundings_type_is_skipped(gcg_root, tmp_path):
    edit_json(gcg_root / GRANDF, _grandf_first(lambda r: r.update(groundings=["a red cat"])))
    manifest, _, _ = run(gcg_root, tmp_path / "out", "grandf_gcg")
    assert manifest["skipped"] == {"bad_groundings": 1}


# ---------------------------------------------------------------------------------------------- options,
# layout
def test_period_option_and_min_words(gcg_root, tmp_path):
    edit_json(gcg_root / GRANDF, _grandf_first(lambda r: r.update(caption=r["caption"].replace('."', '"'))))
    _, samples, _ = run(gcg_root, tmp_path / "a", "grandf_gcg")
    s = samples[0][0]
    assert not s.meta["caption"].endswith(".") and s.meta["caption"].endswith(s.phrases[-1])
    paper = tag_caption(s.meta["caption"], s.meta["spans"])
    assert paper.endswith("</p>") and answer(s).startswith(paper + " ")  # paper: no '.' added
    _, forced, _ = run(gcg_root, tmp_path / "b", "grandf_gcg", extra={"gcg_force_period": True})
    main = tag_caption(s.meta["caption"], s.meta["spans"], force_period=True)
    assert main.endswith("</p> .") and answer(forced[0][0]).startswith(main + " ")  # X-SAM main
    # the paper checks the word minimum on Flickr only; gcg_min_words_sources=all is the old behaviour
    manifest, _, _ = run(gcg_root, tmp_path / "c", "grandf_gcg", extra={"gcg_min_words": 50})
    assert "short_caption" not in manifest["skipped"]
    extra = {"gcg_min_words": 50, "gcg_min_words_sources": "all"}
    manifest, _, _ = run(gcg_root, tmp_path / "d", "grandf_gcg", extra=extra)
    assert manifest["skipped"] == {"short_caption": 5}
    manifest, _, _ = run(gcg_root, tmp_path / "e", "flickr_gcg", extra={"gcg_min_words": 50})
    assert manifest["skipped"].get("short_caption", 0) == manifest["counts"]["records_in"] > 0


def test_psg_image_folder_probe_records_the_layout(gcg_root, tmp_path):
    manifest, samples, _ = run(gcg_root, tmp_path / "glamm", "psg_gcg")
    assert manifest["dirs"]["images"].endswith("images/coco2017/train2017")
    assert manifest["info"]["image_dir_probe"]["hits"] == {
        "img_gcgseg/grand_f/images/coco2017": 0,
        "img_gcgseg/grand_f/images/coco2017/train2017": 3,
    }
    # X-SAM's layout: the files directly under coco2017/
    base = gcg_root / "img_gcgseg/grand_f/images/coco2017"
    for f in (base / "train2017").iterdir():
        shutil.move(str(f), base / f.name)
    manifest, samples2, _ = run(gcg_root, tmp_path / "xsam", "psg_gcg")
    assert manifest["dirs"]["images"].endswith("images/coco2017") and len(samples2) == len(samples) == 3
    assert [s.to_json() for s, _ in samples2] != [
        s.to_json() for s, _ in samples
    ]  # paths differ, nothing else
    assert [(s.phrases, answer(s)) for s, _ in samples2] == [(s.phrases, answer(s)) for s, _ in samples]


@pytest.mark.ray
def test_ray_build_matches_inline_build(gcg_root, tmp_path, ray_local):
    build(
        str(gcg_root),
        str(tmp_path / "ray"),
        sources=["grandf_gcg", "flickr_gcg"],
        splits=["train"],
        options=BuildOptions(samples_per_shard=2),
    )
    ray_local.shutdown()
    build(
        str(gcg_root),
        str(tmp_path / "inline"),
        sources=["grandf_gcg", "flickr_gcg"],
        splits=["train"],
        options=BuildOptions(samples_per_shard=2),
    )
    for src in ("grandf_gcg", "flickr_gcg"):
        tars = sorted((tmp_path / "ray" / src / "train").glob("*.tar"))
        assert len(tars) >= 2
        for t in tars:
            assert t.read_bytes() == (tmp_path / "inline" / src / "train" / t.name).read_bytes()
