"""docs/integrity.md: one build per output folder. A second build into the same --out stops naming the
first one's host and pid; a lock left by a build that died is taken over; the lock goes when a build ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pipelines.build.driver import build
from pipelines.build.lock import LOCK_FILE, build_lock
from pipelines.errors import BuildConfigError


def _lock(out, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_FILE).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid}))


def test_a_second_build_into_the_same_out_stops_naming_the_first(demo_root, tmp_path):
    out = tmp_path / "shards"
    with build_lock(str(out)):  # a build in progress (this process)
        with pytest.raises(
            BuildConfigError, match=rf"another build is writing here \(host .*, pid {os.getpid()}\)"
        ):
            build(str(demo_root), str(out), sources=["refcoco"], splits=["train"])
    _lock(out, 1, host="elsewhere")  # another host's lock is never taken over
    with pytest.raises(BuildConfigError, match=r"host elsewhere, pid 1"):
        build(str(demo_root), str(out), sources=["refcoco"], splits=["train"])


def test_a_dead_builds_lock_is_taken_over_and_released(demo_root, tmp_path):
    out = tmp_path / "shards"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(out, dead.pid)
    build(str(demo_root), str(out), sources=["refcoco"], splits=["train"])
    assert (out / "refcoco" / "train" / "manifest.json").exists()
    assert not (out / LOCK_FILE).exists()  # released at the end
