"""Hand-built Samples for every task (recipe §2 layouts) and tiny images; no data code involved."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipelines.masks import encode
from pipelines.schema import ImageRef, MaskTarget, Region, Sample, Turn, validate

H, W = 40, 56  # a non-square image, so resizing and padding are exercised


def image_bytes(seed: int = 0, h: int = H, w: int = W) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def box(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> dict:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return encode(m)[0]


def _sample(task: str, idx: int, turns: list[tuple[str, str]], phrases, masks, **kw) -> Sample:
    conv = []
    for q, a in turns:
        conv += [Turn("user", q), Turn("assistant", a)]
    s = Sample(
        key=f"src_{task}/train/{idx:04d}",
        source=f"src_{task}",
        task=task,
        split="train",
        image=ImageRef(path=f"img/{idx}.png", width=W, height=H),
        conversation=conv,
        phrases=phrases,
        masks=masks,
        **kw,
    )
    validate(s)
    return s


def make_samples() -> dict[str, Sample]:
    """One Sample per task, in the layouts of recipe §2 (``<image>\\n`` default)."""
    genseg = _sample(
        "genseg",
        1,
        [
            (
                "<image>\nCan you segment the image based on the following categories: <p>dog</p>, <p>wall other</p>, "
                "<p>person</p>? Please output the segmentation masks.",
                "Sure, <SEG>.",
            )
        ],
        ["dog", "wall other", "person"],
        [
            MaskTarget(rle=box(0, 20, 0, 20), label=0, category_id=18),
            MaskTarget(rle=box(20, 40, 0, 56), label=1, category_id=199),
            MaskTarget(rle=box(5, 15, 30, 50), label=2, category_id=1),
            MaskTarget(rle=box(0, 5, 40, 50), label=2, category_id=1),
        ],
    )
    refseg = _sample(
        "refseg",
        2,
        [
            ("<image>\nPlease segment <p>man on left</p> in this image.", "It is <SEG>."),
            (
                "Where is the <p>red car</p> in this picture? Please output the segmentation masks.",
                "Sure, <SEG>.",
            ),
        ],
        ["man on left", "red car"],
        [MaskTarget(rle=box(0, 30, 0, 20), label=0), MaskTarget(rle=box(10, 40, 30, 56), label=1)],
    )
    reaseg = _sample(
        "reaseg",
        3,
        [
            (
                "<image>\n<p>What can hold water here?</p> Please output the segmentation mask.",
                "It is <SEG>.",
            ),
            ("<p>Which object is the cup?</p> Please output the segmentation mask.", "And <SEG>."),
        ],
        ["What can hold water here?", "Which object is the cup?"],
        [MaskTarget(rle=box(8, 30, 8, 30), label=0), MaskTarget(rle=box(8, 30, 8, 30), label=1)],
        ignore=box(30, 40, 30, 56),
    )
    gcgseg = _sample(
        "gcgseg",
        4,
        [
            (
                "<image>\nPlease give a brief description of the image with interleaved segmentation masks.",
                "<p>a man</p>  in a red shirt is riding <p>a horse</p> . The segmentation mask is <SEG>.",
            )
        ],
        ["a man", "a horse"],
        [MaskTarget(rle=box(0, 20, 10, 30), label=0), MaskTarget(rle=box(15, 40, 5, 50), label=1)],
    )
    vgdseg = _sample(
        "vgdseg",
        5,
        [
            (
                "<image>\nCan you segment the image based on the following regions: <p><region></p>, <p><region></p>? "
                "Please output the corresponding segmentation mask.",
                "Sure, <SEG>.",
            )
        ],
        ["region 0", "region 1"],
        [
            MaskTarget(rle=box(0, 20, 0, 20), label=0, category_id=18),
            MaskTarget(rle=box(22, 38, 2, 18), label=0, category_id=18),
            MaskTarget(rle=box(5, 35, 30, 55), label=1, category_id=1),
        ],
        regions=[
            Region(label=0, type="box", rle=box(2, 18, 2, 18)),
            Region(label=1, type="point", rle=box(18, 22, 40, 44)),
        ],
    )
    chat = _sample(
        "chat",
        6,
        [
            ("<image>\nWhat is the color of the bus?", "The bus is yellow."),
            ("Describe the picture.", "There are two people here."),
        ],
        [],
        [],
    )
    return {
        "genseg": genseg,
        "refseg": refseg,
        "reaseg": reaseg,
        "gcgseg": gcgseg,
        "vgdseg": vgdseg,
        "chat": chat,
    }


def refseg_sample(idx: int, n_turns: int) -> Sample:
    """A refseg Sample with ``n_turns`` question/answer turns: phrase k, one ``<SEG>`` and one mask per
    turn."""
    names = ["man on left", "red car", "small dog", "tree behind", "white cup"]
    turns = []
    for k in range(n_turns):
        q = f"Please segment <p>{names[k]}</p> in this image."
        turns.append(("<image>\n" + q if k == 0 else q, "It is <SEG>."))
    boxes = [
        box(0, 30, 0, 20),
        box(10, 40, 30, 56),
        box(20, 40, 0, 25),
        box(0, 15, 20, 50),
        box(25, 40, 40, 56),
    ]
    masks = [MaskTarget(rle=boxes[k], label=k) for k in range(n_turns)]
    return _sample("refseg", idx, turns, names[:n_turns], masks)
