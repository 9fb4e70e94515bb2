"""The build's entry points as users run them: the CLI as a script, and the README demo as Ray jobs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the venv's ray / python first
    return env


def _free_port_block(size: int = 500) -> int:
    """A base port with ``size`` ports above it free right now (Ray's head takes several)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + size > 65000:
            continue
        ok = True
        for p in (base, base + 1, base + 2, base + 3, base + 4, base + 5, base + 6, base + 7, base + 8):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


# Every pipelines entry point, given bad input or configuration: (argv after the module, words in the
# message).
BAD_INPUT = {
    "build_shards: bad boolean": (
        [
            "orchestrate/build_shards.py",
            "--data-root",
            "{tmp}",
            "--out",
            "{tmp}/o",
            "--option",
            "gcg_force_period=maybe",
        ],
        ["gcg_force_period", "'maybe'", "not a boolean"],
    ),
    "build_shards: unknown option": (
        [
            "orchestrate/build_shards.py",
            "--data-root",
            "{tmp}",
            "--out",
            "{tmp}/o",
            "--option",
            "refseg_chunks=8",
        ],
        ["refseg_chunks", "valid", "refseg_chunk"],
    ),
    "build_shards: bad --path": (
        ["orchestrate/build_shards.py", "--data-root", "{tmp}", "--out", "{tmp}/o", "--path", "coco=/x"],
        ["--path", "SOURCE.ROLE=PATH"],
    ),
    "summary: nothing built": (
        ["-m", "pipelines.inspect.build_summary", "--out", "{tmp}/none"],
        ["{tmp}/none"],
    ),
    "preview: nothing built": (["-m", "pipelines.inspect.preview", "--out", "{tmp}/none"], ["{tmp}/none"]),
    "cards: no such --out": (["-m", "pipelines.inspect.cards", "--out", "{tmp}/none"], ["{tmp}/none"]),
    "mixture: nothing built": (
        ["-m", "pipelines.build.mixture_weights", "--out", "{tmp}/none"],
        ["{tmp}/none"],
    ),
    "demo_data: unknown family": (
        ["-m", "pipelines.demo_data", "--out", "{tmp}/d", "--families", "coco,cocoa"],
        ["cocoa", "known"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_entry_points_answer_bad_input_with_exit_2_and_one_line(case, tmp_path):
    args, words = BAD_INPUT[case]
    argv = [a.format(tmp=tmp_path) for a in args]
    env = _env()
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    err = done.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in done.stderr, done.stderr
    for w in words:
        assert w.format(tmp=tmp_path) in err, err


@pytest.mark.ray
def test_cli_script_builds_and_reports_errors(tmp_path):
    from pipelines.demo_data import write_demo

    data = write_demo(tmp_path / "datas", families=["coco"])
    cmd = [
        sys.executable,
        str(ROOT / "orchestrate/build_shards.py"),
        "--data-root",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--sources",
        "coco_panoptic",
        "--num-workers",
        "1",
    ]
    env = _env()
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "coco_panoptic" in done.stdout and "samples" in done.stdout
    manifest = json.loads((tmp_path / "out/coco_panoptic/train/manifest.json").read_text())
    assert manifest["counts"]["samples"] == 8
    bad = subprocess.run(
        [*cmd[:-4], "--sources", "refcocoo"], capture_output=True, text=True, env=env, timeout=600
    )
    assert bad.returncode == 2 and "unknown source" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_readme_demo_builds_shards_as_a_ray_job(tmp_path):
    """`make demo`'s script, build part: demo data, a Ray head, `ray job submit`, the summary, head
    stopped."""
    base = _free_port_block()
    ray_tmp = tempfile.mkdtemp(prefix="xr", dir="/tmp")  # AF_UNIX socket paths must stay under 108 bytes
    env = _env(
        DEMO_OUT=str(tmp_path / "demo"),
        RAY_PORT=str(base),
        RAY_DASHBOARD_PORT=str(base + 8),
        DEMO_TRAIN="0",
        RAY_TMPDIR=ray_tmp,
    )
    try:
        done = subprocess.run(
            ["bash", str(ROOT / "scripts/demo.sh")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower() and "stopping the Ray head" in out
    manifests = list((tmp_path / "demo/shards").glob("*/*/manifest.json"))
    assert {m.parent.parent.name for m in manifests} >= {"coco_panoptic", "coco_instance"}
    # the paper's val/test splits that the demo data has, so that stage 3 is scored on the paper's sets
    built = {f"{m.parent.parent.name}/{m.parent.name}" for m in manifests}
    vgd = {f"coco_vgd/val_{p}" for p in ("point", "scribble", "box", "mask")}
    assert built >= vgd | {"refcoco/testA", "refcoco/testB", "lisa_reasonseg/test", "grandf_gcg/test"}
    assert "coco_panoptic/train" in out  # the summary printed what was written
    # the head it started is gone: nothing answers on its dashboard port any more
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", base + 8), timeout=5).close()
