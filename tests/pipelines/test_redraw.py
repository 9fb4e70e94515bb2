"""Conversations re-drawn at load time (pipelines.loader.redraw)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipelines.build import mixture_weights
from pipelines.errors import LoaderError
from pipelines.inspect.cards import build_demo
from pipelines.loader import MixtureLoader
from pipelines.loader.redraw import lisa_explanation, redraw
from pipelines.schema import Turn, validate
from tests.support.data import read_split

USES = 60


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory, demo_root):
    """The demo build (with its mixture.json) and every train split: (shards, source -> Samples)."""
    shards = build_demo(tmp_path_factory.mktemp("redraw"), demo_root)
    mixture_weights.write(str(shards), mixture_weights.compute(str(shards)))
    out = {}
    for manifest in sorted(shards.glob("*/train/manifest.json")):
        source = manifest.parent.parent.name
        out[source] = read_split(shards, source, "train", with_images=False)[1]
    return shards, out


@pytest.fixture(scope="module")
def demo_samples(demo_build) -> dict:
    return demo_build[1]


def test_thousands_of_redraws_over_every_demo_source_pass_validate(demo_samples):
    draws = 0
    for source, samples in demo_samples.items():
        varied = 0
        for s in samples:
            assert redraw(s, 0, 0) is s  # use 0 is the stored rendering
            seen = set()
            for use in range(1, USES):
                r = redraw(s, 0, use)
                validate(r)
                assert r == redraw(s, 0, use)  # a pure function of (seed, key, use)
                seen.add(tuple(t.text for t in r.conversation))
                draws += 1
            varied += len(seen) > 1
        if samples[0].task not in ("chat", "intseg"):
            assert varied == len(samples), source  # every template-driven sample gets new wordings
    assert draws > 5000


def test_refseg_turn_order_is_redrawn_and_labels_follow(demo_samples):
    s = max(demo_samples["refcoco"], key=lambda s: len(s.phrases))
    assert len(s.phrases) > 1
    orders = set()
    for use in range(1, USES):
        r = redraw(s, 3, use)
        orders.add(tuple(r.phrases))
        for m in r.masks:  # a mask keeps its object: its phrase is the stored phrase of its old label
            old = next(o for o in s.masks if o.rle == m.rle)
            assert r.phrases[m.label] == s.phrases[old.label]
    assert len(orders) > 1


def test_lisa_explanation_coin_lands_near_one_half(demo_samples):
    turns = explained = 0
    for s in demo_samples["lisa_reasonseg"]:
        if not lisa_explanation(s):
            continue
        for use in range(1, 400):
            r = redraw(s, 0, use)
            turns += len(r.meta["explained"])
            explained += sum(r.meta["explained"])
            for t, e in zip(
                [t for t in r.conversation if t.role == "assistant"], r.meta["explained"], strict=True
            ):
                assert t.text.startswith(lisa_explanation(s)) == e
    assert turns > 500 and abs(explained / turns - 0.5) < 0.06


def test_a_redraw_that_cannot_be_done_names_source_and_key(demo_samples):
    s = demo_samples["grandf_gcg"][0]
    broken = replace(s, conversation=[s.conversation[0], Turn("assistant", "no suffix here")])
    with pytest.raises(LoaderError, match=f"grandf_gcg {s.key}"):
        redraw(broken, 0, 1)


def conversation_of(sample, image):
    return (sample.key, tuple(t.text for t in sample.conversation))


def test_loader_redraws_per_epoch_resumes_exactly_and_can_be_turned_off(demo_build):
    shards, samples = demo_build
    stored = {s.key: tuple(t.text for t in s.conversation) for ss in samples.values() for s in ss}
    # ungrouped: length grouping sorts on the re-drawn text, so on/off would order a group differently
    kw = {
        "stage": 3,
        "batch_size": 2,
        "seed": 5,
        "transform": conversation_of,
        "collate": list,
        "length_group": 1,
    }

    def take(loader, n):
        out = []
        for batch in loader:
            out.append(batch.data)
            if len(out) == n:
                return out

    run = take(MixtureLoader(str(shards), **kw), 120)
    off = take(MixtureLoader(str(shards), redraw_conversations=False, **kw), 120)
    assert [[k for k, _ in b] for b in run] == [[k for k, _ in b] for b in off]  # the same samples
    assert all(c == stored[k] for b in off for k, c in b)  # off: always the stored rendering
    firsts, later = set(), 0
    for b in run:
        for k, c in b:
            if k not in firsts:  # first use of a key in this run: its epoch 0, the stored rendering
                firsts.add(k)
                assert c == stored[k]
            else:
                later += c != stored[k]
    assert later > 0
    first = MixtureLoader(str(shards), **kw)
    take(first, 70)
    resumed = MixtureLoader(str(shards), **kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert take(resumed, 50) == run[70:]


def test_variant_prompt_coin_lands_near_half(demo_samples, monkeypatch):
    """With num_class = |present| the sub-sampled branch lists the positives only: it shows the 0.5 coin."""
    from pipelines.loader import redraw as redraw_mod

    s = demo_samples["coco_panoptic"][0]
    present = {s.phrases[m.label] for m in s.masks}
    assert len(present) < len(s.phrases)
    monkeypatch.setattr(redraw_mod, "VARIANT_NUM_CLASS", len(present))
    only_pos = sum(set(redraw(s, 9, use).phrases) == present for use in range(1, 1001))
    assert 0.44 < only_pos / 1000 < 0.56


def test_genseg_category_prompt_is_redrawn_as_use_variant_cat(demo_samples):
    s = demo_samples["coco_panoptic"][0]
    n, present = len(s.phrases), {s.phrases[m.label] for m in s.masks}
    full, orders, labels_ok = 0, set(), True
    uses = 400
    for use in range(1, uses + 1):
        r = redraw(s, 3, use)
        validate(r)
        assert present <= set(r.phrases) and set(r.phrases) <= set(s.phrases)  # positives always listed
        labels_ok &= all(
            r.phrases[m.label] == s.phrases[old.label] for m, old in zip(r.masks, s.masks, strict=True)
        )
        full += len(r.phrases) == n
        orders.add(tuple(r.phrases))
        assert all(f"<p>{p}</p>" in r.conversation[0].text for p in r.phrases)
    assert labels_ok and len(orders) == uses  # shuffled every use
    # half the uses list everything; the other half add randint(0, 10000 - |pos|) negatives: nearly all too
    assert full / uses > 0.9
    kept = redraw(s, 3, 1, variant_categories=False)
    assert kept.phrases == s.phrases
    val = replace(s, key=s.key.replace("/train/", "/val/"), split="val")
    assert redraw(val, 3, 1).phrases == s.phrases  # eval prompts are never re-chosen


def phrases_of(sample, image):
    return (sample.key, sample.task, tuple(sample.phrases))


def test_loader_variant_categories_switch(demo_build):
    """``MixtureLoader(variant_categories=False)`` keeps genseg's stored category list on every use; the
    default re-draws it (archive ``use_variant_cat``) from the second use on. Other tasks are unaffected."""
    shards, samples = demo_build
    stored = {s.key: tuple(s.phrases) for ss in samples.values() for s in ss}
    kw = {"stage": 3, "batch_size": 2, "seed": 5, "transform": phrases_of, "collate": list, "length_group": 1}

    def genseg(loader, n=150):
        out = []
        for i, batch in enumerate(loader):
            out += [(k, p) for k, task, p in batch.data if task == "genseg"]
            if i == n:
                return out

    on = genseg(MixtureLoader(str(shards), **kw))
    off = genseg(MixtureLoader(str(shards), variant_categories=False, **kw))
    assert [k for k, _ in on] == [k for k, _ in off] and len(off) > 10
    assert all(p == stored[k] for k, p in off)
    assert any(p != stored[k] for k, p in on)
    state = MixtureLoader(str(shards), **kw).state_dict()
    with pytest.raises(ValueError, match="variant_categories"):
        MixtureLoader(str(shards), variant_categories=False, **kw).load_state_dict(state)
