"""Generic-segmentation conversations (recipe §2.2), shared by COCO, ADE20K (ovseg) and LVIS.

One user turn listing category phrases as ``<p>name</p>``, one answer with one ``<SEG>``; every mask's label
is its category's position in that list.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from pipelines import masks, templates
from pipelines.schema import MaskTarget, Turn

_PAREN = re.compile(r"\([^)]*\)")


def clean_category_name(name: str) -> str:
    """X-SAM's ``_clean_cat_name`` + ``format_cat_name``: 'wall-other-merged' -> 'wall other'.

    Drops '-merged' and '-stuff', parenthesised parts and '.', turns '_' and '-' into spaces, lower-cases.
    """
    name = name.replace("-merged", "").replace("-stuff", "")
    name = _PAREN.sub("", name).replace(".", "")
    name = name.replace("_", " ").replace("-", " ")
    return " ".join(name.lower().split())


def paper_category_name(name: str) -> str:
    """The archive's ``tag_categories`` (the paper's prompts): 'wall-other-merged' -> 'wall'.

    Drops '-merged', '-other' and '-stuff', turns '-' into a space, lower-cases (whitespace collapsed, which
    changes no COCO or ADE20K name but keeps a stray trailing space out of a phrase).
    """
    name = name.replace("-merged", "").replace("-other", "").replace("-stuff", "").replace("-", " ")
    return " ".join(name.lower().split())


def category_namer(naming: str):
    """``paper`` -> :func:`paper_category_name`; ``main`` -> :func:`clean_category_name`."""
    return paper_category_name if naming == "paper" else clean_category_name


def prompt_categories(
    rng: random.Random, present: Sequence[int], all_ids: Sequence[int], num_class: int | None
) -> list[int]:
    """The category ids listed in the prompt, shuffled.

    ``num_class=None`` (paper default): every category. Otherwise X-SAM main's sampling: the present ones
    plus ``randint(0, max(num_class - |present|, 0))`` absent ones.
    """
    pos = sorted(set(present))
    if num_class is None:
        cats = list(all_ids)
    else:
        absent = sorted(set(all_ids) - set(pos))
        n_neg = min(len(absent), rng.randint(0, max(num_class - len(pos), 0)))
        cats = pos + rng.sample(absent, n_neg)
    rng.shuffle(cats)
    return cats


def genseg_conversation(rng: random.Random, phrases: Sequence[str], image_token: str) -> list[Turn]:
    question = templates.pick(rng, templates.GENSEG_QUESTIONS).format(cats=templates.join_tags(phrases))
    return [
        Turn("user", templates.with_image(question, image_token)),
        Turn("assistant", templates.pick(rng, templates.SEG_ANSWERS)),
    ]


def mask_targets(targets: Sequence[tuple[dict, int, object]], slot: dict[int, int]) -> list[MaskTarget]:
    """``(rle, category_id, source id)`` triples to MaskTargets labelled by each category's prompt slot."""
    return [
        MaskTarget(
            rle=r, label=slot[c], category_id=c, iscrowd=0, bbox=masks.bbox(r), area=float(masks.area(r))
        )
        for r, c, _ in targets
    ]
