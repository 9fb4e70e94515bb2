"""schema.validate against broken Samples: each invariant of docs/contracts.md#sample violated once, each
caught with its own message (and the valid Sample of every task passes, so a failure below is the planted
defect)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pipelines.schema import TASKS, MaskTarget, Region, Sample, SampleError, from_wds, to_wds, validate
from tests.support.data import SAMPLE_H, SAMPLE_W, box_rle, task_sample


@pytest.mark.parametrize("task", TASKS)
def test_the_valid_sample_of_every_task_passes_and_round_trips(task):
    s = task_sample(task)
    validate(s)
    back, image = from_wds(to_wds(s, b"\xff\xd8\xff", "jpg"))
    assert back == s and image == b"\xff\xd8\xff"


def _say(turn: int, text: str) -> Callable[[Sample], None]:
    def edit(s: Sample) -> None:
        s.conversation[turn].text = text

    return edit


def _set(**fields) -> Callable[[Sample], None]:
    def edit(s: Sample) -> None:
        for k, v in fields.items():
            setattr(s, k, v)

    return edit


def _mask(i: int, **fields) -> Callable[[Sample], None]:
    def edit(s: Sample) -> None:
        for k, v in fields.items():
            setattr(s.masks[i], k, v)

    return edit


OTHER_SIZE = box_rle(0, 2, 0, 2, SAMPLE_H + 1, SAMPLE_W)

# name: (task of the valid Sample, the one edit that breaks it, the message validate must give)
BROKEN = {
    "key without the source/split prefix": ("genseg", _set(key="other/train/1"), "does not start with"),
    "key holding a dot": ("genseg", _set(key="src_genseg/train/a.b"), "without '.'"),
    "unknown task": ("genseg", _set(task="detect"), "unknown task 'detect'"),
    "empty conversation": ("genseg", _set(conversation=[]), "empty conversation"),
    "unknown role": ("chat", lambda s: setattr(s.conversation[0], "role", "system"), "unknown role 'system'"),
    "empty turn": ("chat", _say(1, "  "), "empty turn"),
    "unclosed <p>": ("genseg", _say(0, "<image>\nSegment <p>dog</p>, <p>sky."), "2 <p> but 1 </p>"),
    "nested <p> spans": ("genseg", _say(0, "<image>\n<p>dog <p>sky</p></p>"), "nested or unbalanced"),
    "</p> before <p>": ("genseg", _say(0, "<image>\n</p>dog<p>, <p>sky</p>"), "nested or unbalanced"),
    "<p> count != len(phrases)": ("genseg", _set(phrases=["dog"]), "2 <p> spans but 1 phrases"),
    "<image> without an image": ("chat", _set(image=None), "<image> in the conversation but no image"),
    "two <image> tokens": ("chat", _say(0, "<image><image>\nWhat?"), "2 <image> tokens; expected exactly 1"),
    "genseg without <SEG>": ("genseg", _say(1, "Sure."), "task genseg: 0 <SEG> tokens, expected 1 (one)"),
    "ovseg with two <SEG>": ("ovseg", _say(1, "<SEG> <SEG>"), "task ovseg: 2 <SEG> tokens, expected 1 (one)"),
    "gcgseg with two <SEG>": (
        "gcgseg",
        _say(1, "<p>A dog</p> on <p>grass</p>. <SEG><SEG>"),
        "task gcgseg: 2",
    ),
    "vgdseg without <SEG>": ("vgdseg", _say(1, "Sure."), "task vgdseg: 0 <SEG> tokens, expected 1 (one)"),
    "refseg turn without <SEG>": (
        "refseg",
        _say(3, "Sure."),
        "task refseg: 1 <SEG> tokens, expected 2 (per_turn)",
    ),
    "reaseg turn with two <SEG>": (
        "reaseg",
        _say(1, "<SEG> <SEG>"),
        "task reaseg: 2 <SEG> tokens, expected 1",
    ),
    "chat with a <SEG>": ("chat", _say(1, "A <SEG>."), "task chat: 1 <SEG> tokens, expected 0 (none)"),
    "<region> count != len(regions)": ("vgdseg", _set(regions=[]), "1 <region> slots but 0 regions"),
    "mask label >= len(phrases)": ("genseg", _mask(1, label=2), "mask 1: label 2 outside [-1, 2)"),
    "mask label < -1": ("genseg", _mask(0, label=-2), "mask 0: label -2 outside [-1, 2)"),
    "mask RLE size != image size": (
        "genseg",
        _mask(0, rle=OTHER_SIZE),
        "mask 0: RLE size [13, 16] != image size",
    ),
    "mask RLE not compressed": (
        "genseg",
        _mask(1, rle={"size": [12, 16], "counts": [192]}),
        "compressed str",
    ),
    "mask not an RLE": ("genseg", _mask(0, rle={"counts": "x"}), "mask 0: not an RLE dict"),
    "region of unknown type": (
        "intseg",
        lambda s: setattr(s.regions[0], "type", "lasso"),
        "region 0: unknown type 'lasso'",
    ),
    "region label outside phrases": (
        "vgdseg",
        lambda s: setattr(s.regions[0], "label", 1),
        "region 0: label 1 outside [0, 1)",
    ),
    "region RLE size != image size": (
        "intseg",
        lambda s: setattr(s.regions[0], "rle", OTHER_SIZE),
        "region 0: RLE size [13, 16] != image size",
    ),
    "ignore RLE size != image size": ("genseg", _set(ignore=OTHER_SIZE), "ignore: RLE size [13, 16]"),
    "chat with masks": (
        "chat",
        _set(masks=[MaskTarget(rle=box_rle(0, 2, 0, 2, SAMPLE_H, SAMPLE_W), label=-1)]),
        "chat samples carry no masks",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_invariant_is_caught_with_its_own_message(name):
    task, edit, message = BROKEN[name]
    s = task_sample(task)
    edit(s)
    with pytest.raises(SampleError) as e:
        validate(s)
    assert message in str(e.value), f"{name}: {e.value}"


def test_the_messages_are_distinct():
    """Distinct broken invariants say distinct things (the same check may catch two spellings of one
    defect)."""
    said = {}
    for name, (task, edit, _) in BROKEN.items():
        s = task_sample(task)
        edit(s)
        with pytest.raises(SampleError) as e:
            validate(s)
        said.setdefault(str(e.value), []).append(name)
    shared = {msg: names for msg, names in said.items() if len(names) > 1}
    assert shared == {"<p>/</p> spans are nested or unbalanced": ["nested <p> spans", "</p> before <p>"]}


def test_the_writer_refuses_an_invalid_sample():
    s = task_sample("refseg")
    s.regions = [Region(label=0, type="box", rle=box_rle(0, 2, 0, 2, SAMPLE_H, SAMPLE_W))]
    with pytest.raises(SampleError, match="0 <region> slots but 1 regions"):
        to_wds(s, None)
    with pytest.raises(SampleError, match="image extension 'gif'"):
        to_wds(task_sample("chat"), b"GIF89a", "gif")
    with pytest.raises(SampleError, match="schema version 2 is not 1"):
        Sample.from_dict({**task_sample("chat").to_dict(), "schema": 2})
