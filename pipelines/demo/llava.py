"""Demo LLaVA: a few LLaVA-Pretrain captions and LLaVA-1.5 mix665k conversations over drawn scenes.

The instruct list has what the reader must handle: ``<image>`` at the end of a question, a multi-turn
record, a leading assistant message, an image in a sub-folder per origin dataset, and a text-only record.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipelines.demo.coco import THINGS
from pipelines.demo.draw import jpeg_bytes, make_scene

ROOT = "img_chat/llava"


def _image(rng: random.Random, path: Path, size: tuple[int, int]) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    things = rng.sample(list(THINGS), 2)
    arr, _ = make_scene(rng, size[0], size[1], things, ["sky-other-merged", "grass-merged"])
    path.write_bytes(jpeg_bytes(arr))
    return things


def write(root: Path, rng: random.Random, size: tuple[int, int] = (320, 240)) -> None:
    base = root / ROOT
    _write_pretrain(base, rng, size)
    _write_instruct(base, rng, size)


def _write_pretrain(base: Path, rng: random.Random, size: tuple[int, int]) -> None:
    pretrain = []
    for i in range(4):
        rel = f"00000/{i:09d}.jpg"
        a, b = _image(rng, base / "LLaVA-Pretrain/images" / rel, size)
        q = rng.choice(
            [
                "Give a brief description of the image.\n<image>",
                "<image>\nWrite a terse but informative summary of the picture.",
            ]
        )
        pretrain.append(
            {
                "id": f"{i:09d}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": q},
                    {"from": "gpt", "value": f"a {a} and a {b} under the sky"},
                ],
            }
        )
    (base / "LLaVA-Pretrain").mkdir(parents=True, exist_ok=True)
    (base / "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json").write_text(json.dumps(pretrain))


def _write_instruct(base: Path, rng: random.Random, size: tuple[int, int]) -> None:
    imgs = base / "llava_images"
    coco = "coco/train2017/000000000009.jpg"
    gqa = "gqa/images/2354786.jpg"
    vg = "vg/VG_100K/2316.jpg"
    a, b = _image(rng, imgs / coco, size)
    c, d = _image(rng, imgs / gqa, size)
    _image(rng, imgs / vg, size)
    instruct = [
        {
            "id": "000000000009",
            "image": coco,
            "conversations": [
                {"from": "human", "value": "What objects are in the image?\n<image>"},
                {"from": "gpt", "value": f"There is a {a} and a {b}."},
                {"from": "human", "value": f"Where is the {a}?"},
                {"from": "gpt", "value": "It stands on the grass, in front of the sky."},
            ],
        },
        {
            "id": "2354786",
            "image": gqa,
            "conversations": [
                {"from": "human", "value": f"<image>\nIs there a {c} in the picture? Answer with one word."},
                {"from": "gpt", "value": "Yes"},
            ],
        },
        {
            "id": "text-only-1",
            "conversations": [
                {"from": "human", "value": "Write a haiku about segmentation."},
                {
                    "from": "gpt",
                    "value": "Pixels find their names / masks fall like autumn leaves / every edge is known",
                },
            ],
        },
        {
            "id": "2316",
            "image": vg,
            "conversations": [
                {"from": "gpt", "value": "Hello! Ask me about the picture."},
                {"from": "human", "value": "Describe the colours.<image>"},
                {"from": "gpt", "value": "Blue sky above green grass, with brightly coloured shapes."},
            ],
        },
    ]
    (base / "LLaVA-Instruct-150K").mkdir(parents=True, exist_ok=True)
    (base / "LLaVA-Instruct-150K/llava_v1_5_mix665k.json").write_text(json.dumps(instruct))
