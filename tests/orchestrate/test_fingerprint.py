"""The per-step data fingerprint (docs/training.md#proving-a-run-saw-the-same-data-per-step-data-fingerprint):
a pure function of the sorted global keys, gathered exactly across ranks, logged per step, and compared
between two runs by ``python -m orchestrate.summary
--compare``."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from orchestrate import fingerprint as fp
from orchestrate.summary import compare_runs, main
from orchestrate.tracking import Tracker
from pipelines.errors import run_cli
from pipelines.loader import MixtureLoader

KEYS = ["coco_panoptic/train/000000000139", "refcoco/train/r-17", "coco_panoptic/train/000000000285"]


# ---------------------------------------------------------------------------------------------- the digest
def test_fingerprint_is_the_sha256_of_the_sorted_keys_and_nothing_else():
    want = hashlib.sha256(json.dumps(sorted(KEYS), separators=(",", ":")).encode()).hexdigest()[:16]
    assert fp.fingerprint(KEYS) == want
    shuffled = KEYS[:]
    for seed in range(5):  # any rank / micro-batch order
        random.Random(seed).shuffle(shuffled)
        assert fp.fingerprint(shuffled) == want
    assert fp.fingerprint(iter(KEYS)) == want  # any iterable
    assert len(want) == fp.FINGERPRINT_CHARS and int(want, 16) >= 0
    assert fp.fingerprint(KEYS[:2]) != want  # one sample fewer
    assert fp.fingerprint([*KEYS, KEYS[0]]) != want  # a sample twice is another batch
    # no separator ambiguity: ["a,b"] and ["a", "b"] differ
    assert fp.fingerprint(["a,b"]) != fp.fingerprint(["a", "b"])
    assert fp.step_fields("refcoco/train", KEYS) == {"data/source": "refcoco/train", "data/fingerprint": want}


def test_gather_keys_without_a_process_group_is_the_local_keys():
    assert fp.gather_keys(KEYS) == KEYS


def _gather_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(
        1
    )  # a forked child must not enter the parent's OpenMP pool (libgomp is not fork-safe)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        keys = [f"src/train/r{rank}-{i}" for i in range(rank + 1)]  # ranks may hold different counts
        got = fp.gather_keys(keys)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"keys": got, "fp": fp.fingerprint(got)}))
    finally:
        dist.destroy_process_group()


def test_gather_keys_on_gloo_gives_every_rank_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    world = 3
    init = f"file://{tmp_path / 'rendezvous'}"
    # fork: the children need not import torch and this module again (spawn costs seconds each on 2 cores)
    mp.start_processes(
        _gather_worker, args=(world, init, str(tmp_path)), nprocs=world, join=True, start_method="fork"
    )
    want = [f"src/train/r{r}-{i}" for r in range(world) for i in range(r + 1)]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(sorted(row["keys"]) == sorted(want) for row in rows)
    assert {row["fp"] for row in rows} == {fp.fingerprint(want)}


# ---------------------------------------------------------------------------------------------- loader runs
def _global_keys(shards: Path, seed: int, steps: int, world: int = 2) -> list[tuple[str, list[str]]]:
    """``[(source, global keys)]`` per step of stage 3, read by ``world`` loaders as the ranks would."""
    per_rank = []
    for rank in range(world):
        loader = MixtureLoader(
            str(shards),
            stage=3,
            batch_size=2,
            rank=rank,
            world_size=world,
            seed=seed,
            redraw_conversations=False,
        )
        batches = iter(loader)
        per_rank.append([next(batches) for _ in range(steps)])
    out = []
    for step in range(steps):
        sources = {per_rank[r][step].source for r in range(world)}
        assert len(sources) == 1  # one source per global step
        out.append((sources.pop(), [it["sample"].key for r in range(world) for it in per_rank[r][step].data]))
    return out


def _write_run(root: Path, stage: int, steps: list[tuple[str, list[str]]]) -> None:
    """metrics.jsonl as the trainer's rank 0 writes it (the Tracker, wandb off)."""
    folder = root / f"stage{stage}"
    folder.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(
        project="t", run_name="t", stage=stage, config={}, mode="disabled", wandb_dir=None,
        metrics_file=folder / "metrics.jsonl",
    )  # fmt: skip
    for i, (source, keys) in enumerate(steps, 1):
        tracker.log(i, {"loss": 1.0 / i, "source": source, **fp.step_fields(source, keys)})
    tracker.log(len(steps), {"mixture/max_abs_gap": 0.1})  # a mixture row carries no fingerprint
    tracker.finish()


def test_identical_runs_compare_equal_and_another_seed_differs_where_its_batches_do(train_shards, tmp_path):
    steps = 6
    a, b, c = (_global_keys(train_shards, seed, steps) for seed in (0, 0, 1))
    assert a == b  # the loader is deterministic
    first = next(i for i in range(steps) if (a[i][0], sorted(a[i][1])) != (c[i][0], sorted(c[i][1])))
    for name, run in (("a", a), ("b", b), ("c", c)):
        _write_run(tmp_path / name, 3, run)
    same, report = compare_runs(str(tmp_path / "a"), str(tmp_path / "b"))
    assert same and "stage 3: same data (6 common steps, 0 differ" in report
    same, report = compare_runs(str(tmp_path / "a"), str(tmp_path / "c"), stage=3)
    assert not same
    want = (
        f"first difference at step {first + 1}: a {a[first][0]} {fp.fingerprint(a[first][1])}  "
        f"b {c[first][0]} {fp.fingerprint(c[first][1])}"
    )
    assert want in report, report


# ---------------------------------------------------------------------------------------------- the command
def _rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _step(step: int, source: str = "coco_panoptic/train", digest: str | None = None) -> dict:
    return {"step": step, "loss": 1.0, "data/source": source, "data/fingerprint": digest or f"{step:016x}"}


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = run_cli(main, list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compare_command_equal_runs_exit_0_despite_a_restart(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _rows(a / "stage1" / "metrics.jsonl", [_step(s) for s in (1, 2, 3, 4)])
    # b was killed after step 3 and restarted from its step-2 checkpoint: steps 3 and 4 logged again, and the
    # first attempt's step 3 (another batch) is superseded by the record written after the restart
    _rows(
        b / "stage1" / "metrics.jsonl",
        [
            _step(1),
            _step(2),
            _step(3, digest="f" * 16),
            {"step": 3, "mixture/max_abs_gap": 0.0},
            _step(3),
            _step(4),
        ],
    )
    code, out, err = _cli(capsys, "--run-root", str(a), "--compare", str(b))
    assert (code, err) == (0, "")
    assert "stage 1: same data (4 common steps, 0 differ; only in a: 0, only in b: 0)" in out
    assert out.rstrip().endswith("result: same data")


def test_compare_command_names_the_first_difference_exit_1(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _rows(a / "stage1" / "metrics.jsonl", [_step(s) for s in range(1, 7)])
    _rows(
        b / "stage1" / "metrics.jsonl",
        [_step(1), _step(2), _step(3, "refcoco/train", "ab" * 8), _step(4), _step(5, digest="cd" * 8)],
    )
    _rows(a / "stage2" / "metrics.jsonl", [_step(1)])  # only a has stage 2: listed, not compared
    code, out, err = _cli(capsys, "--run-root", str(a), "--compare", str(b))
    assert (code, err) == (1, "")
    assert "stage 1: DIFFERENT data (5 common steps, 2 differ; only in a: 1, only in b: 0)" in out
    assert f"first difference at step 3: a coco_panoptic/train {3:016x}  b refcoco/train {'ab' * 8}" in out
    assert "stage 2: only in a, not compared" in out and "result: different data" in out
    code, out, _ = _cli(capsys, "--run-root", str(a), "--compare", str(a), "--stage", "1")
    assert code == 0 and "stage 2" not in out


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_root", "run root not found"),
        ("no_metrics", "stage1/metrics.jsonl: no data/fingerprint records"),
        ("old_metrics", "stage1/metrics.jsonl: no data/fingerprint records"),
        ("corrupt", "metrics.jsonl:2: not a metrics record"),
        ("no_common_step", "stage 1: the two runs have no step in common"),
        ("nothing", "no stage of"),
    ],
)
def test_compare_command_bad_input_exit_2(tmp_path, capsys, case, message):
    a, b = tmp_path / "a", tmp_path / "b"
    _rows(a / "stage1" / "metrics.jsonl", [_step(1), _step(2)])
    b.mkdir()
    rows = {
        "old_metrics": [{"step": 1, "loss": 1.0}],  # written before fingerprints existed
        "no_common_step": [_step(7)],
    }
    if case in rows:
        _rows(b / "stage1" / "metrics.jsonl", rows[case])
    elif case == "corrupt":
        (b / "stage1").mkdir()
        (b / "stage1" / "metrics.jsonl").write_text(json.dumps(_step(1)) + "\n{not json\n")
    stage = [] if case == "nothing" else ["--stage", "1"]
    other = tmp_path / "missing" if case == "missing_root" else b
    code, out, err = _cli(capsys, "--run-root", str(a), "--compare", str(other), *stage)
    assert code == 2 and out == "" and err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1


def test_stage_without_compare_is_refused(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--run-root", str(tmp_path), "--stage", "1"])
    assert e.value.code == 2
