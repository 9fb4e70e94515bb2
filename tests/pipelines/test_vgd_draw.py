"""VGD prompts at batch time: the converter's prompt pool, and the planner's draws.

The planner (:mod:`pipelines.loader.vgd_draw`) is tested here on hand-made pools, without tensors; the
processor and model side (frames, re-tokenization, features, a training step) are in
tests/model/test_vgd_batch.py.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from pipelines import masks
from pipelines.build.driver import build
from pipelines.demo_data import write_demo
from pipelines.errors import SampleError
from pipelines.loader.vgd_draw import COCO_THING_IDS, COUNTERS, FILLS, DrawOptions, VgdEntry, plan_batch
from pipelines.schema import ImageRef, PoolPrompt, Region, Sample, Turn, validate
from tests.support import data

ARCHIVE = DrawOptions()


def _full(h: int, w: int) -> dict:
    return masks.encode(np.ones((h, w), np.uint8))[0]


# ----------------------------------------------------------------------------- converter: the prompt pool
def test_train_samples_carry_every_instance_prompt_and_val_none(tmp_path):
    root = write_demo(tmp_path / "datas", families=["vgd"])
    out = tmp_path / "out"
    build(str(root), str(out), sources=["coco_vgd"], splits=["train", "val_box"])
    _, samples, _ = data.read_split(out, "coco_vgd", "train", with_images=False)
    kinds = Counter()
    for s in samples:
        validate(s)
        slots = s.meta["slot_category_ids"]
        by_ann = {p.ann_id: p for p in s.prompt_pool}
        assert {p.category_id for p in s.prompt_pool} == set(slots)  # every slot category has prompts
        assert set(by_ann) <= set(s.meta["ann_ids"]) and len(by_ann) == len(s.prompt_pool)
        for p in s.prompt_pool:
            kinds.update(p.prompts.keys())
            assert all(masks.area(r) > 0 for r in p.prompts.values())
        # the stored region (use 0) is one of the pool's prompts: same instance, same type, same bytes
        for r, aid in zip(s.regions, s.meta["prompt_ann_ids"], strict=True):
            assert by_ann[aid].prompts[r.type] == r.rle and by_ann[aid].category_id == slots[r.label]
    assert set(kinds) == {"point", "scribble", "box", "mask"}
    assert any(
        sum(p.category_id == c for p in s.prompt_pool) > 1
        for s in samples
        for c in set(s.meta["slot_category_ids"])
    )
    _, val, _ = data.read_split(out, "coco_vgd", "val_box", with_images=False)
    assert val and all(not s.prompt_pool for s in val)


def test_pool_is_omitted_from_json_when_empty_and_checked_when_present():
    s = _sample([PoolPrompt(18, 7, {"box": _full(4, 4)})])
    assert "prompt_pool" in json.loads(s.to_json())
    assert Sample.from_dict(json.loads(s.to_json())) == s
    bare = _sample([])
    assert "prompt_pool" not in json.loads(bare.to_json())  # other samples' bytes unchanged
    for bad, msg in (
        (PoolPrompt(18, 7, {"lasso": _full(4, 4)}), "unknown prompt type"),
        (PoolPrompt("18", 7, {"box": _full(4, 4)}), "not an int"),
        (PoolPrompt(18, 7, {"box": _full(5, 4)}), "RLE size"),
        (PoolPrompt(18, 7, {}), "no prompt"),
    ):
        with pytest.raises(SampleError, match=msg):
            validate(_sample([bad]))


def _sample(pool: list[PoolPrompt]) -> Sample:
    return Sample(
        key="coco_vgd/train/000000000001",
        source="coco_vgd",
        task="vgdseg",
        split="train",
        image=ImageRef("x.jpg", 4, 4),
        conversation=[Turn("user", "<image>\n<p><region></p>?"), Turn("assistant", "Sure, <SEG>.")],
        phrases=["<region>"],
        prompt_pool=pool,
        regions=[Region(0, "box", _full(4, 4))],
    )


# ----------------------------------------------------------------------------- the planner
def _rle(tag: str) -> dict:
    return {"size": [1, 1], "counts": tag}  # the planner never decodes: a unique tag per prompt will do


def _inst(key: str, cat: int, n: int, kinds=("point", "box", "mask", "scribble")) -> PoolPrompt:
    return PoolPrompt(cat, n, {k: _rle(f"{key}/{cat}/{n}/{k}") for k in kinds})


def _entries(use: int = 0) -> list[VgdEntry]:
    """Three images: A (18 twice, 1), B (3, 18), C (5). Category 18 is in two images."""
    return [
        VgdEntry("k/a", use, 0, [18, 1], [_inst("a", 18, 0), _inst("a", 18, 1), _inst("a", 1, 2)]),
        VgdEntry("k/b", use, 0, [3, 18], [_inst("b", 3, 0, ("box",)), _inst("b", 18, 1)]),
        VgdEntry("k/c", use, 0, [5], [_inst("c", 5, 0)]),
    ]


def test_cross_image_prompts_from_any_image_holding_the_category():
    src = Counter()
    for use in range(300):
        entries = _entries(use)
        plans, _ = plan_batch(entries, ARCHIVE)
        for i, plan in enumerate(plans):
            for p in plan.slots:
                if p.fill == "zero":  # a negative with nothing to show (tested below)
                    continue
                owner = entries[p.image]
                assert p.category_id in {q.category_id for q in owner.pool}  # prompt of that category...
                assert p.rle["counts"].startswith(f"{owner.key[-1]}/{p.category_id}/")  # ...from that image
                assert p.rle["counts"].endswith(p.type)
                if not p.negative:
                    src[(entries[i].key, p.category_id, p.image == i)] += 1
    # category 18 (3 instances: 2 in A, 1 in B) is drawn across images, ~uniform over instances
    assert 0.2 < src[("k/a", 18, False)] / 300 < 0.47 and 0.53 < src[("k/b", 18, False)] / 300 < 0.8
    assert src[("k/a", 1, False)] == 0 and src[("k/c", 5, False)] == 0  # only one image has them


def test_negatives_about_half_the_samples_filled_as_the_archive():
    """The archive's count (coin, then randint(0, 5) categories of the 80 absent from the image), each slot
    filled by another image's instance of its category, else of any absent category not yet shown, else
    zero features."""
    coin = any_neg = n = 0
    per_count, fills = Counter(), Counter()
    for use in range(400):
        entries = _entries(use)
        plans, counts = plan_batch(entries, ARCHIVE)
        for i, plan in enumerate(plans):
            n += 1
            coin += plan.coin
            negs = [p for p in plan.slots if p.negative]
            any_neg += bool(negs)
            per_count[len(negs)] += 1
            assert len(negs) == plan.requested * plan.coin  # every requested slot is filled
            own = set(entries[i].slots)
            shown = [p for p in negs if p.fill != "zero"]
            assert all(p.category_id not in own and p.image not in (i, -1) for p in shown)
            assert len({p.rle["counts"].rsplit("/", 1)[0] for p in shown}) == len(shown)  # instances once
            absent = {q.category_id for e in entries for q in e.pool} - own
            if len(shown) < len(negs):  # zeros only once every absent category of the batch is shown
                assert {p.category_id for p in shown} == absent
            assert all(p.image == -1 and p.rle is None for p in negs if p.fill == "zero")
            fills.update(p.fill for p in negs)
            # the positives keep their relative order; the negatives sit anywhere among them
            assert sorted(plan.label_map.values()) == [k for k, p in enumerate(plan.slots) if not p.negative]
            assert [
                plan.slots[plan.label_map[s]].category_id for s in range(len(entries[i].slots))
            ] == entries[i].slots
        assert counts["vgd_negatives"] == sum(p.negatives for p in plans)
        assert counts["vgd_negatives"] == sum(counts[f"vgd_negative_{f}"] for f in FILLS)
        assert counts["vgd_negative_no_candidate"] == 0
    assert 0.44 < coin / n < 0.56
    assert 0.36 < any_neg / n < 0.48  # coin x P(randint(0, 5) > 0) = 5/12
    assert max(per_count) == 5 and per_count[5] > 0
    # a drawn category is rarely one of the batch's (3 of 80): the absent-instance fallback does most
    assert fills["any_absent"] > 5 * fills["same_category"] > 0 and fills["zero"] > 0


def test_negatives_when_every_image_shares_every_category():
    """A micro-batch whose images share all their categories: the old cap gave no negative at all; the
    archive still adds them, with zero features (no absent-category instance in the batch)."""

    def batch(use: int) -> list[VgdEntry]:
        keys = ("a", "b", "c", "d")
        return [VgdEntry(f"k/{k}", use, 0, [18, 1], [_inst(k, 18, 0), _inst(k, 1, 1)]) for k in keys]

    def run() -> tuple[list, Counter]:
        slots, totals = [], Counter()
        for use in range(300):
            plans, counts = plan_batch(batch(use), ARCHIVE)
            slots.append([[(p.category_id, p.image, p.fill) for p in x.slots] for x in plans])
            totals.update(counts)
        return slots, totals

    slots, totals = run()
    assert run() == (slots, totals)  # deterministic
    with_neg = sum(any(f for _, _, f in s) for b in slots for s in b)
    assert 0.37 < with_neg / 1200 < 0.47  # 0.5 x 5/6
    assert totals["vgd_negatives"] == totals["vgd_negative_zero"] > 0
    assert totals["vgd_negative_same_category"] == totals["vgd_negative_any_absent"] == 0
    assert totals["vgd_negatives"] / totals["vgd_negative_coin"] == pytest.approx(2.5, abs=0.3)


def test_negative_fallback_order():
    """Slot category in the batch: its instance; else another absent category's instance; else zeros."""
    x = VgdEntry("k/x", 0, 0, [1], [_inst("x", 1, 0)])
    y = VgdEntry("k/y", 0, 0, [1, 2], [_inst("y", 1, 0), _inst("y", 2, 1), _inst("y", 2, 2)])
    small = DrawOptions(vocabulary=(1, 2, 3))
    fills = Counter()
    for use in range(300):
        x.use = y.use = use
        plans, _ = plan_batch([x, y], small)
        p = plans[0]
        negs = [s for s in p.slots if s.negative]
        assert len(negs) == min(p.requested, 2) * p.coin  # the vocabulary's absent categories: 2 and 3
        assert p.counts["vgd_negative_no_candidate"] == max(p.requested - 2, 0) * p.coin
        for s in negs:
            fills[s.fill] += 1
            if s.fill != "zero":
                assert s.category_id == 2 and s.image == 1
        # both drawn, filled in slot order: 2 first takes a 2, then 3 finds 2 shown and gets zeros; 3 first
        # takes a 2 (absent, not yet shown), then 2 still takes y's other 2
        if len(negs) == 2:
            assert [s.fill for s in negs] in (["same_category", "zero"], ["any_absent", "same_category"])
    assert fills["same_category"] > 0 and fills["any_absent"] > 0 and fills["zero"] > 0


def test_draws_are_a_function_of_the_batch_content_only():
    entries = _entries(7)
    plans, counts = plan_batch(entries, ARCHIVE)
    order = [2, 0, 1]
    shuffled = [entries[i] for i in order]
    plans2, counts2 = plan_batch(shuffled, ARCHIVE)
    for j, i in enumerate(order):  # the same sample gets the same prompts wherever it sits in the batch
        a = [(p.category_id, p.rle["counts"], p.negative) for p in plans[i].slots]
        b = [(p.category_id, p.rle["counts"], p.negative) for p in plans2[j].slots]
        assert a == b
    assert counts == counts2
    again, _ = plan_batch(_entries(7), ARCHIVE)
    assert [[p.rle for p in x.slots] for x in again] == [[p.rle for p in x.slots] for x in plans]
    other = [plan_batch(_entries(u), ARCHIVE)[0] for u in range(8, 14)]
    assert any(
        [[p.rle for p in x.slots] for x in o] != [[p.rle for p in x.slots] for x in plans] for o in other
    )


def test_options_off_keep_the_stored_prompts():
    for use in range(50):
        entries = _entries(use)
        plans, counts = plan_batch(entries, DrawOptions(cross_image=False, negatives=False))
        for i, plan in enumerate(plans):
            assert [(p.stored, p.image, p.negative) for p in plan.slots] == [
                (s, i, False) for s in range(len(entries[i].slots))
            ]
        assert counts["vgd_negatives"] == counts["vgd_cross_image"] == counts["vgd_stored_fallback"] == 0
        # same-image positives with the paper's negatives
        plans, _ = plan_batch(entries, DrawOptions(cross_image=False))
        for i, plan in enumerate(plans):
            assert all(p.stored is not None and p.image == i for p in plan.slots if not p.negative)


def test_bad_input_is_counted_not_fatal():
    # a category with no prompt anywhere in the batch keeps the stored prompt
    lonely = VgdEntry("k/d", 0, 0, [7, 5], [_inst("d", 5, 0)])
    plans, counts = plan_batch([lonely, *_entries()[:2]], ARCHIVE)
    assert plans[0].slots[plans[0].label_map[0]].stored == 0 and counts["vgd_stored_fallback"] == 1
    # one image: no cross-image draw; its negatives have nothing to show, so zero features
    for use in range(40):
        plans, counts = plan_batch([_entries(use)[0]], ARCHIVE)
        assert counts["vgd_single_image_batch"] == 1
        assert all(p.image == (-1 if p.negative else 0) for p in plans[0].slots)
        assert counts["vgd_negative_zero"] == plans[0].negatives == plans[0].requested * plans[0].coin
    # a question whose slot list cannot be extended gets no negatives (counted when asked for)
    seen = 0
    for use in range(60):
        entries = _entries(use)
        entries[0].extendable = False
        plans, counts = plan_batch(entries, ARCHIVE)
        assert plans[0].negatives == 0
        seen += counts["vgd_negative_not_extendable"]
    assert seen > 0 and set(counts) == set(COUNTERS)


def test_released_train_pool_holds_the_released_prompts_as_given(tmp_path):
    root = write_demo(tmp_path / "datas", families=["vgd"])
    released = root / "img_vgdseg/coco_vgd/annotations/img_vgdseg_coco_val.json"
    out = tmp_path / "out"
    over = {"coco_vgd": {"annotations": str(released), "images": "img_vgdseg/coco_vgd/coco2017/val2017"}}
    build(str(root), str(out), sources=["coco_vgd"], overrides=over)  # the val file read as a train split
    manifest, samples, _ = data.read_split(out, "coco_vgd", "train", with_images=False)
    assert manifest["info"] == {"prompts": "released"} and samples
    given = {
        a["id"]: {k[: -len("_visual_prompt")]: v for k, v in a["visual_prompts"].items() if v}
        for e in json.loads(released.read_text())
        for a in e["annotations"]
    }
    for s in samples:
        for p in s.prompt_pool:
            assert p.prompts == {k: v for k, v in given[p.ann_id].items() if masks.area(v) > 0}
        by_ann = {p.ann_id: p for p in s.prompt_pool}
        for r, aid in zip(s.regions, s.meta["prompt_ann_ids"], strict=True):
            assert by_ann[aid].prompts[r.type] == r.rle


def test_the_default_vocabulary_is_cocos_80_thing_categories():
    from xsam_model.config import COCO_PANOPTIC_CATEGORY_IDS

    assert ARCHIVE.vocabulary == COCO_THING_IDS == COCO_PANOPTIC_CATEGORY_IDS[:80]
