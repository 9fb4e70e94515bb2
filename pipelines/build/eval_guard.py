"""The eval-leakage guard: RefCOCO/+/g and gRefCOCO eval images are left out of COCO training splits.

Those benchmarks' val/test images are COCO train2014 images, hence inside COCO train2017 (same image ids), so
a model co-trained on COCO panoptic/instances has seen every evaluation image (X-SAM, LISA and PSALM all carry
this; zamling/PSALM#16). Before converting anything, :func:`prepare` reads every refs file of every refer
source it finds under the data root and writes ``<out>/eval_images.json``; then the splits a source lists in
its ``eval_image_guard_splits`` attribute (coco_panoptic/coco_instance: ``("train",)``; coco_vgd may opt in
the same way) turn each record whose ``record["image"]["id"]`` is one of those ids into a skip with reason
:data:`REASON`, counted in the manifest like any other skip. ``BuildOptions.keep_eval_images`` (CLI
``--keep-eval-images``) turns the exclusion off; the file is written either way.

The file is an input of every guarded split (hashed into its manifest and resume fingerprint), so a change
of the eval set rebuilds exactly the shards it affects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from pipelines import storage
from pipelines.build_options import BuildOptions
from pipelines.errors import BuildConfigError, Skip
from pipelines.sources import SOURCES
from pipelines.sources.base import Shared, SourceFiles
from pipelines.sources.readers.coco_index import image_sort_id
from pipelines.sources.refer import ReferSource

logger = logging.getLogger(__name__)

REASON = "eval_image_leak"
FILE_NAME = "eval_images.json"


@dataclass(frozen=True)
class EvalGuard:
    path: str  # <out>/eval_images.json
    image_ids: frozenset
    keep: bool  # BuildOptions.keep_eval_images

    def for_split(self, source, split: str) -> EvalGuard | None:
        """This guard if ``source``'s ``split`` must leave the eval images out, else None."""
        guarded = split in getattr(source, "eval_image_guard_splits", ())
        return self if guarded and self.image_ids and not self.keep else None

    def with_input(self, files: SourceFiles) -> SourceFiles:
        """``files`` plus ``eval_images.json`` as an input (manifest + fingerprint)."""
        return replace(files, inputs={**files.inputs, "eval_images": self.path})

    def exclude(self, items: Iterable[dict | Skip | Shared]) -> Iterator[dict | Skip | Shared]:
        """Pass a source's index through, turning records of eval images into :data:`REASON` skips."""
        for item in items:
            if isinstance(item, dict) and (item.get("image") or {}).get("id") in self.image_ids:
                yield Skip(
                    item["key"],
                    REASON,
                    f"image {item['image']['id']} is a RefCOCO/+/g/gRefCOCO eval image "
                    f"(see {FILE_NAME}; --keep-eval-images keeps it)",
                )
            else:
                yield item


def gather(data_root: str, overrides: dict[str, dict[str, str]]) -> dict:
    """``eval_images.json`` content: the ids, where each came from (paths relative to the data root, so the
    file's hash does not depend on where the data root is mounted), and refs files that could not be read."""
    ids: set = set()
    splits, errors = [], []
    for src in SOURCES.values():
        if not isinstance(src, ReferSource):
            continue
        found, errs = src.eval_image_ids(data_root, overrides.get(src.name))
        errors += errs
        for rel, by_split in found.items():
            for split, split_ids in by_split.items():
                ids.update(split_ids)
                splits.append(
                    {
                        "source": src.name,
                        "file": rel,
                        "split": split,
                        "images": len(split_ids),
                        "image_ids": split_ids,
                    }
                )
    return {"image_ids": sorted(ids, key=image_sort_id), "eval_splits": splits, "errors": errors}


def prepare(
    data_root: str,
    out_url: str,
    overrides: dict[str, dict[str, str]],
    options: BuildOptions,
    guarded: bool = True,
) -> EvalGuard:
    """Gather the eval image ids, write ``<out>/eval_images.json``, return the guard for
    :mod:`pipelines.build.driver`.

    The guard fails closed: a refs file that cannot be read means its eval images cannot be left out, so when
    this build converts a ``guarded`` split it stops with a :class:`BuildConfigError` naming the file, unless
    ``--keep-eval-images`` says the eval images may be trained on anyway (then it is a warning)."""
    data = gather(data_root, overrides)
    if data["errors"] and guarded and not options.keep_eval_images:
        raise BuildConfigError(
            f"eval-leakage guard: {data['errors'][0]} (a guarded training split would take its eval images; "
            "repair or remove the file, or pass --keep-eval-images)"
        )
    for e in data["errors"]:
        logger.warning("eval-leakage guard: %s", e)
    fs, _ = storage.fs_and_path(out_url)
    path = storage.join(out_url.rstrip("/"), FILE_NAME)
    storage.write_json(fs, path, data)
    n = len(data["image_ids"])
    action = (
        "kept (--keep-eval-images)" if options.keep_eval_images else "left out of guarded training splits"
    )
    logger.info(
        "eval-leakage guard: %d RefCOCO/+/g/gRefCOCO eval image ids in %d splits -> %s; %s",
        n,
        len(data["eval_splits"]),
        path,
        action,
    )
    return EvalGuard(path=path, image_ids=frozenset(data["image_ids"]), keep=options.keep_eval_images)
