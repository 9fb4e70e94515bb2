"""Dataset cards: prose for every source, numbers equal to the manifests', byte-identical
regeneration, valid Hugging Face front matter, "not built" cards, and the committed example cards."""

from __future__ import annotations

import glob
import json
import re
import shutil
from importlib import resources
from pathlib import Path

import pytest
import yaml

from pipelines.build.driver import build
from pipelines.inspect import cards
from pipelines.inspect.hf import FEATURES_YAML
from pipelines.sources import SOURCES
from tests.support.data import manifest

REPO = Path(__file__).resolve().parents[2]
# docs/contracts.md#source-names-and-tasks: every source of the product, registered yet or not
DESIGN_SOURCES = (
    "coco_panoptic",
    "coco_instance",
    "refcoco",
    "refcoco+",
    "refcocog",
    "grefcoco",
    "lisa_reasonseg",
    "grandf_gcg",
    "psg_gcg",
    "refcocog_gcg",
    "flickr_gcg",
    "ade20k_panoptic",
    "ade20k_semantic",
    "ade20k_instance",
    "lvis",
    "coco_vgd",
    "coco_interactive",
    "llava_pretrain",
    "llava_instruct",
)
COCO = ("coco_panoptic", "coco_instance")
COCO_ANN = "img_genseg/coco2017/annotations"


@pytest.fixture(scope="module")
def coco_build(demo_root, tmp_path_factory) -> Path:
    """COCO demo data with bad inputs (a missing image, an unknown category), built train+val."""
    root = tmp_path_factory.mktemp("cards") / "datas"
    shutil.copytree(demo_root / "img_genseg", root / "img_genseg", symlinks=True)
    (root / "img_genseg/coco2017/train2017/000000000016.jpg").unlink()  # -> missing_image (both sources)
    inst = root / COCO_ANN / "instances_train2017.json"
    data = json.loads(inst.read_text())
    data["annotations"][0]["category_id"] = 4242  # -> dropped unknown_category
    inst.write_text(json.dumps(data))
    out = root.parent / "shards"
    build(str(root), str(out), sources=list(COCO), splits=["train", "val"])
    return out


def front_matter(card: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", card, flags=re.S)
    assert m, "card does not start with YAML front matter"
    return yaml.safe_load(m.group(1))


def section(card: str, title: str) -> str:
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", card, flags=re.S | re.M)
    assert m, f"no section {title!r}"
    return m.group(1)


def skip_section(card: str) -> str | None:
    """The skipped-by-reason section, or None for a card with nothing built."""
    return section(card, "Skipped records by reason") if "### Skipped records by reason" in card else None


def table_rows(text: str) -> dict[str, list[str]]:
    """First markdown table in ``text``: first cell -> the other cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def num(cell: str) -> int:
    return int(cell.replace(",", ""))


# ---------------------------------------------------------------- prose
def test_every_registered_and_design_source_has_prose():
    names = set(cards.card_text_names())
    missing = sorted((set(SOURCES) | set(DESIGN_SOURCES)) - names)
    assert not missing, f"no pipelines/inspect/card_texts/<source>.md for {missing}"
    for name in sorted(set(SOURCES) | set(DESIGN_SOURCES)):
        text = cards.load_card_text(name)  # raises on a missing section or header field
        if name in SOURCES:
            assert text.meta["task"] == SOURCES[name].task, f"{name}: card text says task {text.meta['task']}"
        assert len(text.body) > 1500, f"{name}: prose too thin"


def test_malformed_card_texts_are_refused():
    raw = (resources.files(cards.CARD_TEXTS_PACKAGE) / "coco_panoptic.md").read_text()
    assert cards.parse_card_text("x", raw, "x").meta["task"] == "genseg"
    with pytest.raises(cards.CardTextError, match="Known pitfalls"):
        cards.parse_card_text("x", raw.replace("## Known pitfalls", "## Other"), "x")
    with pytest.raises(cards.CardTextError, match="license"):
        cards.parse_card_text("x", raw.replace("\nlicense: cc-by-4.0", ""), "x")
    with pytest.raises(cards.CardTextError, match="YAML header"):
        cards.parse_card_text("x", raw.split("---\n", 2)[2], "x")
    with pytest.raises(cards.CardTextError, match="no card text"):
        cards.load_card_text("no_such_source")


# ---------------------------------------------------------------- numbers
def test_card_numbers_equal_the_manifests(coco_build):
    rendered = cards.render_cards(str(coco_build), sources=COCO)
    for source in COCO:
        card = rendered[source]
        rows = table_rows(section(card, "Build numbers"))
        total_samples = 0
        for split in ("train", "val"):
            m = manifest(coco_build, source, split)
            row = dict(zip([c for c, _ in cards.NUMBER_COLUMNS], rows[split], strict=True))
            assert num(row["samples"]) == m["counts"]["samples"]
            assert num(row["records in"]) == m["counts"]["records_in"]
            assert num(row["skipped"]) == m["counts"]["skipped"] == sum(m["skipped"].values())
            assert num(row["dropped annotations"]) == m["counts"]["dropped_annotations"]
            assert num(row["shards"]) == len(m["shards"])
            assert num(row["bytes"]) == sum(s["bytes"] for s in m["shards"])
            assert num(row["masks"]) == m["counts"]["masks"]
            assert num(row["user turns"]) == m["counts"]["turns"]
            total_samples += m["counts"]["samples"]
        assert num(rows["**all built**"][0]) == total_samples
        # skips by reason, per split column
        skipped = table_rows(section(card, "Skipped records by reason"))
        m_train = manifest(coco_build, source, "train")
        assert m_train["skipped"] == {"missing_image": 1}
        assert {k.strip("`"): num(v[0]) for k, v in skipped.items() if k != "reason"} == m_train["skipped"]
        # categories: the distinct count and every listed row
        cat = section(card, "Categories")
        for split in ("train", "val"):
            counts = manifest(coco_build, source, split)["category_counts"]
            assert f"{split}: {len(counts)}" in cat
        cat_rows = table_rows(cat)
        for cid, cells in cat_rows.items():
            if cid == "category id":
                continue
            assert [num(c) for c in cells] == [
                manifest(coco_build, source, s)["category_counts"].get(cid, 0) for s in ("train", "val")
            ]
        assert front_matter(card)["size_categories"] == ["n<1K"]
    dropped = table_rows(section(rendered["coco_instance"], "Dropped annotations by reason"))
    assert (
        num(dropped["`unknown_category`"][0])
        == manifest(coco_build, "coco_instance", "train")["dropped"]["unknown_category"]
        == 1
    )


def test_cards_regenerate_byte_identically(coco_build, tmp_path):
    """Same manifests -> same bytes, also from another folder (no absolute path, clock or git hash leaks)."""
    a, b = tmp_path / "a", tmp_path / "b"
    cards.main(["--out", str(coco_build), "--cards-dir", str(a)])
    moved = tmp_path / "elsewhere" / "shards"
    shutil.copytree(coco_build, moved)
    for mpath in moved.glob("*/*/manifest.json"):  # as if built at another time, by another commit
        m = json.loads(mpath.read_text())
        m["wall_time_s"], m["code_version"] = 123.0, {"git": "deadbee", "package": "9"}
        mpath.write_text(json.dumps(m))
    cards.main(["--out", str(moved), "--cards-dir", str(b)])
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "coco_panoptic.md" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert str(coco_build) not in (a / "coco_panoptic.md").read_text()


def test_front_matter_is_a_valid_hf_card(coco_build):
    for source, card in cards.render_cards(str(coco_build), sources=COCO).items():
        fm = front_matter(card)
        assert fm["license"] == "cc-by-4.0"
        assert "image-segmentation" in fm["task_categories"]
        assert fm["source_datasets"] and fm["pretty_name"]
        assert (
            fm["dataset_info"]["features"] == FEATURES_YAML
        )  # explicit column types (pipelines/inspect/hf.py)
        (config,) = fm["configs"]
        assert [d["split"] for d in config["data_files"]] == ["train", "val"]
        for d in config["data_files"]:  # globs are relative to <out>/<source>/ and match the shards
            hits = sorted(Path(p).name for p in glob.glob(str(coco_build / source / d["path"])))
            assert hits == [s["file"] for s in manifest(coco_build, source, d["split"])["shards"]]


def test_not_built_cards_still_render(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    rendered = cards.render_cards(str(out))
    assert set(DESIGN_SOURCES) <= set(rendered)
    card = rendered["coco_panoptic"]
    rows = table_rows(section(card, "Build numbers"))
    assert rows["train"] == ["not built"] * len(cards.NUMBER_COLUMNS)
    assert "size_categories" not in front_matter(card)
    assert "Not built: no `manifest.json`" in card
    assert "## Known pitfalls" in card and "leakage" in card


def test_partly_built_source_lists_only_built_splits_in_configs(coco_build, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(coco_build / "coco_panoptic" / "train", out / "coco_panoptic" / "train")
    card = cards.render_cards(str(out), sources=["coco_panoptic"])["coco_panoptic"]
    assert [d["split"] for d in front_matter(card)["configs"][0]["data_files"]] == ["train"]
    assert table_rows(section(card, "Build numbers"))["val"][0] == "not built"


def test_note_and_readme(coco_build, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(coco_build, out)
    cards.main(
        ["--out", str(out), "--cards-dir", str(tmp_path / "c"), "--readme", "--note", "Nightly build."]
    )
    readme = (out / "coco_panoptic" / "README.md").read_text()
    assert readme == (tmp_path / "c" / "coco_panoptic.md").read_text()
    assert "> Nightly build." in readme
    assert not (out / "refcoco").exists()  # no README for sources that were not built


# ---------------------------------------------------------------- the committed example cards
def test_committed_cards_cover_every_source():
    committed = {p.stem for p in (REPO / "dataset_cards").glob("*.md")}
    missing = sorted((set(SOURCES) | set(DESIGN_SOURCES)) - committed)
    assert not missing, f"dataset_cards/ lacks {missing}: run `python -m pipelines.inspect.cards --demo`"
    for name in committed:
        text = (REPO / "dataset_cards" / f"{name}.md").read_text()
        assert cards.DEMO_NOTE in text, f"{name}: committed card does not say it comes from the demo build"
        front_matter(text)


def test_committed_cards_match_a_fresh_demo_build(demo_root, tmp_path):
    """The committed cards' counts are those of the demo build (byte counts and hashes may differ across
    image libraries, so only counts are compared). Fix: `python -m pipelines.inspect.cards --demo`."""
    shards = cards.build_demo(tmp_path, data_root=demo_root)
    fresh = cards.render_cards(str(shards), note=cards.DEMO_NOTE)
    count_cols = [i for i, (c, _) in enumerate(cards.NUMBER_COLUMNS) if c != "bytes"]
    stale = []
    for name, card in fresh.items():
        path = REPO / "dataset_cards" / f"{name}.md"
        if not path.exists():
            stale.append(name)
            continue
        old = table_rows(section(path.read_text(), "Build numbers"))
        new = table_rows(section(card, "Build numbers"))
        if {k: [v[i] for i in count_cols] for k, v in old.items()} != {
            k: [v[i] for i in count_cols] for k, v in new.items()
        }:
            stale.append(name)
        elif skip_section(path.read_text()) != skip_section(card):
            stale.append(name)
    assert not stale, (
        f"dataset_cards/ out of date for {stale}: run `python -m pipelines.inspect.cards --demo`"
    )
