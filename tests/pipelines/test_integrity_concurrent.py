"""docs/integrity.md: concurrent use is safe. A loader pins the build generation it started with and stops in
one line when a rebuild lands under it (real damage in the same generation stays a counted skip); two builds
into the same ``--out`` as two real processes: the second stops naming the first's host and pid, the first
finishes with its shards intact."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.build import driver, mixture_weights
from pipelines.build_options import BuildOptions
from pipelines.loader import LoaderError, MixtureLoader
from pipelines.shard_store import Manifest

SOURCE = "coco_panoptic"
ROOT = Path(__file__).resolve().parents[2]


def _build(demo_root: Path, out: Path, seed: int = 0, write_mixture: bool = True) -> str:
    driver.build(
        str(demo_root),
        str(out),
        sources=[SOURCE],
        splits=["train"],
        options=BuildOptions(samples_per_shard=2, seed=seed),
    )
    if write_mixture:
        mixture_weights.write(str(out), mixture_weights.compute(str(out), stages={1: [SOURCE]}))
    return Manifest.read(str(out), SOURCE, "train").generation


def _reading(out: Path, strict: bool = False, workers: int = 0):
    """A loader reading one sample per batch, one 2-sample window at a time (so later shards are read
    late)."""
    loader = MixtureLoader(
        str(out),
        stage=1,
        batch_size=1,
        shuffle_window=2,
        length_group=1,
        strict=strict,
        num_workers=workers,
        transform=lambda s, b: s.key,
    )
    return loader, iter(loader)


def _read_on(batches, n: int = 100) -> None:
    for _ in range(n):
        next(batches)


@pytest.mark.parametrize("workers", [0, 1])  # 1: raised in a DataLoader worker, still one line
def test_a_rebuild_under_a_running_loader_stops_it_in_one_line(demo_root, tmp_path, workers):
    out = tmp_path / "shards"
    gen_a = _build(demo_root, out)
    loader, batches = _reading(out, workers=workers)
    _read_on(batches, 3)
    gen_b = _build(demo_root, out, seed=1, write_mixture=False)  # changed options: conversations re-drawn
    assert gen_b != gen_a
    with pytest.raises(LoaderError) as e:
        _read_on(batches)
    # a worker prefetches while the rebuild runs, so it may meet the rebuild still in progress (no manifest)
    now = f"({gen_b}|none \\(its manifest is gone: a rebuild is in progress\\))" if workers else gen_b
    assert re.fullmatch(
        rf"the shards of {SOURCE}/train changed under this run \(generation {gen_a} → {now}\): "
        r"let the rebuild finish, rewrite mixture\.json and resume",
        str(e.value),
    ), str(e.value)
    assert loader.stats().skipped == {}  # nothing was blamed on the data before the stop


def test_a_rebuild_in_progress_under_a_running_loader_stops_it(demo_root, tmp_path):
    out = tmp_path / "shards"
    gen_a = _build(demo_root, out)
    _, batches = _reading(out, strict=True)  # strict too: the stop comes before any digest error
    _read_on(batches, 3)
    _build(demo_root, out, seed=1, write_mixture=False)
    (out / SOURCE / "train/manifest.json").unlink()  # what a rebuild still writing its shards leaves
    with pytest.raises(
        LoaderError, match=rf"changed under this run \(generation {gen_a} → none \(its manifest is gone"
    ):
        _read_on(batches)


def test_damage_in_the_same_generation_stays_a_counted_skip(demo_root, tmp_path):
    out = tmp_path / "shards"
    _build(demo_root, out)
    loader, batches = _reading(out)
    _read_on(batches, 1)
    for tar in sorted((out / SOURCE / "train").glob("*.tar")):  # flip one byte of every shard, same size
        b = bytearray(tar.read_bytes())
        b[len(b) // 2] ^= 0xFF
        tar.write_bytes(bytes(b))
    _read_on(batches, 30)  # no stop: the generation is the pinned one, so this is corruption
    assert loader.stats().skipped.get("digest_mismatch", 0) > 0


def _cli(data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "orchestrate/build_shards.py"),
        "--data-root",
        str(data),
        "--out",
        str(out),
        "--sources",
        SOURCE,
        "--num-workers",
        "1",
    ]


@pytest.mark.ray
@pytest.mark.slow
def test_two_concurrent_builds_as_real_processes(tmp_path):
    """The first build is paused (SIGSTOP) once it holds the lock, so the second meets it without racing a
    clock; then it is resumed and must finish as if alone."""
    from pipelines.demo_data import write_demo

    data = write_demo(tmp_path / "datas", families=["coco"])
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    lock = out / ".build.lock"
    first = subprocess.Popen(
        _cli(data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        for _ in range(3000):  # wait for it to hold the lock (Ray's start-up first)
            if lock.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert lock.exists(), first.communicate()[1][-3000:]
        os.kill(first.pid, signal.SIGSTOP)
        held = json.loads(lock.read_text())
        assert {k: held[k] for k in ("host", "pid")} == {"host": socket.gethostname(), "pid": first.pid}
        second = subprocess.run(_cli(data, out), capture_output=True, text=True, env=env, timeout=300)
        os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
        assert errors == [
            f"error: {out}: another build is writing here (host {held['host']}, pid {first.pid}); "
            f"wait for it, or remove {lock} if that build is gone"
        ], second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr[-3000:]
    assert not lock.exists()  # released
    m = Manifest.read(str(out), SOURCE, "train")
    assert m.samples == 8
    _, batches = _reading_plain(out)
    assert len({next(batches).data[0] for _ in range(40)}) == 8  # every sample reads, digests verified


def _reading_plain(out: Path):
    mixture_weights.write(str(out), mixture_weights.compute(str(out), stages={1: [SOURCE]}))
    loader = MixtureLoader(
        str(out), stage=1, batch_size=1, length_group=1, strict=True, transform=lambda s, b: s.key
    )
    return loader, iter(loader)
