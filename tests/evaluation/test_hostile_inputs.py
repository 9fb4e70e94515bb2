"""Hostile predictions files and images: each is refused in one line (exit 2) before it costs unbounded time
or memory. The GCG ``<p>`` parse is one forward scan (the regex it replaces was quadratic: 120 KB of ``text``
took 21 s, 900 KB hung); a ``text`` has a length limit; an RLE ``counts`` longer than any RLE of its mask
size is refused from its length; a deeply nested line is an error, not a RecursionError; a FIFO or a device
as ``--predictions`` or ``--image`` is refused rather than blocked on or read forever."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrate import evaluate, predict
from orchestrate.evaluation.predictions import (
    MAX_LINE_BYTES,
    MAX_TEXT_CHARS,
    max_counts_chars,
    phrase_spans,
    rle_problem,
)
from pipelines.errors import run_cli
from tests.support.evaluation import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
_REGEX = re.compile(r"<p>(.*?)</p>", re.DOTALL)


def _child(imports: str, body: str, *, cpu_s: int | None = None, extra_mb: int | None = None):
    """Run ``imports`` then ``body`` in a fresh Python, with limits set between the two: ``cpu_s`` seconds
    of CPU time (RLIMIT_CPU: the kernel stops the child; the machine's load does not count), ``extra_mb`` MB
    of address space beyond what the imports took (RLIMIT_AS)."""
    limits = "import resource\n"
    if cpu_s is not None:
        limits += f"resource.setrlimit(resource.RLIMIT_CPU, ({cpu_s}, {cpu_s + 5}))\n"
    if extra_mb is not None:
        limits += (
            'vm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmSize:"))\n'
            f"limit = vm * 1024 + {extra_mb} * 2**20\n"
            "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        )
    code = textwrap.dedent(imports) + limits + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)


# ------------------------------------------------------------------------------------------ <p> parse
def test_phrase_spans_find_what_the_regex_finds():
    rng = random.Random(0)
    pieces = ["<p>", "</p>", "a", " b ", "<", "p>", "</", ".", "\n", "<p><p>", "</p></p>"]
    texts = ["", "<p>a</p>", "<p> a </p> and <p>b</p>", "<p>open", "</p><p>x</p>", "<p><p>y</p></p>"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(2000)]
    for t in texts:
        assert phrase_spans(t) == [s.strip() for s in _REGEX.findall(t)], t


def test_the_phrase_parse_of_900_kb_is_linear():
    """900 KB of unclosed ``<p>``: the regex retries every ``<p>`` to the end (~20 min of CPU); one scan takes
    milliseconds. Bounded by CPU time (RLIMIT_CPU, 60 s: a margin of 10^4 for the scan, and no wall clock)."""
    body = """
    text = "<p>" * 300_000 + "x"
    assert phrase_spans(text) == []
    assert phrase_spans(text + "</p>") == ["<p>" * 299_999 + "x"]
    print("ok")
    """
    proc = _child("from orchestrate.evaluation.predictions import phrase_spans\n", body, cpu_s=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------ limits
def _refused(demo_val, tmp_path, capsys, path: Path, sets: str = "grandf_gcg/val") -> str:
    datas, shards, _ = demo_val
    argv = ["--predictions", str(path), "--shards", str(shards), "--data-root", str(datas), "--sets", sets]
    argv += ["--out", str(tmp_path / "o"), "--wandb-mode", "disabled", "-q"]
    assert run_cli(evaluate.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_text_over_the_limit_is_refused_naming_the_key(demo_val, perfect, tmp_path, capsys):
    lines = [dict(x) for x in perfect["grandf_gcg/val"]]
    lines[1]["text"] = "<p>" * (MAX_TEXT_CHARS // 3 + 1)
    err = _refused(demo_val, tmp_path, capsys, write_jsonl(tmp_path / "p.jsonl", lines))
    assert f"(key {lines[1]['key']!r})" in err and f"more than {MAX_TEXT_CHARS}" in err


def test_an_rle_longer_than_its_mask_allows_is_refused_from_its_length(demo_val, perfect, tmp_path, capsys):
    lines = [json.loads(json.dumps(x)) for x in perfect["refcoco/val"]]
    rle = lines[0]["masks"][0]["rle"]
    h, w = rle["size"]
    rle["counts"] = "0" * (max_counts_chars(h * w) + 1)
    err = _refused(demo_val, tmp_path, capsys, write_jsonl(tmp_path / "p.jsonl", lines), "refcoco/val")
    assert f"(key {lines[0]['key']!r})" in err and "more than an RLE of" in err
    # the bound holds for every RLE: the longest one of a mask (alternating pixels) stays under it
    import numpy as np
    from pycocotools import mask as mask_utils

    m = np.zeros((5, 7), np.uint8, order="F")
    m.ravel(order="F")[1::2] = 1
    counts = mask_utils.encode(m)["counts"].decode()
    assert rle_problem(counts, 35) is None and len(counts) <= max_counts_chars(35)


def test_a_120m_character_counts_is_refused_within_bounded_memory(tmp_path):
    """The probe's line (a 120 M-character ``counts``): refused by the line limit while reading it, in a
    child whose address space may grow by 1 GiB (decoding it took several GB)."""
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write('{"key": "refcoco/val/x", "masks": [{"label": 0, "rle": {"size": [480, 640], "counts": "')
        for _ in range(120):
            f.write("1" * 1_000_000)
        f.write('"}}]}\n')
    imports = """
    from orchestrate.evaluation.eval_errors import EvaluationError
    from orchestrate.evaluation.predictions import index_predictions
    """
    body = f"""
    try:
        index_predictions({str(path)!r})
    except EvaluationError as e:
        print(e)
    """
    proc = _child(imports, body, extra_mb=1024)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"big.jsonl:1: a line longer than {MAX_LINE_BYTES} bytes" in proc.stdout


def test_a_deeply_nested_line_is_one_error(demo_val, perfect, tmp_path, capsys):
    lines = perfect["refcoco/val"]
    path = tmp_path / "p.jsonl"
    deep = '{"key": "refcoco/val/x", "text": ' + "[" * 200_000 + "]" * 200_000 + "}"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines[:1]) + deep + "\n")
    err = _refused(demo_val, tmp_path, capsys, path, "refcoco/val")
    assert "p.jsonl:2: not valid JSON: nested too deeply" in err


# ------------------------------------------------------------------------------------------ not files
@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder"])
def test_predictions_that_are_not_a_regular_file_are_refused(demo_val, tmp_path, kind):
    """In a child with a timeout: opening a FIFO used to block until a writer came (forever)."""
    datas, shards, _ = demo_val
    path = {"fifo": tmp_path / "fifo.jsonl", "dev_zero": Path("/dev/zero"), "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    cmd = [sys.executable, str(ROOT / "orchestrate/evaluate.py"), "--predictions", str(path)]
    cmd += ["--shards", str(shards), "--data-root", str(datas), "--out", str(tmp_path / "o"), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    want = {"fifo": "this is a FIFO", "dev_zero": "this is a device", "folder": "not a file"}[kind]
    assert len(err) == 1 and str(path) in err[0] and want in err[0], err


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "too_big"])
def test_an_image_that_is_not_a_small_regular_file_is_refused(tmp_path, capsys, kind):
    from pipelines.build_options import DEFAULT_MAX_IMAGE_BYTES

    path = {"fifo": tmp_path / "a.jpg", "dev_zero": Path("/dev/zero"), "too_big": tmp_path / "b.jpg"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "too_big":
        with open(path, "wb") as f:
            f.truncate(DEFAULT_MAX_IMAGE_BYTES + 1)  # sparse: no disk used
    argv = ["--export", str(tmp_path / "no-export"), "--image", str(path), "--prompt", "<p>dog</p>"]
    assert run_cli(predict.main, [*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = {"fifo": "not a regular file", "dev_zero": "not a regular file", "too_big": "(--max-image-bytes)"}[
        kind
    ]
    assert len(err) == 1 and str(path) in err[0] and want in err[0], err
