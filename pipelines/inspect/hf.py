"""Reading our shards with Hugging Face ``datasets``: explicit features, so no schema guessing.

    from pipelines.inspect.hf import load_shards
    ds = load_shards("<out>", "coco_panoptic")            # DatasetDict of every built split
    sample = pipelines.schema.Sample.from_dict(ds["train"][0]["json"])

Why not plain ``load_dataset("webdataset", data_files=...)``: that builder infers the column types from the
first 5 samples of one shard and casts everything else to them. A Sample field that is empty there but set
later (``ignore`` of the first crowd image, ``regions``, a ``meta`` key) then fails to cast, and a source
whose shards mix ``.jpg`` and ``.png`` members (original bytes, never re-encoded: LLaVA's OCR-VQA images)
stops with "files … don't share the same types". :data:`FEATURES_YAML` declares both image columns and keeps
the Sample JSON as a ``datasets.Json`` column (stored as JSON text, returned as the same dict), which holds
every source's Sample exactly. The dataset cards carry the same list under ``dataset_info.features``, so
``load_dataset("<out>/<source>")`` with the card saved there as ``README.md`` needs nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipelines.shard_store import list_manifests

# Heavy imports (datasets) are deferred into the loaders: it costs a second and is optional.

# The columns of a shard as Hugging Face sees them; YAML form of ``datasets.Features`` (dataset-card syntax).
FEATURES_YAML: list[dict[str, str]] = [
    {"name": "jpg", "dtype": "image"},
    {"name": "png", "dtype": "image"},
    {"name": "json", "dtype": "json"},
    {"name": "__key__", "dtype": "string"},
    {"name": "__url__", "dtype": "string"},
]


def hf_features():
    """:data:`FEATURES_YAML` as a ``datasets.Features`` (a sample has exactly one of ``jpg``/``png``; the
    other is ``None``; an image-less chat Sample has neither)."""
    import datasets

    return datasets.Features._from_yaml_list(FEATURES_YAML)


def data_files(out: str | Path, source: str, splits: Sequence[str] | None = None) -> dict[str, str]:
    """``{split: "<out>/<source>/<split>/<source>-<split>-*.tar"}`` for the given (default: every built)
    split."""
    root = Path(out) / source
    if splits is None:
        splits = sorted(m.split for m in list_manifests(str(out), sources=[source]))
    return {s: str(root / s / f"{source}-{s}-*.tar") for s in splits}


def load_shards(out: str | Path, source: str, splits: Sequence[str] | None = None, **kwargs):
    """``datasets.load_dataset("webdataset", …)`` over a source's shards with :func:`hf_features`.
    ``kwargs`` go to ``load_dataset`` (``cache_dir``, ``streaming``, …)."""
    import datasets

    files = data_files(out, source, splits)
    if not files:
        raise FileNotFoundError(f"no built split of {source!r} under {out}")
    return datasets.load_dataset("webdataset", data_files=files, features=hf_features(), **kwargs)
