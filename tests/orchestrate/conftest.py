"""Fixtures for the orchestration tests: demo shards with a mixture for all three stages, and a Ray cluster
shared by the Ray Train tests of one module (starting Ray costs seconds on the 2-core CI box)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/xsam_torch_extensions"))

# Stage 2 trains on LLaVA-Pretrain captions; the demo tree may not have them, so coco_panoptic's
# conversations stand in (stage 2 only needs an image and a conversation: LM loss on the projectors).
TEST_STAGES = {
    1: ["coco_panoptic"],
    2: ["coco_panoptic"],
    3: ["coco_panoptic", "refcoco", "refcoco+", "lisa_reasonseg", "grandf_gcg"],
}


@pytest.fixture(scope="session")
def train_shards(demo_root, tmp_path_factory) -> Path:
    """Demo shards (train split) plus a ``mixture.json`` whose three stages all have data."""
    from pipelines.build import mixture_weights
    from pipelines.build.driver import build
    from pipelines.build_options import BuildOptions

    out = tmp_path_factory.mktemp("train_shards") / "shards"
    sources = sorted({s for v in TEST_STAGES.values() for s in v})
    build(
        str(demo_root),
        str(out),
        sources=sources,
        splits=["train"],
        options=BuildOptions(samples_per_shard=4),
    )
    mixture_weights.write(str(out), mixture_weights.compute(str(out), stages=TEST_STAGES))
    return out
