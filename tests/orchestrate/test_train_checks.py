"""Issue 20 item 5 (part): train.py refuses bad arguments at once on the driver, before Ray: exit 2, one line."""

from __future__ import annotations

import pytest

from orchestrate.train import parse_args


def _args(tmp_path, *extra: str) -> list[str]:
    return ["--stage", "1", "--flavor", "debug", "--shards", str(tmp_path / "shards"), *extra]


def test_num_workers_zero_is_refused_not_the_default(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(_args(tmp_path, "--run-root", str(tmp_path / "runs"), "--num-workers", "0"))
    assert e.value.code == 2
    assert "--num-workers 0: needs at least 1 worker" in capsys.readouterr().err


def test_run_root_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        parse_args(_args(tmp_path, "--run-root", str(tmp_path / "runs")))
    assert e.value.code == 2
    assert "is a file, expected a folder" in capsys.readouterr().err


def test_a_run_root_that_does_not_exist_yet_is_accepted(tmp_path):
    args, _ = parse_args(_args(tmp_path, "--run-root", str(tmp_path / "new/runs"), "--num-workers", "1"))
    assert args.num_workers == 1
