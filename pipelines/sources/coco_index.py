"""Memory-bounded indexing of COCO-style JSON (``images`` / ``annotations`` / ``categories``).

``pycocotools.COCO()`` loads the whole file and builds Python objects for every annotation (≈2.4 GB for
COCO train instances). Here the file is streamed three times with ijson's C parser: once for the small
``categories`` and ``images`` tables, once for ``annotations``, which are written to per-block spill files
on local disk, so at no point does the process hold more than the image table and one block.
Used by the COCO, LVIS and VGD sources.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from pipelines.jsonstream import iter_items
from pipelines.sources.base import Skip

IMAGE_BLOCK = 2000  # images per spill block: bounds what one block holds in memory


def image_sort_id(image_id: Any) -> str:
    """Key id for an image id: ints zero-padded to 12 digits (COCO file names) so string order is numeric."""
    if isinstance(image_id, int) or (isinstance(image_id, float) and image_id.is_integer()):
        return f"{int(image_id):012d}"
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in str(image_id))


def iter_coco_records(
    path: str,
    key_prefix: str,
    image_fields: Callable[[dict], dict],
    ann_fields: Callable[[dict], dict],
    ann_list_key: str = "anns",
) -> Iterator[dict | Skip]:
    """One record per image, in key order: ``{"key", "image": image_fields(img), ann_list_key: [...]}``.

    Duplicate image ids (the second one) and annotations whose image is absent are yielded as :class:`Skip`.
    ``image_fields`` / ``ann_fields`` pick what a record keeps, so spill files stay small.
    """
    images: dict[Any, dict] = {}
    for img in iter_items(path, "images.item"):
        iid = img.get("id")
        if iid in images:
            yield Skip(f"{key_prefix}/{image_sort_id(iid)}", "duplicate_image_id", f"image id {iid} listed twice; first kept")
            continue
        images[iid] = image_fields(img)
    order = sorted(images, key=image_sort_id)
    block_of = {iid: i // IMAGE_BLOCK for i, iid in enumerate(order)}
    n_blocks = (len(order) + IMAGE_BLOCK - 1) // IMAGE_BLOCK
    with tempfile.TemporaryDirectory(prefix="xsam-index-") as tmp:
        spill = [open(os.path.join(tmp, f"{b:06d}.jsonl"), "w") for b in range(n_blocks)]
        try:
            for ann in iter_items(path, "annotations.item"):
                iid = ann.get("image_id")
                b = block_of.get(iid)
                if b is None:
                    yield Skip(
                        f"{key_prefix}/ann_{image_sort_id(ann.get('id'))}",
                        "annotation_without_image",
                        f"annotation {ann.get('id')} points at image {iid}, which is not in images[]",
                        level="annotation",
                    )
                    continue
                spill[b].write(json.dumps([iid, ann_fields(ann)]) + "\n")
        finally:
            for f in spill:
                f.close()
        for b in range(n_blocks):
            anns: dict[Any, list] = {}
            with open(os.path.join(tmp, f"{b:06d}.jsonl")) as f:
                for line in f:
                    iid, ann = json.loads(line)
                    anns.setdefault(iid, []).append(ann)
            for iid in order[b * IMAGE_BLOCK : (b + 1) * IMAGE_BLOCK]:
                yield {"key": f"{key_prefix}/{image_sort_id(iid)}", "image": images[iid], ann_list_key: anns.get(iid, [])}


def read_categories(path: str) -> list[dict]:
    return list(iter_items(path, "categories.item"))
