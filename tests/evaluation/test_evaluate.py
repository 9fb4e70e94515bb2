"""orchestrate/evaluate.py end to end on the demo's val sets: perfect, perturbed and bad predictions."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrate import evaluate
from orchestrate.evaluation import EvaluationError
from orchestrate.evaluation import ground_truth as gt
from orchestrate.evaluation.run import score_predictions
from pipelines.errors import run_cli
from tests.evaluation.test_metrics import rle
from tests.support.evaluation import evaluate_argv, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _all(perfect: dict[str, list[dict]]) -> list[dict]:
    return [line for lines in perfect.values() for line in lines]


def _perturb(name: str, lines: list[dict]) -> list[dict]:
    """Drop the last predicted segment/instance/mask of every sample (the first sample loses all of them)."""
    out = copy.deepcopy(lines)
    for i, line in enumerate(out):
        for field in ("panoptic", "instances", "masks"):
            if line.get(field):
                line[field] = [] if i == 0 else line[field][:-1]
    return out


def test_demo_builds_every_kind_of_set(demo_val):
    kinds = {gt.SOURCE_KINDS[n.split("/")[0]] for n in demo_val[2]}
    assert kinds == set(gt.SOURCE_KINDS.values())


def test_perfect_predictions_score_100_on_every_demo_val_set(demo_val, perfect, no_java, tmp_path, capsys):
    datas, shards, names = demo_val
    preds = write_jsonl(tmp_path / "predictions.jsonl", _all(perfect))
    rc = evaluate.main(
        [
            "--predictions",
            str(preds),
            "--shards",
            str(shards),
            "--data-root",
            str(datas),
            "--out",
            str(tmp_path / "eval"),
            "--wandb-mode",
            "offline",
            # the standard definitions: X-SAM's (paper) GCG paints overlapping phrase masks over each other,
            # so a perfect prediction of refcocog_gcg's overlapping masks is not 100 there (test_protocol.py)
            "--protocol",
            "standard",
        ]
    )
    assert rc == 0
    results = json.loads((tmp_path / "eval/results.json").read_text())
    assert sorted(results) == sorted(names)
    for name, metrics in results.items():
        assert metrics, name
        for metric, value in metrics.items():
            assert value is None or value == pytest.approx(100.0), (name, metric, value)
    details = json.loads((tmp_path / "eval/details.json").read_text())["sets"]
    assert all(details[n]["samples"] == len(perfect[n]) for n in names)
    gcg = [n for n in names if gt.SOURCE_KINDS[n.split("/")[0]] == "gcg"]
    assert gcg and all(any("java not found" in note for note in details[n]["notes"]) for n in gcg)
    assert list((tmp_path / "eval/wandb").rglob("*.wandb")), "no offline wandb run written"
    table = capsys.readouterr().out
    assert all(n in table for n in names) and "PQ 100.00" in table


def test_perturbed_predictions_score_below_100(demo_val, perfect, no_java):
    datas, shards, names = demo_val
    results = {}
    for name in names:
        path = write_jsonl(
            shards.parent / f"perturbed-{name.replace('/', '_')}.jsonl", _perturb(name, perfect[name])
        )
        # standard: under paper a GCG image left without masks leaves AP50/mIoU (X-SAM's population)
        results[name] = score_predictions(
            str(path), str(shards), str(datas), sets=[name], protocol="standard"
        )[name]
    headline = {
        "panoptic": "PQ",
        "semantic": "mIoU",
        "instance": "AP",
        "vgd": "AP",
        "refer": "cIoU",
        "grefer": "cIoU",
        "reason": "gIoU",
        "interactive": "gIoU",
        "gcg": "mIoU",
    }
    for name, metrics in results.items():
        value = metrics[headline[gt.SOURCE_KINDS[name.split("/")[0]]]]
        assert value < 100.0 - 1e-9, (name, metrics)


@pytest.mark.ray
def test_parallel_scoring_equals_inline(demo_val, perfect, no_java, ray_local, tmp_path):
    datas, shards, names = demo_val
    lines = [line for n in names for line in _perturb(n, perfect[n])]
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    inline = score_predictions(str(path), str(shards), str(datas), num_workers=1)
    parallel = score_predictions(str(path), str(shards), str(datas), num_workers=2)
    assert json.dumps(inline, sort_keys=True) == json.dumps(parallel, sort_keys=True)
    assert any(len(gt.open_set(str(shards), str(datas), n).shards) > 1 for n in names)


# ------------------------------------------------------------------------------------------ bad input
def _run_bad(demo_val, tmp_path, capsys, lines: list[dict] | str, sets: str | None = None) -> str:
    datas, shards, _ = demo_val
    path = tmp_path / "bad.jsonl"
    if isinstance(lines, str):
        path.write_text(lines)
    else:
        write_jsonl(path, lines)
    argv = evaluate_argv(path, shards, datas, tmp_path / "o")
    if sets:
        argv += ["--sets", sets]
    assert run_cli(evaluate.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def _first(perfect, source: str) -> tuple[str, list[dict]]:
    name = next(n for n in perfect if n.startswith(source + "/"))
    return name, copy.deepcopy(perfect[name])


def test_missing_extra_and_duplicated_keys(demo_val, perfect, tmp_path, capsys):
    name, lines = _first(perfect, "refcoco")
    err = _run_bad(demo_val, tmp_path, capsys, lines[1:])
    assert f"1 keys of {name} have no prediction: {lines[0]['key']}" in err
    extra = dict(lines[0], key=f"{name}/not_a_sample")
    err = _run_bad(demo_val, tmp_path, capsys, [*lines, extra])
    assert f"not samples of {name}" in err and f"{name}/not_a_sample (line {len(lines) + 1})" in err
    err = _run_bad(demo_val, tmp_path, capsys, [*lines, lines[0]])
    assert "1 duplicated keys" in err and f"lines 1 and {len(lines) + 1}" in err


def test_truncated_line_and_bad_fields(demo_val, perfect, tmp_path, capsys):
    name, lines = _first(perfect, "refcoco")
    text = "".join(json.dumps(x) + "\n" for x in lines)
    err = _run_bad(demo_val, tmp_path, capsys, text[:-20])
    assert f"bad.jsonl:{len(lines)}: not valid JSON (truncated last line?)" in err
    bad = copy.deepcopy(lines)
    bad[1]["maskz"] = []
    err = _run_bad(demo_val, tmp_path, capsys, bad)
    assert "bad.jsonl:2 (key " in err and "unknown field(s) ['maskz']" in err


def test_rle_of_wrong_size_and_label_beyond_turns(demo_val, perfect, tmp_path, capsys):
    name, lines = _first(perfect, "refcoco")
    bad = copy.deepcopy(lines)
    h, w = bad[0]["masks"][0]["rle"]["size"]
    bad[0]["masks"][0]["rle"] = rle(np.ones((h + 1, w), bool))
    err = _run_bad(demo_val, tmp_path, capsys, bad)
    assert (
        f"bad.jsonl:1 (key '{lines[0]['key']}'): masks[0]: RLE size [{h + 1}, {w}] != image size [{h}, {w}]"
        in err
    )
    bad = copy.deepcopy(lines)
    bad[2]["masks"][0]["label"] = 1
    err = _run_bad(demo_val, tmp_path, capsys, bad)
    assert "bad.jsonl:3 (key" in err and "label 1 outside [0, 1) (1 <SEG> turns)" in err


def test_overlapping_panoptic_and_unknown_category(demo_val, perfect, tmp_path, capsys):
    name, lines = _first(perfect, "coco_panoptic")
    bad = copy.deepcopy(lines)
    bad[0]["panoptic"].append(dict(bad[0]["panoptic"][0]))
    err = _run_bad(demo_val, tmp_path, capsys, bad)
    assert "bad.jsonl:1 (key" in err and "'panoptic' segments overlap" in err
    bad = copy.deepcopy(lines)
    bad[1]["panoptic"][0]["category_id"] = 100000
    err = _run_bad(demo_val, tmp_path, capsys, bad)
    assert "bad.jsonl:2 (key" in err and f"category_id 100000 is not a category of {name}" in err


def test_set_not_built_or_not_scorable(demo_val, perfect, tmp_path, capsys):
    name, lines = _first(perfect, "refcoco")
    err = _run_bad(demo_val, tmp_path, capsys, lines, sets="refcoco/testB")
    assert "refcoco/testB was not built" in err
    err = _run_bad(demo_val, tmp_path, capsys, lines, sets="refcoco")
    assert "'refcoco' is not <source>/<split>" in err


def test_cli_bad_input_is_exit_2_one_line_no_traceback(demo_val, perfect, tmp_path):
    datas, shards, _ = demo_val
    name, lines = _first(perfect, "refcoco")
    path = write_jsonl(tmp_path / "p.jsonl", lines[1:])
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "orchestrate/evaluate.py"),
            "--predictions",
            str(path),
            "--shards",
            str(shards),
            "--data-root",
            str(datas),
            "--out",
            str(tmp_path / "o"),
            "--wandb-mode",
            "disabled",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]  # the rest is progress
    assert errors == [f"error: {path}: 1 keys of {name} have no prediction: {lines[0]['key']}"]
    assert "Traceback" not in proc.stderr


def test_score_predictions_raises_evaluation_error(demo_val, perfect):
    datas, shards, _ = demo_val
    with pytest.raises(EvaluationError, match="cannot read the predictions file"):
        score_predictions(str(Path(datas) / "missing.jsonl"), str(shards), str(datas), sets=["refcoco/val"])


def test_nan_metrics_are_null_in_results(demo_val, perfect, no_java, tmp_path):
    datas, shards, _ = demo_val
    name, lines = _first(perfect, "coco_instance")
    score = score_predictions(
        str(write_jsonl(tmp_path / "p.jsonl", lines)),
        str(shards),
        str(datas),
        out_dir=str(tmp_path / "o"),
        wandb_mode="disabled",
    )
    written = json.loads((tmp_path / "o/results.json").read_text())[name]
    for metric, value in score[name].items():
        assert (written[metric] is None) == math.isnan(value)
