"""The loader as a package: its public surface, what importing it costs (no torch, no build), the counters as
a dataclass whose serialized form is the loader state's, and DataLoader workers started by spawn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import errors
from pipelines.build import mixture_weights
from pipelines.loader import Batch, LoaderError, LoaderStats, MixtureLoader
from pipelines.loader.stats import MAX_ERRORS
from tests.support.data import write_source

ROOT = Path(__file__).resolve().parents[2]

# the keys of a loader state's "stats", in order: checkpoints written before LoaderStats hold exactly these
STATE_STATS_KEYS = [
    "batches",
    "samples",
    "skipped",
    "filtered",
    "bytes_read",
    "ranged_reads",
    "shards_indexed",
    "batches_by_source",
    "errors",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("package")
    write_source(out, "coco_panoptic", [5, 4])
    write_source(out, "refcoco", [6])
    mixture_weights.write(str(out), mixture_weights.compute(str(out)))
    return out


def sample_key(sample, image_bytes):  # module level: picklable into spawned workers
    return sample.key


def test_the_public_surface_is_importable_from_the_package():
    assert LoaderError is errors.LoaderError
    assert {"Batch", "LoaderError", "LoaderStats", "MixtureLoader"} <= set(
        __import__("pipelines.loader").loader.__all__
    )
    assert Batch.__module__ == MixtureLoader.__module__ == "pipelines.loader.mixture_loader"


def test_importing_the_loader_imports_neither_torch_nor_the_build():
    code = (
        "import sys, pipelines.loader, pipelines.loader.decode; "
        "print(sorted(m for m in ('torch', 'pipelines.build') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_stats_merge_adds_counters_keeps_order_and_the_recent_errors():
    total = LoaderStats.new(["a", "b"])
    part = LoaderStats(batches=1, samples=2, bytes_read=10, ranged_reads=1, shards_indexed=1)
    part.batch("b")
    part.skip("corrupt_json", "k1", "ValueError: x")
    part.filter("no_target")
    total.merge(part).merge(part)
    assert (total.batches, total.samples, total.bytes_read, total.shards_indexed) == (4, 4, 20, 2)
    assert total.batches_by_source == {"a": 0, "b": 2} and list(total.batches_by_source) == ["a", "b"]
    assert total.skipped == {"corrupt_json": 2} and total.filtered == {"no_target": 2}
    for i in range(2 * MAX_ERRORS):
        total.skip("digest_mismatch", f"k{i}", "")
    assert len(total.errors) == MAX_ERRORS and total.errors[-1] == f"k{2 * MAX_ERRORS - 1}: digest_mismatch: "


def test_stats_serialize_as_the_loader_state_always_did(shards):
    loader = MixtureLoader(str(shards), stage=3, batch_size=2, seed=1, transform=sample_key)
    for i, _ in enumerate(loader):
        if i == 5:
            break
    state = json.loads(json.dumps(loader.state_dict()))
    assert list(state["stats"]) == STATE_STATS_KEYS
    assert LoaderStats.from_dict(state["stats"]).to_dict() == state["stats"]
    assert LoaderStats.from_dict({**state["stats"], "windows_read": 3}) == loader.stats()  # v1 extras ignored
    assert loader.stats().batches == 6 == sum(loader.stats().batches_by_source.values())


@pytest.mark.slow  # two spawned interpreters import torch: ~17 s on 2 cores
def test_spawned_workers_serve_the_same_batches(shards):
    def keys(**kw):
        loader = MixtureLoader(str(shards), stage=3, batch_size=2, seed=1, transform=sample_key, **kw)
        out = []
        for b in loader:
            out.append(b.keys)
            if len(out) == 6:
                return out

    assert keys(num_workers=2, multiprocessing_context="spawn") == keys()
