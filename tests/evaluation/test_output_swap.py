"""``evaluate.py``'s ``--out`` is all-new or all-old: a run killed at any of its writes leaves the previous
complete output (a killed ``--export`` into a used ``--out`` once left ``inference.json`` of the new export
beside ``results.json`` of the old one). Each kill is a SIGKILL of a child: before its k-th ``os.replace``
(every file the evaluation commits), and at the swap's own steps (``XSAM_FAULT_KILL_AT``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrate import evaluate
from pipelines import storage
from pipelines.errors import run_cli
from tests.support.evaluation import write_jsonl
from tests.support.exports import write_debug_export

ROOT = Path(__file__).resolve().parents[2]
SET = "refcoco/val"
_CHILD = """
import os, signal, sys
k = int(sys.argv[1])
if k:
    real, n = os.replace, [0]
    def replace(*a, **kw):
        n[0] += 1
        if n[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **kw)
    os.replace = replace
if os.environ.get("NO_EXCHANGE"):  # a file system without renameat2(RENAME_EXCHANGE)
    import pipelines.storage
    pipelines.storage._exchange = lambda a, b: False
from orchestrate import evaluate
from pipelines.errors import run_cli
sys.exit(run_cli(evaluate.main, sys.argv[2:]))
"""


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` (``inference.json`` without its wall time)."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "inference.json":
                d = json.loads(data)
                d.pop("seconds", None)
                data = json.dumps(d, sort_keys=True).encode()
            files[str(p.relative_to(out))] = data
    return files


def _run(argv: list[str], k: int = 0, **env: str) -> int:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(k), *argv], env=e, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    return proc.returncode


def _kill_everywhere(runs: dict[str, list[str]], out: Path) -> int:
    """Alternate the two runs, killing each at every point; after every kill ``out`` is one complete run's
    output. Returns how many kills there were."""
    snaps = {}
    for name in ("old", "new"):
        assert _run(runs[name]) == 0
        snaps[name] = _snapshot(out)
    assert snaps["old"] != snaps["new"]
    state = {"current": "new", "kills": 0}

    def attempt(k: int = 0, **env: str) -> int:
        """One run writing the generation ``out`` does not hold, killed at ``k`` / ``env``."""
        other = "old" if state["current"] == "new" else "new"
        rc = _run(runs[other], k, **env)
        if env.get("XSAM_FAULT_KILL_AT") == "moved_aside":  # between the two renames: --out is missing
            assert not out.exists()  # until the next run, or recover_staged, finishes the swap
            assert storage.recover_staged(str(out))
        now = _snapshot(out)
        assert now in (snaps["old"], snaps["new"]), (k, env, sorted(now))
        state["current"] = "old" if now == snaps["old"] else "new"
        state["kills"] += rc != 0
        return rc

    k = 1
    while attempt(k) != 0:  # before each os.replace of a run, until a run gets past its last one
        k += 1
    for point in ("staged", "swapped"):
        assert attempt(XSAM_FAULT_KILL_AT=point) != 0
    for point in ("moved_aside", "swapped"):  # the two-rename swap of file systems that cannot exchange
        assert attempt(XSAM_FAULT_KILL_AT=point, NO_EXCHANGE="1") != 0
    assert _run(runs["old"]) == 0 and _snapshot(out) == snaps["old"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(storage.STAGE_MARK)], "stale staging"
    return state["kills"]


def test_a_killed_scoring_leaves_the_old_or_the_new_output(demo_val, perfect, tmp_path):
    datas, shards, _ = demo_val
    lines = perfect[SET]
    worse = [dict(x, masks=[]) if i == 0 else x for i, x in enumerate(lines)]
    out = tmp_path / "eval"
    common = ["--shards", str(shards), "--data-root", str(datas), "--sets", SET, "--out", str(out)]
    common += ["--wandb-mode", "disabled", "-q"]
    runs = {
        "old": ["--predictions", str(write_jsonl(tmp_path / "a.jsonl", lines)), *common],
        "new": ["--predictions", str(write_jsonl(tmp_path / "b.jsonl", worse)), *common],
    }
    assert _kill_everywhere(runs, out) >= 4


@pytest.mark.slow
def test_a_killed_export_evaluation_leaves_the_old_or_the_new_output(demo_val, tmp_path):
    datas, shards, _ = demo_val
    export = write_debug_export(tmp_path / "run" / "stage3" / "export", 3)
    out = tmp_path / "eval"
    common = ["--export", export, "--shards", str(shards), "--data-root", str(datas), "--sets", SET]
    common += ["--out", str(out), "--wandb-mode", "disabled", "--max-new-tokens", "4", "-q"]
    runs = {"old": [*common, "--max-samples", "1"], "new": [*common, "--max-samples", "2"]}
    assert _kill_everywhere(runs, out) >= 6


def test_out_holding_other_files_is_refused_and_kept(demo_val, perfect, tmp_path, capsys):
    datas, shards, _ = demo_val
    out = tmp_path / "eval"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    preds = write_jsonl(tmp_path / "p.jsonl", perfect[SET])
    argv = ["--predictions", str(preds), "--shards", str(shards), "--data-root", str(datas), "--sets", SET]
    assert run_cli(evaluate.main, [*argv, "--out", str(out), "--wandb-mode", "disabled", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.txt" in err[0] and "did not write" in err[0]
    assert (out / "notes.txt").read_text() == "mine"


def test_predictions_inside_out_are_carried_into_the_new_output(demo_val, perfect, tmp_path):
    datas, shards, _ = demo_val
    out = tmp_path / "eval"
    out.mkdir()
    preds = write_jsonl(out / "predictions.jsonl", perfect[SET])
    argv = ["--predictions", str(preds), "--shards", str(shards), "--data-root", str(datas), "--sets", SET]
    assert evaluate.main([*argv, "--out", str(out), "--wandb-mode", "disabled", "-q"]) == 0
    assert preds.read_text() == "".join(json.dumps(x) + "\n" for x in perfect[SET])
    details = json.loads((out / "details.json").read_text())
    assert details["predictions"] == str(preds) and (out / "results.json").exists()
