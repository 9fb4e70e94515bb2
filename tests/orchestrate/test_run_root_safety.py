"""One training per stage folder, and a full or read-only disk never wedges a run.

A second ``train.py`` into a stage folder that a running training holds is refused in one line naming its
host and pid, before Ray starts; a lock whose process is gone is taken over. ``build_shards.py``, ``train.py``
and ``evaluate.py`` refuse a read-only or full output location in one line before any work. A checkpoint
counts only when every rank's completion marker is there: an upload cut short by a full disk is passed over,
an empty Ray snapshot is moved aside, and the resume takes the newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrate.fingerprint import read_fingerprints
from orchestrate.resume_point import SNAPSHOT
from orchestrate.run_layout import RunLayout
from orchestrate.runner import TRAIN_LOCK, RunArgs, prepare
from orchestrate.stages import debug, stage1
from orchestrate.train_checkpoints import TRAIN_STATE, TrainState, marker_file
from pipelines.errors import run_cli

REPO = Path(__file__).resolve().parents[2]


def _train(argv: list[str], capsys) -> tuple[int, list[str]]:
    """``train.py`` through ``run_cli`` (as the command line runs it): (exit code, stderr lines)."""
    from orchestrate import train

    code = run_cli(train.main, argv)
    return code, capsys.readouterr().err.strip().splitlines()


def _train_argv(run_root, shards) -> list[str]:
    return ["--stage", "1", "--flavor", "debug", "--shards", str(shards), "--run-root", str(run_root)]


def _child(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )


HOLD = """
import sys
from orchestrate.run_errors import RunSetupError
from pipelines.folder_lock import folder_lock
with folder_lock({stage!r}, {name!r}, what="training", error=RunSetupError):  # as runner.stage_lock takes it
    print("held", flush=True)
    sys.stdin.read()  # until the test closes it (or kills this process)
"""


# ---------------------------------------------------------------------------------------------- one training
def test_a_second_training_into_a_held_stage_folder_is_refused_naming_the_first(tmp_path, capsys):
    run_root = tmp_path / "run"
    first = _child(
        HOLD.format(stage=str(run_root / "stage1"), name=TRAIN_LOCK)
    )  # the first submission's driver, holding the stage
    try:
        assert first.stdout.readline().strip() == "held"
        code, err = _train(_train_argv(run_root, tmp_path / "shards"), capsys)
        assert code == 2 and len(err) == 1, err
        assert f"another training is writing here (host {socket.gethostname()}, pid {first.pid})" in err[0]
        assert str(run_root / "stage1" / TRAIN_LOCK) in err[0]  # what to remove if that training is gone
        assert sorted(p.name for p in (run_root / "stage1").iterdir()) == [TRAIN_LOCK]  # nothing written
    finally:
        first.communicate("")
    assert first.returncode == 0 and not (run_root / "stage1" / TRAIN_LOCK).exists()  # released at its end


def test_the_lock_of_a_training_that_died_is_taken_over(tmp_path, capsys):
    run_root = tmp_path / "run"
    first = _child(HOLD.format(stage=str(run_root / "stage1"), name=TRAIN_LOCK))
    assert first.stdout.readline().strip() == "held"
    first.send_signal(signal.SIGKILL)  # no clean-up: its lock stays behind
    first.wait()
    lock = run_root / "stage1" / TRAIN_LOCK
    assert json.loads(lock.read_text())["pid"] == first.pid
    code, err = _train(_train_argv(run_root, tmp_path / "no-shards"), capsys)
    # past the lock: the next check (the shards) is what stops this run, and the lock is released
    assert code == 2 and "shards folder not found" in err[-1], err
    assert not lock.exists()


def test_another_hosts_lock_is_never_taken_over(tmp_path, capsys):
    lock = tmp_path / "run" / "stage1" / TRAIN_LOCK
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "node-7", "pid": 1}))
    code, err = _train(_train_argv(tmp_path / "run", tmp_path / "shards"), capsys)
    assert code == 2 and len(err) == 1 and "(host node-7, pid 1)" in err[0]


def test_object_store_run_roots_are_not_locked_and_say_so(caplog):
    from orchestrate.run_errors import RunSetupError
    from pipelines.folder_lock import folder_lock

    with folder_lock("memory://run/stage1", TRAIN_LOCK, what="training", error=RunSetupError):
        pass
    assert "no lock on object storage: make sure only one training writes here" in caplog.text


# ---------------------------------------------------------------------------------------------- bad locations
@pytest.fixture
def mount(tmp_path):
    """``mount(kind)``: a folder that is a read-only bind mount (``"read-only"``) or a 1 MiB tmpfs filled to
    the last byte (``"full"``); root ignores permissions, so only a mount really refuses root. Skipped
    where mounting is not allowed."""
    mounted: list[Path] = []

    def make(kind: str) -> Path:
        d = tmp_path / f"mnt-{kind}"
        d.mkdir()
        if kind == "full":
            cmds = [["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)]]
        else:
            cmds = [["mount", "--bind", str(d), str(d)], ["mount", "-o", "remount,bind,ro", str(d)]]
        for i, cmd in enumerate(cmds):
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                pytest.skip(f"cannot {' '.join(cmd[:2])} here (needs root and mount rights)")
            if i == 0:
                mounted.append(d)  # unmounted at the end even if the remount failed
        if kind == "full":
            with open(d / "filler", "wb") as f, pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        return d

    yield make
    for d in reversed(mounted):
        subprocess.run(["umount", str(d)], capture_output=True)


def _bad_location(kind: str, tmp_path, mount) -> tuple[Path, str]:
    """(an output path that cannot be written, the reason the message must give)."""
    if kind == "under-a-file":
        (tmp_path / "a-file").write_text("x")
        return tmp_path / "a-file" / "out", "Not a directory"
    if kind == "read-only":
        return mount("read-only") / "out", "Read-only file system"
    return mount("full") / "out", "No space left on device"


@pytest.mark.parametrize("kind", ["under-a-file", "read-only", "full"])
def test_every_command_refuses_an_unwritable_output_in_one_line_before_any_work(
    kind, tmp_path, mount, capsys
):
    from orchestrate import build_shards, evaluate

    bad, reason = _bad_location(kind, tmp_path, mount)
    commands = {
        "build_shards.py": (build_shards.main, ["--data-root", str(tmp_path), "--out", str(bad)], "--out"),
        "train.py": (None, _train_argv(bad, tmp_path / "shards"), "--run-root"),
        # predictions that do not exist: nothing is read before the check
        "evaluate.py": (
            evaluate.main,
            ["--predictions", str(tmp_path / "p.jsonl"), "--shards", str(tmp_path), "--out", str(bad)],
            "--out",
        ),
    }
    for name, (main, argv, option) in commands.items():
        if main is None:
            code, err = _train(argv, capsys)
        else:
            code, err = run_cli(main, argv), capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (name, err)
        assert f"{option} {bad}" in err[0] and f"cannot write there ({reason})" in err[0], (name, err)


# ---------------------------------------------------------------------------------------------- checkpoints
UPLOAD = """
import json, sys
from ray.train import Checkpoint
from ray.train.v2._internal.execution.storage import StorageContext
from orchestrate.train_checkpoints import upload_then_mark
run_root, name, local = sys.argv[1:4]
context = StorageContext(storage_path=run_root, experiment_dir_name="stage1")
upload_then_mark(context, local, 0, 1)(Checkpoint.from_directory(local), name)
"""


def _local_checkpoint(tmp_path, step: int, blob_bytes: int) -> Path:
    """A rank's local checkpoint folder as ``train_checkpoints.save`` writes it (one rank)."""
    local = tmp_path / f"local-{step}"
    (local / "deepspeed").mkdir(parents=True)
    key = {**debug(stage1()).resume_key(), "zero_stage": 2}
    layout = {"world_size": 2, "micro_batch": 2, "grad_accum": 1, "loader_workers": 0}
    (local / TRAIN_STATE).write_text(
        json.dumps(TrainState(step=step, resume_key=key, layout=layout).__dict__)
    )
    state = {"format": "xsam-loader/2", "step": step, "cursors": {}, "stats": {}}
    (local / "loader_rank0.json").write_text(json.dumps(state))
    (local / "deepspeed" / "zz_optim_states.pt").write_bytes(os.urandom(blob_bytes))
    return local


def _upload(run_root: Path, step: int, local: Path, fsize_limit: int | None = None) -> int:
    """Upload ``local`` as ``checkpoint_<step>`` with Ray's own copy and our marker, in a child process
    (``fsize_limit``: RLIMIT_FSIZE there, so a write past it fails the way a full disk does)."""

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    name = f"checkpoint_2026-01-01_00-00-{step:02d}.000000"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", UPLOAD, str(run_root), name, str(local)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=limit if fsize_limit else None,
        timeout=120,
    )
    return done.returncode


@pytest.mark.parametrize("disk", ["small-tmpfs", "file-size-limit"])
def test_a_checkpoint_cut_short_by_a_full_disk_is_passed_over(disk, train_shards, tmp_path, caplog):
    """Steps 2 and 4 complete, step 6 dies part-way (its train state says 6), Ray's snapshot is 0 bytes:
    the re-run resumes from step 4, with the snapshot moved aside in one logged line."""
    run_root = tmp_path / "run"
    if disk == "small-tmpfs":
        run_root = tmp_path / "tmpfs-run"
        run_root.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(run_root)]).returncode:
            pytest.skip("cannot mount a tmpfs here")
    try:
        for step in (2, 4):
            assert _upload(run_root, step, _local_checkpoint(tmp_path, step, 1 << 20)) == 0
        big = _local_checkpoint(tmp_path, 6, 8 << 20)  # more than the disk has left
        assert _upload(run_root, 6, big, fsize_limit=(2 << 20) if disk == "file-size-limit" else None) != 0
        stage = run_root / "stage1"
        (cut,) = stage.glob("checkpoint_*-06.*")
        assert json.loads((cut / TRAIN_STATE).read_text())["step"] == 6  # what misled the resume before
        assert not (cut / marker_file(0)).exists()
        (stage / SNAPSHOT).write_text("")  # what Ray left when its snapshot write hit the full disk
        plan = prepare(RunArgs(stage=1, flavor="debug", shards=str(train_shards), run_root=str(run_root)))
        assert plan.resume_from and plan.resume_from.endswith("-04.000000")
        assert not (stage / SNAPSHOT).exists() and len(list(stage.glob(f"{SNAPSHOT}.bad-*"))) == 1
        assert f"{SNAPSHOT}: Ray Train's checkpoint list is empty (0 bytes); moved aside" in caplog.text
        assert f"{cut.name} is incomplete (no completion marker)" in caplog.text
    finally:
        if disk == "small-tmpfs":
            subprocess.run(["umount", str(run_root)], capture_output=True)


def _complete(stage: Path, step: int) -> str:
    """A complete checkpoint folder of ``step`` (every rank's marker), by hand."""
    from orchestrate.train_checkpoints import marker_record

    ck = stage / f"checkpoint_2026-01-01_00-00-{step:02d}.000000"
    ck.mkdir(parents=True)
    key = {**debug(stage1()).resume_key(), "zero_stage": 2}
    layout = {"world_size": 2, "micro_batch": 2, "grad_accum": 1, "loader_workers": 0}
    (ck / TRAIN_STATE).write_text(json.dumps(TrainState(step=step, resume_key=key, layout=layout).__dict__))
    (ck / "loader_rank0.json").write_text(json.dumps({"format": "xsam-loader/2", "step": step}))
    for rank in range(2):
        (ck / marker_file(rank)).write_text(json.dumps(marker_record(ck, rank, 2)))
    return ck.name


def _snapshot(stage: Path, names: list[str]) -> None:
    """Ray Train's snapshot listing ``names`` (the fields this project reads)."""
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    snap = {"checkpoint_results": results, "latest_checkpoint_result": results[-1] if results else None}
    (stage / SNAPSHOT).write_text(json.dumps(snap))


def test_resume_point_keeps_a_snapshot_that_agrees_and_replaces_one_that_does_not(tmp_path, caplog):
    from orchestrate.resume_point import resume_point

    layout = RunLayout(str(tmp_path / "run")).stage(1)
    stage = Path(layout.dir)
    two, four = _complete(stage, 2), _complete(stage, 4)
    half = stage / "checkpoint_2026-01-01_00-00-06.000000"  # rank 1 never finished its upload
    half.mkdir()
    (half / TRAIN_STATE).write_text(
        (stage / four / TRAIN_STATE).read_text().replace('"step": 4', '"step": 6')
    )
    (half / marker_file(0)).write_text(json.dumps({"rank": 0, "world_size": 2, "files": {}}))

    _snapshot(stage, [two, four])  # Ray's list ends at the newest complete checkpoint: Ray resumes
    found, by_path = resume_point(layout)
    assert [s for s, _ in found] == [2, 4] and by_path is None and (stage / SNAPSHOT).exists()
    assert "rank(s) [1] did not finish their upload" in caplog.text

    _snapshot(stage, [two])  # lagging behind (a driver killed before Ray's bookkeeping)
    assert resume_point(layout)[1].endswith(four) and not (stage / SNAPSHOT).exists()

    _snapshot(stage, [two, four, "checkpoint_gone"])  # a folder removed by hand: Ray would refuse to start
    assert resume_point(layout)[1].endswith(four)
    assert "names checkpoint folders that are gone (checkpoint_gone)" in caplog.text

    (stage / SNAPSHOT).write_text('{"checkpoint_res')  # cut short
    assert resume_point(layout)[1].endswith(four) and "is unreadable" in caplog.text
    assert len(list(stage.glob(f"{SNAPSHOT}.bad-*"))) >= 1


def test_a_legacy_checkpoint_counts_only_when_rays_snapshot_lists_it(tmp_path):
    """Checkpoints written before markers existed: Ray registered them only after every upload."""
    from orchestrate.train_checkpoints import list_checkpoints

    layout = RunLayout(str(tmp_path / "run")).stage(1)
    stage = Path(layout.dir)
    name = _complete(stage, 2)
    for m in stage.glob(f"{name}/complete_rank*.json"):
        m.unlink()
    assert list_checkpoints(layout) == []
    assert [s for s, _ in list_checkpoints(layout, registered={name})] == [2]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_real_run_resumes_from_its_newest_complete_checkpoint_past_an_empty_snapshot(
    train_shards, tmp_path, ray_local, caplog
):
    """Ray Train writes the markers (every rank's, after its upload); a re-run past a 0-byte Ray snapshot and
    a later half-written checkpoint continues from step 2, not from the start and not from the half one."""
    import shutil

    from orchestrate.runner import fit
    from xsam_model.export import Export

    run_root = tmp_path / "run"

    def plan(steps: int):
        args = RunArgs(
            stage=1, flavor="debug", shards=str(train_shards), run_root=str(run_root), num_workers=2
        )
        return prepare(dataclasses.replace(args, max_steps=steps, checkpoint_every=2, wandb_mode="disabled"))

    assert fit(plan(2), callbacks=[]).metrics["step"] == 2
    stage = run_root / "stage1"
    (ck,) = (p for p in stage.glob("checkpoint_*") if p.is_dir())
    assert (ck / marker_file(0)).is_file() and (ck / marker_file(1)).is_file()
    cut = stage / "checkpoint_2099-01-01_00-00-00.000000"  # a later upload the disk cut short
    shutil.copytree(ck, cut)
    state = json.loads((cut / TRAIN_STATE).read_text())
    (cut / TRAIN_STATE).write_text(json.dumps({**state, "step": 6}))
    (cut / marker_file(1)).unlink()
    (stage / SNAPSHOT).write_text("")  # Ray's list, emptied by the full disk

    second = plan(4)
    assert second.resume_from == str(ck)
    assert fit(second, callbacks=[]).metrics["step"] == 4
    layout = RunLayout(str(run_root)).stage(1)
    assert sorted(read_fingerprints(layout.metrics_jsonl)) == [1, 2, 3, 4]  # steps 1-2 not trained twice
    assert Export.find(layout.export_dir, 1).lineage["restarts"] == 1
