"""A genseg/ovseg set's category phrases: the one definition both the build (the phrases its samples list)
and the evaluation (the vocabulary prompt, docs/evaluation.md) use.

X-SAM's evaluation prompts name the categories as its eval datasets read them: COCO's names from the
annotation file through the archive's ``tag_categories`` ('wall-other-merged' -> 'wall'), ADE20K's from
Mask2Former's ``ade20k_panoptic_val.json`` (synonym lists such as 'road, route') through the same function,
ADE20K instance's 100 thing names as LISA's table has them. The build options ``coco_category_names`` and
``ade20k_category_names`` pick another naming; the manifest records them, so the evaluation of a set prompts
with the names its shards were built with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pipelines.build_options import SourceOptions
from pipelines.sources.ade20k import category_table
from pipelines.sources.genseg import category_namer


def naming(source: str, extra: Any) -> str:
    """The naming ``source``'s phrases use under the source options ``extra`` (a ``SourceOptions`` or the
    manifest's ``options.extra`` mapping, whose missing keys are the defaults)."""
    if isinstance(extra, Mapping):
        extra = SourceOptions.from_mapping(extra)
    if source == "ade20k_instance":
        return "lisa"  # X-SAM's instance names equal LISA's
    if source.startswith("ade20k_"):
        return extra.ade20k_category_names
    return extra.coco_category_names


def category_phrases(
    source: str, extra: Any, ids: Iterable[int], raw_names: Mapping[int, str] | None = None
) -> dict[int, str]:
    """``{category_id: phrase}`` of ``ids`` for ``source``: ADE20K's from the source's tables, COCO's from
    ``raw_names`` (the annotation file's ``name`` per id)."""
    how = naming(source, extra)
    if source.startswith("ade20k_"):
        table = category_table(tuple(ids), how)["category_names"]
        return {int(c): n for c, n in table.items()}
    if raw_names is None:
        raise ValueError(f"{source}: the annotation file's category names are needed")
    namer = category_namer(how)
    return {int(c): namer(raw_names[int(c)]) for c in ids}
