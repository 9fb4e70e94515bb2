"""The run-folder layout: one module joins every path under a run root
(docs/contracts.md#runs-checkpoints-and-exports)."""

from __future__ import annotations

from pathlib import Path

from orchestrate.run_layout import RunLayout, resolve


def test_local_run_root(tmp_path):
    run = RunLayout(str(tmp_path / "runs" / "a"))
    s2 = run.stage(2)
    assert run.name == "a" and [s.stage for s in run.stages()] == [1, 2, 3]
    assert s2.name == "stage2" and s2.dir == str(tmp_path / "runs" / "a" / "stage2")
    assert s2.export_dir == f"{s2.dir}/export" and s2.metrics_jsonl == f"{s2.dir}/metrics.jsonl"
    assert s2.checkpoint_glob == f"{s2.dir}/checkpoint_*"
    assert s2.local_dir() == Path(s2.dir) and s2.trace_file(1) == Path(s2.dir, "trace", "rank1.jsonl")
    assert s2.default_wandb_dir() == str(Path(s2.dir, "wandb"))


def test_remote_run_root_keeps_wandb_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s3 = RunLayout("memory://bucket/runs/a/").stage(3)
    assert s3.dir == "memory://bucket/runs/a/stage3" and s3.export_dir == f"{s3.dir}/export"
    assert s3.local_dir() is None and s3.trace_file(0) is None
    assert s3.checkpoint_glob == "/bucket/runs/a/stage3/checkpoint_*"  # fsspec paths carry no protocol
    assert s3.default_wandb_dir() == str(tmp_path / "wandb_runs" / "stage3" / "wandb")
    assert RunLayout("memory://bucket/runs/a/").name == "a"


def test_url_helpers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunLayout("file:///x/y").stage(1).local_dir() == Path("/x/y/stage1")
    assert resolve("rel") == str(tmp_path / "rel") and resolve("s3://b/k") == "s3://b/k"
