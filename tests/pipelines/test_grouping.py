"""Length grouping within a step's source (pipelines.loader.grouping,
world-size-free): fewer padded tokens, every sample once per pass, exact resume in the middle of a group, a
failed transform keeps the batch size."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipelines.build import mixture_weights
from pipelines.loader import MixtureLoader
from pipelines.loader.grouping import chunk_order, text_length
from pipelines.schema import Turn
from tests.support.data import chat_sample, tiny_jpeg, to_wds


def padding_fraction(batches: list[list[int]]) -> float:
    """Padded positions / all positions when each micro-batch is right-padded to its longest."""
    total = sum(max(b) * len(b) for b in batches)
    return 1.0 - sum(sum(b) for b in batches) / total


def write_varied(out: Path, source: str, sizes: list[int], seed: int = 0) -> list[str]:
    """Chat shards whose answers are 1..200 words long (a LLaVA-like spread of lengths)."""
    sdir = out / source / "train"
    sdir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    keys, shards, i = [], [], 0
    for s, n in enumerate(sizes):
        name = f"{source}-train-{s:06d}.tar"
        with wds.TarWriter(str(sdir / name), encoder=False, mtime=0.0) as w:
            for _ in range(n):
                base = chat_sample(source, i)
                words = " ".join(["word"] * int(rng.integers(1, 200)))
                sample = replace(base, conversation=[base.conversation[0], Turn("assistant", words)])
                w.write(to_wds(sample, tiny_jpeg(i % 256), "jpg"))
                keys.append(sample.key)
                i += 1
        shards.append({"file": name, "samples": n, "bytes": (sdir / name).stat().st_size, "sha256": None})
    manifest = {
        "schema": 1,
        "source": source,
        "task": "chat",
        "split": "train",
        "shards": shards,
        "counts": {"samples": i, "records_in": i, "skipped": 0},
        "skipped": {},
        "fingerprint": f"fp-{source}",
    }
    (sdir / "manifest.json").write_text(json.dumps(manifest))
    return keys


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grouping")
    write_varied(out, "coco_panoptic", [40, 40, 16])
    write_varied(out, "lisa_reasonseg", [30], seed=1)
    mixture_weights.write(str(out), mixture_weights.compute(str(out)))
    return out


def key_and_length(sample, image_bytes):
    return (sample.key, text_length(sample))


def take(loader, n):
    out = []
    for b in loader:
        out.append(b.data)
        if len(out) == n:
            return out


def make(out, **kw):
    kw = {"stage": 3, "batch_size": 4, "seed": 3, "transform": key_and_length, "collate": list, **kw}
    return MixtureLoader(str(out), **kw)


def test_chunk_order_groups_neighbours_in_length():
    lengths = list(np.random.default_rng(0).integers(1, 500, 64))
    chunks = chunk_order(lengths, 4, np.random.default_rng(1))
    assert sorted(i for c in chunks for i in c) == list(range(64))
    ranks = {i: r for r, i in enumerate(sorted(range(64), key=lambda i: (lengths[i], i)))}
    assert all(sorted(ranks[i] for i in c) == list(range(ranks[c[0]], ranks[c[0]] + 4)) for c in chunks)
    firsts = [min(ranks[i] for i in c) for c in chunks]
    assert firsts != sorted(firsts)  # handed out in a drawn order, not shortest first


def test_grouping_cuts_padding_and_keeps_each_sample_once_per_pass(varied):
    grouped = take(make(varied, shuffle_window=16), 60)
    plain = take(make(varied, shuffle_window=16, length_group=1), 60)
    fg = padding_fraction([[n for _, n in b] for b in grouped])
    fp = padding_fraction([[n for _, n in b] for b in plain])
    assert fg < 0.5 * fp, (fg, fp)
    # one rank, global batch 4, 96 + 30 samples: the global batches that start in the first epoch of a
    # dataset's stream hold each key once, plus the next epoch's first samples in the one that straddles its
    # end
    for source, n in (("coco_panoptic", 96), ("lisa_reasonseg", 30)):
        keys = [k for b in take(make(varied, shuffle_window=16), 200) for k, _ in b if k.startswith(source)]
        crossing = -(-n // 4) * 4
        assert len(set(keys[:crossing])) == n


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers,stop", [(0, 13), (0, 37), (2, 21)])
def test_resume_inside_a_group_is_exact(varied, workers, stop):
    kw = {"num_workers": workers, "shuffle_window": 16}
    uninterrupted = take(make(varied, **kw), stop + 12)
    first = make(varied, **kw)
    take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make(varied, **kw)
    resumed.load_state_dict(state)
    assert take(resumed, 12) == uninterrupted[stop:]
    assert resumed.stats().samples == make_stats(varied, kw, stop + 12)


def make_stats(out, kw, n):
    loader = make(out, **kw)
    take(loader, n)
    return loader.stats().samples


def test_micro_batches_of_a_step_are_neighbours_in_length(varied):
    """Two ranks × 2 accumulation steps, batch 2 (global batch 8): the step's 4 micro-batches, in the order
    j = a·W + r, are consecutive runs of the global batch's length order."""
    per_rank = [take(make(varied, batch_size=2, grad_accum=2, rank=r, world_size=2), 8) for r in range(2)]
    for step in range(4):
        parts = [per_rank[r][step * 2 + a] for a in range(2) for r in range(2)]  # j = a·W + r
        lengths = [n for part in parts for _, n in part]
        assert lengths == sorted(lengths), lengths


def test_a_failed_transform_keeps_the_batch_size_and_is_counted(varied):
    def picky(sample, image_bytes):
        if sample.key.endswith("000005"):
            raise ValueError("bad image")
        return key_and_length(sample, image_bytes)

    loader = make(varied, transform=picky)
    with pytest.warns(UserWarning, match="transform_error"):
        batches = take(loader, 40)
    assert all(len(b) == 4 for b in batches)
    assert not any(k.endswith("000005") for b in batches for k, _ in b)  # replaced by draws
    skipped = loader.stats().skipped
    assert set(skipped) == {"transform_error"} and skipped["transform_error"] >= 1
