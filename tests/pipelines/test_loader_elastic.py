"""Elastic data order (docs/scale.md#elastic-resume-another-world-size-the-same-data): the global sample
sequence is a function of (seed, global step) only. A state written on one world size / worker count /
micro-batch × accumulation split resumes on another with the same global batch and the same samples at every
global step — with length grouping on and off, with a corrupt and a filtered sample in the data; what cannot
resume (another global batch or seed, a state inside a step under another split, an old per-(rank, lane) state
with other sizes) is refused with the reason."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

from pipelines.build import mixture_weights
from pipelines.loader import MixtureLoader
from pipelines.loader.order import StepPlan, WindowOrder, dataset_tag
from pipelines.loader.stream import global_batch_keys
from tests.pipelines.test_grouping import write_varied
from tests.support.data import write_source

G = 6  # the global batch every split below keeps
SEED = 20  # its first 12 steps draw every dataset before and after STOP
SPLITS = [  # (world size, DataLoader workers, batch_size, grad_accum): batch_size × grad_accum × world = G
    (1, 1, 3, 2),
    (2, 1, 3, 1),
    (2, 2, 1, 3),
    (3, 1, 2, 1),
]
STEPS, STOP = 12, 5


def _corrupt_json(shard: Path, index: int) -> None:
    """Make sample ``index`` of ``shard``'s JSON member unparsable (same size)."""
    src = shard.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(src)) as t_in, tarfile.open(shard, "w") as t_out:
        for m in t_in.getmembers():
            data = t_in.extractfile(m).read()
            if m.name.endswith(f"{index:06d}.json"):
                data = b"{" + data[1:-1] + b"!"
            t_out.addfile(m, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Three datasets: varied text lengths (grouping has something to sort), one with a corrupt JSON member,
    one with no_target samples (filtered)."""
    out = tmp_path_factory.mktemp("elastic")
    write_varied(out, "coco_panoptic", [20, 17])
    write_source(out, "refcoco", [7, 6])
    write_source(out, "grefcoco", [11], flagged={2, 5})
    _corrupt_json(out / "refcoco" / "train" / "refcoco-train-000000.tar", 3)
    mixture_weights.write(str(out), mixture_weights.compute(str(out), stage3_extra=["grefcoco"]))
    return out


def key_of(sample, image_bytes):
    return sample.key


def make(out, world=1, workers=0, bs=G, accum=1, rank=0, **kw) -> MixtureLoader:
    kw = {"stage": 3, "seed": SEED, "transform": key_of, "shuffle_window": 5, **kw}
    return MixtureLoader(
        str(out), batch_size=bs, grad_accum=accum, rank=rank, world_size=world, num_workers=workers, **kw
    )


def run(out, world, workers, bs, accum, *, state=None, until=STEPS, **kw):
    """Every rank's loader up to global step ``until``: (sorted global keys per step, sources per step,
    per-rank stats, per-rank states)."""
    keys, sources, stats, states = defaultdict(list), defaultdict(set), [], []
    for rank in range(world):
        loader = make(out, world, workers, bs, accum, rank, **kw)
        if state is not None:
            loader.load_state_dict(state)
        n = until * accum - loader.micro_step
        for i, b in enumerate(loader, start=1):
            assert list(b.keys) == list(b.data) and len(b.keys) == bs
            keys[b.step] += b.keys
            sources[b.step].add(b.source)
            if i == n:
                break
        stats.append(loader.stats().to_dict())
        states.append(json.loads(json.dumps(loader.state_dict())))  # what a checkpoint stores
    return {s: sorted(k) for s, k in keys.items()}, dict(sources), stats, states


def _skips(stats_list) -> dict:
    total: dict[str, int] = defaultdict(int)
    for st in stats_list:
        for part in ("skipped", "filtered"):
            for reason, n in st[part].items():
                total[f"{part}:{reason}"] += n
    return dict(total)


def _minus(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) - b.get(k, 0) for k in a.keys() | b.keys() if a.get(k, 0) != b.get(k, 0)}


@pytest.mark.filterwarnings("ignore:This DataLoader will create", "ignore:loader. skipping")
@pytest.mark.parametrize("length_group", [1, 8])
def test_resume_on_any_world_size_gives_the_same_global_batches(shards, length_group):
    whole, whole_src, whole_stats, _ = run(shards, 1, 0, G, 1, length_group=length_group)
    assert sorted(whole) == list(range(STEPS))
    assert all(len(v) == 1 for v in whole_src.values())  # one source per global step
    assert len({s for v in whole_src.values() for s in v}) == 3  # the test saw every dataset
    at_stop, _, stop_stats, _ = run(shards, 1, 0, G, 1, until=STOP, length_group=length_group)
    skips_after_stop = _minus(_skips(whole_stats), _skips(stop_stats))
    assert "skipped:corrupt_json" in _skips(whole_stats) and "filtered:no_target" in _skips(whole_stats)

    # the state: rank 1 of 2 ranks × 2 workers, batch 1 × 3 accumulation steps, at global step STOP
    first, _, first_stats, states = run(shards, 2, 2, 1, 3, until=STOP, length_group=length_group)
    assert first == at_stop  # the same global batches before the stop, too
    assert _skips(first_stats) == _skips(stop_stats)
    state = states[1]
    assert state["step"] == STOP and state["micro_step"] == 3 * STOP and "rank" not in state

    for world, workers, bs, accum in SPLITS:
        got, src, stats, _ = run(shards, world, workers, bs, accum, state=state, length_group=length_group)
        split = (world, workers, bs, accum)
        assert sorted(got) == list(range(STOP, STEPS)), split
        for s in range(STOP, STEPS):
            assert got[s] == whole[s], (split, s)
            assert src[s] == whole_src[s], (split, s)
        # skips still counted, by the rank that trained on the sample: the ranks' counters after the resume
        # (each carries the loaded state's) add up to what the uninterrupted run counted after STOP
        delta = _minus(_skips(stats), {k: world * v for k, v in _skips([state["stats"]]).items()})
        assert delta == skips_after_stop, split


@pytest.mark.filterwarnings("ignore:loader. skipping")
def test_global_batch_keys_and_cursors_are_pure_functions_of_seed_and_step(shards):
    whole, whole_src, _, states = run(shards, 1, 0, G, 1, until=4)
    loader = make(shards, 3, 0, 2, 1, rank=2)
    for s in range(4):
        assert global_batch_keys(loader.stream, s) == whole[s]
    # cursors: G × the number of earlier steps that drew each dataset
    names = loader.stream.names
    plan = StepPlan(SEED, loader.stream.probabilities)
    draws = [names[plan.source(s)] for s in range(4)]
    assert [next(iter(whole_src[s])) for s in range(4)] == draws
    assert states[0]["cursors"] == {n: G * draws.count(n) for n in names}
    # the ungrouped stream of a dataset is the window-local shuffle: step s holds positions [c, c + G)
    d = loader.stream.stage.datasets[names.index(draws[0])]
    n = sum(sh.samples for sh in d.shards)
    order = WindowOrder(n, 5, SEED, dataset_tag(d.name))
    first_pass = [order.index(p) for p in range(n)]
    assert sorted(first_pass) == list(range(n)) and first_pass != sorted(first_pass)
    for w in range(-(-n // 5)):  # each window of 5 stored samples is read as a run of consecutive positions
        at = [p for p, i in enumerate(first_pass) if i // 5 == w]
        assert at == list(range(at[0], at[0] + len(at))), (w, at)


@pytest.mark.filterwarnings("ignore:loader. skipping")
def test_what_cannot_resume_is_refused_with_the_reason(shards):
    loader = make(shards, 2, 0, 1, 3, rank=0)
    for b in loader:
        if b.micro_step == 7:  # inside global step 2 (micro-batch 2 of its 3)
            break
    inside = loader.state_dict()
    assert inside["micro_step"] == 8 and inside["step"] == 2
    with pytest.raises(ValueError, match="global_batch: 6 vs 4"):
        make(shards, 1, 0, 4, 1).load_state_dict(inside)
    with pytest.raises(ValueError, match=f"seed: {SEED} vs {SEED + 1}"):
        make(shards, 2, 0, 1, 3, seed=SEED + 1).load_state_dict(inside)
    with pytest.raises(ValueError, match="length_group: 8 vs 1"):
        make(shards, 2, 0, 1, 3, length_group=1).load_state_dict(inside)
    with pytest.raises(ValueError, match="inside a global step.*global-step boundary"):
        make(shards, 1, 0, 3, 2).load_state_dict(inside)
    same_split = make(shards, 2, 1, 1, 3, rank=0)  # another worker count is fine inside a step
    same_split.load_state_dict(inside)
    assert same_split.micro_step == 8
    with pytest.raises(ValueError, match="format 'xsam-loader/9'"):
        make(shards).load_state_dict({**inside, "format": "xsam-loader/9"})


def _v1_state(loader: MixtureLoader, world: int, lanes: int, micro_step: int) -> dict:
    """A state as the per-(rank, lane) loader (``xsam-loader/1``) wrote it."""
    s = loader.stream
    names = s.names
    lane_stats = {**loader.stats().to_dict(), "windows_read": 2, "skipped": {"corrupt_json": 1}}
    return {
        "format": "xsam-loader/1",
        "stage": "3",
        "mixture_digest": loader.digest,
        "seed": s.seed,
        "rank": 0,
        "world_size": world,
        "lanes": lanes,
        "batch_size": s.batch_size,
        "grad_accum": s.grad_accum,
        "shuffle_window": s.shuffle_window,
        "exclude_flags": list(s.exclude_flags),
        "length_group": s.length_group,
        "micro_step": micro_step,
        "step": micro_step // s.grad_accum,
        "positions": {n: [3] * lanes for n in names},
        "groups": {n: [0] * lanes for n in names},
        "stats": [lane_stats] * lanes,
    }


def test_an_old_state_loads_only_with_the_same_sizes(shards, caplog):
    old = _v1_state(make(shards, 2, 0, 3, 1), world=2, lanes=1, micro_step=4)
    with pytest.raises(ValueError, match=r"world_size: 2 vs 1.*xsam-loader/1.*per-\(rank, lane\)"):
        make(shards, 1, 0, 6, 1).load_state_dict(old)
    with pytest.raises(ValueError, match="lanes: 1 vs 2"):
        make(shards, 2, 2, 3, 1).load_state_dict(old)
    same = make(shards, 2, 0, 3, 1)
    with caplog.at_level(logging.WARNING, logger="pipelines.loader.state"):
        same.load_state_dict(old)
    assert "continues in the world-size-free order" in caplog.text
    assert same.micro_step == 4 and same.stats().skipped == {"corrupt_json": 1}
    fresh = make(shards, 2, 0, 3, 1)
    fresh.load_state_dict(same.state_dict())  # and from then on it is a v2 state
    assert next(iter(fresh)).keys == next(iter(same)).keys
