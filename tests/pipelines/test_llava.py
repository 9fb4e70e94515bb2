"""llava_pretrain / llava_instruct: turns as X-SAM's img_chat_map_fn makes them, text-only policy, bad
records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines.build.driver import build
from pipelines.demo_data import write_demo
from pipelines.errors import SkipRecord, StrictModeError
from pipelines.schema import validate
from pipelines.sources.base import BuildOptions
from pipelines.sources.llava import chat_turns
from tests.support.data import read_split

INSTRUCT = "img_chat/llava/LLaVA-Instruct-150K/llava_v1_5_mix665k.json"


@pytest.fixture
def llava_root(tmp_path) -> Path:
    return write_demo(tmp_path / "datas", families=["llava"])


def msgs(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def test_turns_follow_x_sam_chat_map_fn():
    turns, counts = chat_turns(
        msgs(
            ("gpt", "hi"),
            ("human", "What is it?\n<image>"),
            ("gpt", "A cat."),
            ("human", "Colour?"),
            ("gpt", "Grey."),
            ("human", "unanswered"),
        ),
        True,
        "<image>",
    )
    assert [(t.role, t.text) for t in turns] == [
        ("user", "<image>What is it?"),
        ("assistant", "A cat."),
        ("user", "Colour?"),
        ("assistant", "Grey."),
    ]
    assert counts == {"leading_assistant_dropped": 1, "image_token_added": False, "unanswered_dropped": 1}
    # <image> in a later turn moves to the front of the first user turn; "<image>\n" keeps its newline
    turns, _ = chat_turns(
        msgs(("human", "Hello"), ("gpt", "Hi"), ("human", "<image> and now?"), ("gpt", "ok")),
        True,
        "<image>\n",
    )
    assert turns[0].text == "<image>\nHello" and turns[2].text == "and now?"
    # an image but no token: the token is added; consecutive messages of one role are joined
    turns, counts = chat_turns(msgs(("human", "a"), ("human", "b"), ("gpt", "c")), True, "<image>\n")
    assert [t.text for t in turns] == ["<image>\na\nb", "c"] and counts["image_token_added"]
    # a bare "<image>" question is a valid user turn
    assert chat_turns(msgs(("human", "<image>"), ("gpt", "a dog")), True, "<image>\n")[0][0].text == "<image>"


@pytest.mark.parametrize(
    "messages, has_image, reason",
    [
        (msgs(("human", "<image>q"), ("system", "x")), True, "unknown_role"),
        (msgs(("human", "<image>q"), ("gpt", "  ")), True, "empty_turn"),
        (msgs(("human", "<image>q"), ("gpt", None)), True, "empty_turn"),
        (msgs(("human", "<image>q <image>"), ("gpt", "a")), True, "multiple_image_tokens"),
        (msgs(("human", "<image>q"), ("gpt", "a")), False, "image_token_without_image"),
        (msgs(("human", "q"), ("gpt", "use <SEG> here")), True, "reserved_token_in_text"),
        (msgs(("gpt", "a")), True, "no_turns"),
        ([], True, "no_conversation"),
    ],
)
def test_bad_records_raise_skip_with_reason(messages, has_image, reason):
    with pytest.raises(SkipRecord) as e:
        chat_turns(messages, has_image, "<image>")
    assert e.value.reason == reason


def test_pretrain_and_instruct_build(llava_root, tmp_path):
    out = tmp_path / "out"
    build(
        str(llava_root),
        str(out),
        sources=["llava_pretrain", "llava_instruct"],
        options=BuildOptions(image_token="<image>"),
    )
    manifest, samples, _ = read_split(out, "llava_pretrain")
    assert len(samples) == 4
    for s, image in samples:
        validate(s)
        assert s.task == "chat" and not s.masks
        assert s.conversation[0].text.startswith(
            "<image>\n"
        )  # stage 2 keeps the newline whatever image_token says
        w, h = Image.open(llava_root / s.image.path).size
        assert (s.image.width, s.image.height) == (w, h) and image == (llava_root / s.image.path).read_bytes()
    manifest, samples, skipped = read_split(out, "llava_instruct")
    # the paper's default keeps the text-only record (position 2) as a Sample with no image
    assert manifest["skipped"] == {} and not skipped
    assert [s.key for s, _ in samples] == [
        f"llava_instruct/train/{i:09d}" for i in range(4)
    ]  # file positions
    assert samples[2][0].image is None and samples[2][1] is None
    assert "<image>" not in samples[2][0].conversation[0].text
    assert all(
        s.conversation[0].text.startswith("<image>") and not s.conversation[0].text.startswith("<image>\n")
        for s, _ in samples
        if s.image is not None
    )
    assert samples[3][0].meta["leading_assistant_dropped"] == 1


def test_text_only_records_can_be_left_out_as_main(llava_root, tmp_path):
    build(
        str(llava_root),
        str(tmp_path / "out"),
        sources=["llava_instruct"],
        options=BuildOptions(extra={"llava_keep_text_only": False}),
    )
    manifest, samples, skipped = read_split(tmp_path / "out", "llava_instruct")
    assert manifest["skipped"] == {"text_only": 1} and [r["key"] for r in skipped] == [
        "llava_instruct/train/000000002"
    ]
    assert len(samples) == 3 and all(s.image is not None for s, _ in samples)


def test_bad_records_are_skipped_in_the_manifest_and_fail_strict(llava_root, tmp_path):
    path = llava_root / INSTRUCT
    recs = json.loads(path.read_text())
    good = recs[0]
    bad = [
        {**good, "conversations": msgs(("human", "<image>q"), ("robot", "beep"))},
        {**good, "conversations": msgs(("human", "<image>q"), ("gpt", ""))},
        {
            **good,
            "conversations": msgs(
                ("human", "<image>q"), ("gpt", "a"), ("human", "<image>again"), ("gpt", "b")
            ),
        },
        {**good, "image": "coco/train2017/missing.jpg"},
    ]
    path.write_text(json.dumps(recs + bad))
    build(str(llava_root), str(tmp_path / "out"), sources=["llava_instruct"])
    manifest, samples, skipped = read_split(tmp_path / "out", "llava_instruct")
    assert manifest["skipped"] == {
        "unknown_role": 1,
        "empty_turn": 1,
        "multiple_image_tokens": 1,
        "missing_image": 1,
    }
    assert {r["key"] for r in skipped if r["reason"] == "unknown_role"} == {"llava_instruct/train/000000004"}
    assert len(samples) == 4
    with pytest.raises(StrictModeError, match="unknown_role"):
        build(
            str(llava_root),
            str(tmp_path / "strict"),
            sources=["llava_instruct"],
            options=BuildOptions(strict=True),
        )


def test_strict_does_not_stop_on_the_text_only_policy_filter(tmp_path):
    """Dropping text-only records is a deliberate filter (POLICY_REASONS): counted, but not a strict error."""
    import json as _json

    from pipelines.demo_data import write_demo

    root = write_demo(tmp_path / "datas", families=["llava"])
    options = BuildOptions(strict=True, extra={"llava_keep_text_only": False})
    build(str(root), str(tmp_path / "out"), sources=["llava_instruct"], options=options)
    manifest = _json.loads((tmp_path / "out/llava_instruct/train/manifest.json").read_text())
    assert manifest["skipped"].get("text_only", 0) >= 1
    assert manifest["counts"]["samples"] >= 1
