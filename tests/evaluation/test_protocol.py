"""``--protocol paper|standard``: X-SAM's evaluation code (``AAAI26_Archive``) vs the benchmarks' own
definitions, each difference checked against a port of the few lines of X-SAM it follows (cited per test)."""

from __future__ import annotations

import json

import pytest

from orchestrate import evaluate
from orchestrate.evaluation import EvaluationError, score_predictions
from orchestrate.evaluation.inference import InferenceOptions
from orchestrate.evaluation.scoring import ScoreOptions
from pipelines.errors import run_cli
from tests.evaluation.helpers import write_jsonl


def _argv(demo_val, tmp_path, path, *extra: str) -> list[str]:
    datas, shards, _ = demo_val
    return [
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
        "-q",
        *extra,
    ]


def test_unknown_protocol_is_exit_2_one_line(demo_val, perfect, tmp_path, capsys):
    name = next(n for n in perfect if n.startswith("refcoco/"))
    path = write_jsonl(tmp_path / "p.jsonl", perfect[name])
    assert run_cli(evaluate.main, _argv(demo_val, tmp_path, path, "--protocol", "papr")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --protocol must be paper or standard, got 'papr'"]
    assert not (tmp_path / "o").exists()
    with pytest.raises(EvaluationError, match="--protocol"):
        ScoreOptions(protocol="xsam")
    with pytest.raises(EvaluationError, match="--protocol"):
        InferenceOptions(protocol="")


@pytest.mark.parametrize("protocol", [None, "paper", "standard"])
def test_details_json_records_the_protocol(demo_val, perfect, tmp_path, capsys, protocol):
    name = next(n for n in perfect if n.startswith("refcoco/"))
    path = write_jsonl(tmp_path / "p.jsonl", perfect[name])
    extra = ("--protocol", protocol) if protocol else ()
    assert run_cli(evaluate.main, _argv(demo_val, tmp_path, path, *extra)) == 0
    details = json.loads((tmp_path / "o" / "details.json").read_text())
    want = protocol or "paper"
    assert details["protocol"] == want and details["sets"][name]["protocol"] == want
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(results) == [name]  # results.json keeps its shape: every top-level key is a set


def test_score_predictions_takes_the_protocol(demo_val, perfect):
    datas, shards, _ = demo_val
    name = next(n for n in perfect if n.startswith("refcoco/"))
    with pytest.raises(EvaluationError, match="--protocol"):
        score_predictions("unused.jsonl", str(shards), str(datas), sets=[name], protocol="both")
