"""Run roots, checkpoints and exports on object storage
(docs/scale.md#storage-s3-gcs-and-shared-file-systems), against a real S3-protocol endpoint: moto's server,
started in this process on a free local port (nothing leaves the machine). Our storage layer reaches it
through s3fs, Ray Train's ``storage_path`` through pyarrow's S3 file system; ``AWS_ENDPOINT_URL`` points both
at it, as it would at MinIO or any S3-compatible store.
"""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest

from orchestrate.fingerprint import read_fingerprints
from pipelines import storage
from xsam_model.export import Export, ExportError, write_export

BUCKET = "xsam-test"


@pytest.fixture(scope="module")
def s3() -> str:
    """``s3://<bucket>`` on a moto server; the AWS variables set for this module (and the Ray workers it
    starts, which inherit them)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        fs, _ = storage.fs_and_path(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        try:
            yield f"s3://{BUCKET}"
        finally:
            server.stop()


def _pyarrow_put(url: str, data: bytes) -> None:
    """Write ``url`` through pyarrow (as Ray Train's workers do), not through our s3fs instance."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(url)
    with fs.open_output_stream(path) as f:
        f.write(data)


def test_json_and_atomic_writes_and_listings_on_s3(s3):
    fs, root = storage.fs_and_path(f"{s3}/layer")
    storage.write_json(fs, f"{root}/a.json", {"a": 1})
    assert storage.read_json(fs, f"{root}/a.json") == {"a": 1}
    with pytest.raises(RuntimeError), storage.atomic_write(fs, f"{root}/b.bin") as f:
        f.write(b"half")
        raise RuntimeError("writer died")
    assert fs.ls(root, detail=False) == [f"{root}/a.json"]  # nothing left by the failed write
    # a file another process writes after we listed the folder is seen at once (no stale listing cache)
    _pyarrow_put(f"{s3}/layer/by-worker.json", b"{}")
    fs2, _ = storage.fs_and_path(f"{s3}/layer")
    assert sorted(fs2.ls(root, detail=False)) == [f"{root}/a.json", f"{root}/by-worker.json"]
    assert fs2.glob(f"{root}/*.json") == [f"{root}/a.json", f"{root}/by-worker.json"]


def test_line_log_on_s3_uploads_whole_and_continues_after_restart(s3):
    url = f"{s3}/run/stage1/metrics.jsonl"
    fs, path = storage.fs_and_path(url)
    log = storage.LineLog(url, sync_every_s=3600)
    for step in (1, 2, 3):
        log.write(json.dumps({"step": step}))
    assert not fs.exists(path)  # nothing uploaded before the interval or close
    log.close()
    restarted = storage.LineLog(url, sync_every_s=0)  # a restarted attempt: the same log, continued
    restarted.write(json.dumps({"step": 3}))
    assert [json.loads(x)["step"] for x in fs.cat_file(path).decode().splitlines()] == [1, 2, 3, 3]
    restarted.close()


def test_line_log_on_a_local_path_flushes_every_line(tmp_path):
    for url in (str(tmp_path / "a" / "m.jsonl"), f"file://{tmp_path}/b/m.jsonl"):
        log = storage.LineLog(url)
        log.write("one")
        local = url.removeprefix("file://")
        assert open(local).read() == "one\n"  # readable while the run goes on
        log.close()
        again = storage.LineLog(url)
        again.write("two")
        again.close()
        assert open(local).read() == "one\ntwo\n"


def test_export_written_replaced_and_read_back_on_s3(s3):
    import torch

    url = f"{s3}/exports/stage1/export"
    state = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b.bias": torch.ones(4)}
    write_export(url, state, stage=1, config={"cfg": 1}, lineage={})
    write_export(
        url, {k: v * 2 for k, v in state.items()}, stage=1, config={"cfg": 2}, lineage={}
    )  # replaced
    info = Export.find(url, 1)
    assert info.keys == {
        "a.weight": {"dtype": "F32", "shape": (2, 3)},
        "b.bias": {"dtype": "F32", "shape": (4,)},
    }
    assert info.config == {"cfg": 2} and info.lineage["tensors"] == 2
    got = info.state()
    assert all(torch.equal(got[k], state[k] * 2) for k in state)
    fs, path = storage.fs_and_path(f"{s3}/exports/stage1")
    assert sorted(os.path.basename(p) for p in fs.find(path)) == [
        "config.json",
        "lineage.json",
        "model.safetensors",
    ]  # the temporary export folders are gone
    blob = fs.cat_file(f"{path}/export/model.safetensors")
    fs.pipe_file(f"{path}/export/model.safetensors", blob[:-5])  # an interrupted upload
    with pytest.raises(ExportError, match="truncated or damaged safetensors file"):
        Export.find(url, 1)


@pytest.mark.slow  # a forked writer per step, each talking to the moto server
def test_an_export_on_s3_survives_a_kill_at_every_step_of_its_replacement(s3):
    """As on a local disk (tests/orchestrate/test_exports.py), on an object store: no folder rename there,
    so the old export is copied aside, the lineage removed first and written last. Killed before every
    copy, move or delete in turn, a complete, verified export is found afterwards, and the next write leaves
    only the export."""
    import torch

    from tests.support.faults import write_export_killed_at

    old = {"a": torch.zeros(3), "b": torch.ones(2)}
    new = {k: v + 7 for k, v in old.items()}
    kills = 0
    for k in range(1, 60):
        url = f"{s3}/kills/k{k}/export"
        write_export(url, old, stage=1, config={"v": "old"}, lineage={})
        code = write_export_killed_at(url, k, new, config={"v": "new"})
        found = Export.find(url, 1)
        got = found.state()
        assert all(torch.equal(got[n], (old if found.config["v"] == "old" else new)[n]) for n in old), k
        write_export(url, new, stage=1, config={"v": "again"}, lineage={})
        fs, path = storage.fs_and_path(f"{s3}/kills/k{k}")
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) == ["export"], k
        if code == 0:
            break
        assert code == -9, code
        kills += 1
    assert kills >= 8


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stage_checkpoints_export_and_resume_on_s3(s3, train_shards, ray_local):
    """A debug stage 1 with ``--run-root s3://…``: Ray Train writes its checkpoint there, rank 0 the export;
    the driver sees the checkpoint (``--resume never`` refused) and a second submission with more steps
    resumes from it; the export reads back and loads into the model."""
    from orchestrate import train_checkpoints
    from orchestrate.run_errors import RunSetupError
    from orchestrate.run_layout import RunLayout
    from orchestrate.runner import RunArgs, fit, prepare
    from xsam_model import build_xsam, load_exported

    run_root = f"{s3}/run"

    def plan(steps: int, **kw):
        return prepare(
            RunArgs(
                stage=1,
                flavor="debug",
                shards=str(train_shards),
                run_root=run_root,
                num_workers=2,
                max_steps=steps,
                checkpoint_every=2,
                wandb_mode="disabled",
                **kw,
            )
        )

    layout = RunLayout(run_root).stage(1)
    assert fit(plan(2), callbacks=[]).metrics["step"] == 2
    assert [s for s, _ in train_checkpoints.list_checkpoints(layout)] == [2]
    with pytest.raises(RunSetupError, match="already holds 1 checkpoints"):
        plan(4, resume="never")
    assert fit(plan(4), callbacks=[]).metrics["step"] == 4
    assert [s for s, _ in train_checkpoints.list_checkpoints(layout)] == [2, 4]

    assert sorted(read_fingerprints(layout.metrics_jsonl)) == [1, 2, 3, 4]  # metrics.jsonl on S3 too
    info = Export.find(layout.export_dir, 1)
    assert (
        info.lineage["steps"] == 4 and info.lineage["restarts"] == 1 and info.lineage["run_root"] == run_root
    )
    model = build_xsam("debug")
    state = info.state()
    assert set(state) == set(info.keys) and state
    load_exported(model, state, stage=1, strict=True)  # every stage-1 parameter, nothing else
