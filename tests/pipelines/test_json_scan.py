"""The one-pass scanner and the memory-bounded COCO-style index built on it, against plain ``json.load``."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import pytest

from pipelines.errors import Skip
from pipelines.sources.base import Shared
from pipelines.sources.readers import coco_index, json_scan
from pipelines.sources.readers.coco_index import (
    RawAnns,
    image_sort_id,
    iter_coco_records,
    read_categories,
    read_spans,
)
from pipelines.sources.readers.jsonstream import MalformedJSON

ODD_DOC = {
    "info": {"nested": {"deeper": [1, {"x": "}"}]}, "n": 3},
    "categories": [{"id": 1, "name": 'a } { [ ] " \\ ü'}, {"id": 2, "name": "b"}],
    "annotations": [
        {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[1.5, 2, 3, 4, 5, 6.25]]},
        {"segmentation": {"size": [4, 4], "counts": "0\\1[2]3"}, "category_id": 2, "image_id": 7, "id": 2},
        {"id": 3, "image_id": "str-id", "category_id": 1, "deep": {"a": {"b": {"c": [1, 2]}}}},
        {"id": 4.0, "image_id": 8, "category_id": None, "caption": 'quote " brace } bracket ]'},
        {"id": 5, "image_id": 99, "category_id": 1},
        {"id": 6, "image_id": 8.0, "category_id": 2},
    ],
    "scalars": [1, 2.5, "s", None, True, [1, [2]], {"k": "v"}],
    "empty": [],
    "number": 3,
    "images": [
        {"id": 8, "file_name": "b.jpg"},
        {"id": 7, "file_name": "a.jpg"},
        {"id": "str-id"},
        {"id": 7, "file_name": "dup.jpg"},
        {"file_name": "no id"},
    ],
}


def _write(tmp_path: Path, doc, indent=None, bom=False) -> str:
    p = tmp_path / f"doc-{indent}-{bom}.json"
    text = json.dumps(doc, indent=indent, ensure_ascii=False)
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return str(p)


@pytest.mark.parametrize("indent,bom", [(None, False), (2, False), (None, True)])
@pytest.mark.parametrize("block", [1, 5, 64, None])
def test_scanner_yields_every_array_element_like_json_load(tmp_path, indent, bom, block):
    path = _write(tmp_path, ODD_DOC, indent, bom)
    text = Path(path).read_bytes()
    got = defaultdict(list)
    for batch in json_scan.iter_arrays(
        path, patterns={"annotations": json_scan.ANNOTATION}, block_size=block
    ):
        assert len(batch.offsets) == len(batch.elements) and all(
            len(c) == len(batch.elements) for c in batch.captures
        )
        for j, (start, raw) in enumerate(zip(batch.offsets.tolist(), batch.elements, strict=True)):
            value = json.loads(raw)
            got[batch.key].append(value)
            assert text[start : start + len(raw)] == raw  # the offset is where the element is in the file
            if batch.key == "annotations" and batch.captures[1][j] is not None:  # captured ids agree
                aid, iid, cid = (c[j] for c in batch.captures)
                assert iid.decode() == json.dumps(value["image_id"])
                assert aid is None or int(aid) == value["id"]
                assert cid is None or int(cid) == value["category_id"]
    arrays = {k: v for k, v in ODD_DOC.items() if isinstance(v, list) and v}
    assert dict(got) == arrays


def test_scanner_keys_filter_and_categories(tmp_path):
    path = _write(tmp_path, ODD_DOC, 1)
    assert {b.key for b in json_scan.iter_arrays(path, keys=("images",))} == {"images"}
    assert read_categories(path) == ODD_DOC["categories"]


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"images": [{"id": 1}, {"id": 2}', "end of file"),
        ('{"images": [{"id": 1} {"id": 2}]}', "expected ','"),
        ('[{"id": 1}]', "expected '{'"),
        ('{"images": [{"id": 1}]', "end of file"),
        ('{"images": [{"id": "unterminated}]}', "end of file"),
    ],
)
def test_scanner_malformed_json_fails_with_the_file_named(tmp_path, text, match):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(MalformedJSON, match=match) as e:
        for _ in json_scan.iter_arrays(str(p), block_size=4):
            pass
    assert str(p) in str(e.value)


def _reference(doc: dict, prefix: str) -> tuple[list[dict], list[dict]]:
    """iter_coco_records' contract spelled out with json.load and dicts."""
    images, skips = {}, []
    for img in doc["images"]:
        iid = img.get("id")
        if iid is None:
            skips.append("bad_image_entry")
        elif iid in images:
            skips.append("duplicate_image_id")
        else:
            images[iid] = img
    anns = defaultdict(list)
    for a in doc["annotations"]:
        if a["image_id"] in images:
            anns[a["image_id"]].append(a)
        else:
            skips.append("annotation_without_image")
    records = [
        {"key": f"{prefix}/{image_sort_id(i)}", "image": images[i], "anns": anns[i]}
        for i in sorted(images, key=image_sort_id)
    ]
    return records, sorted(skips)


@pytest.mark.parametrize("indent", [None, 2])
def test_iter_coco_records_matches_a_plain_json_load_reference(tmp_path, monkeypatch, indent):
    monkeypatch.setattr(json_scan, "BLOCK_SIZE", 16)  # every element crosses a block boundary somewhere
    monkeypatch.setattr(coco_index, "IMAGE_BLOCK", 2)
    path = _write(tmp_path, ODD_DOC, indent)
    items = list(
        iter_coco_records(path, "s/train", lambda i: i, lambda a: a, categories=lambda c: {"n": len(c)})
    )
    records = [x for x in items if isinstance(x, dict)]
    skips = sorted(x.reason for x in items if isinstance(x, Skip))
    shared = [x.data for x in items if isinstance(x, Shared)]
    assert shared == [{"n": 2}]
    assert (records, skips) == _reference(ODD_DOC, "s/train")
    raw = [x for x in iter_coco_records(path, "s/train", lambda i: i, None, raw=True) if isinstance(x, dict)]
    for rec, ref in zip(raw, records, strict=True):
        anns = rec["anns"]
        assert isinstance(anns, RawAnns)
        texts = read_spans(path, list(zip(anns.offsets, anns.lengths, strict=True)))
        assert [json.loads(t) for t in texts] == ref["anns"]
        assert anns.ids == [a["id"] if type(a["id"]) is int else None for a in ref["anns"]]
        assert anns.category_ids == [a["category_id"] for a in ref["anns"]]


def test_iter_coco_records_never_loads_the_file_whole(tmp_path, monkeypatch):
    path = _write(tmp_path, ODD_DOC)

    def refuse(*a, **k):
        raise AssertionError("json.load of a whole annotation file")

    monkeypatch.setattr(json, "load", refuse)
    assert (
        sum(isinstance(x, dict) for x in iter_coco_records(path, "s/train", lambda i: i, None, raw=True)) == 3
    )


@pytest.mark.parametrize("indent", [None, 1])
@pytest.mark.parametrize("block", [256, 4096, None])
def test_scanner_runs_split_match_and_walk_paths_on_a_long_array(tmp_path, monkeypatch, indent, block):
    """Many elements, some nested deeper than the fast pattern and some with braces in strings, small read
    blocks and windows: every path of the scanner (window split, element-by-element, walker) is taken."""
    monkeypatch.setattr(json_scan, "_WINDOW", 1000)
    rng = random.Random(indent or 0)
    anns = []
    for i in range(400):
        a = {
            "id": i,
            "image_id": rng.choice([1, 2, "x"]),
            "category_id": rng.randint(1, 3),
            "segmentation": [[rng.uniform(0, 9) for _ in range(rng.randint(6, 30))]],
        }
        if i % 37 == 5:
            a["deep"] = {"a": {"b": {"c": [i]}}}
        if i % 41 == 7:
            a["caption"] = 'a "quoted" } { ] [ caption \\ with escapes'
        if i % 53 == 11:
            a["segmentation"] = {"size": [3, 3], "counts": "0[]3"}
        anns.append(a)
    doc = {"annotations": anns, "images": [{"id": 1}, {"id": 2}, {"id": "x"}], "categories": []}
    path = _write(tmp_path, doc, indent)
    got = []
    for batch in json_scan.iter_arrays(
        path, patterns={"annotations": json_scan.ANNOTATION}, block_size=block
    ):
        if batch.key == "annotations":
            got += [json.loads(raw) for raw in batch.elements]
    assert got == anns
    records = [x for x in iter_coco_records(path, "s/train", lambda i: i, None) if isinstance(x, dict)]
    assert [r["anns"] for r in records] == [[a for a in anns if a["image_id"] == i] for i in (1, 2, "x")]
