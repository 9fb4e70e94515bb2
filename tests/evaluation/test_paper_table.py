"""X-SAM's published table in the repo and the comparison with a results.json (``paper_table.py``,
``evaluate.py --compare-paper``, ``--sets paper``)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrate import evaluate
from orchestrate.evaluation import ground_truth as gt
from orchestrate.evaluation import paper_table as pt
from pipelines.build.driver import build
from pipelines.errors import run_cli
from tests.support.evaluation import set_lines, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
PAPER_MD = ROOT.parent / "shared" / "reference" / "paper_table.md"  # CI checks ../shared out beside the repo
PAPER_SPLITS = ["val", "test", "testA", "testB", "val_point", "val_scribble", "val_box", "val_mask"]


# ------------------------------------------------------------------------------------------ the md, parsed
def _md_tables(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """``{section heading: (header cells, rows of cells)}`` of every table in the markdown."""
    out, section = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("|") and section and not set(line) <= set("|-"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if section not in out:
                out[section] = (cells, [])
            else:
                out[section][1].append(cells)
    return out


def _number(cell: str) -> float | None:
    m = re.match(r"^(\d+(?:\.\d+)?)", cell)
    return float(m.group(1)) if m else None


def _md_row(section: str, head: list[str], cells: list[str], j: int) -> tuple[str, str]:
    """Our ``(set, metric)`` of the number in column ``j`` of a row of the md's table ``section``."""
    label, col = cells[0], head[j]
    metric_name = {"PQ": "PQ", "AP (mask)": "AP", "AP": "AP", "mIoU": "mIoU"}
    if section.startswith(("Generic", "Open-vocabulary")):
        name = "coco_panoptic/val" if label.startswith("coco semantic") else label
        return name, metric_name[cells[1]]
    if section.startswith("Referring"):
        split = re.search(r"\((\w+)\)", cells[j]).group(1) if "(" in cells[j] else col
        return f"{label.split(' ')[0]}/{split}", "cIoU"
    if section.startswith("Reasoning"):
        split = "val" if label.startswith("val") else "test"
        suffix = "_short" if "short" in label else "_long" if "long" in label else ""
        return f"lisa_reasonseg/{split}", col + suffix
    if section.startswith("Grounded"):
        return f"grandf_gcg/{label}", col
    if section.startswith("Interactive"):
        return "coco_interactive/val", {"mIoU": "gIoU", "cIoU": "cIoU"}[col] + f"_{label}"
    if section.startswith("Visual grounded"):
        return f"coco_vgd/val_{label}", col
    raise AssertionError(f"a table of paper_table.md this test does not know: {section}")


def _md_numbers() -> dict[tuple[str, str], float]:
    numbers = {}
    for section, (head, rows) in _md_tables(PAPER_MD.read_text()).items():
        for cells in rows:
            for j in range(1, len(cells)):
                value = _number(cells[j])
                if value is None or head[j] == "metric":
                    continue
                key = _md_row(section, head, cells, j)
                assert key not in numbers, key
                numbers[key] = value
    return numbers


@pytest.mark.skipif(
    not PAPER_MD.exists(), reason="../shared/reference/paper_table.md is not checked out here"
)
def test_the_table_holds_every_number_of_paper_table_md_and_no_other():
    rows = pt.load_table()[1]
    ours = {(r.set, r.metric): r.paper for r in rows}
    assert len(ours) == len(rows), "two rows for one (set, metric)"
    assert ours == _md_numbers()


def test_every_row_is_a_scored_set_and_cites_its_source():
    header, rows = pt.load_table()
    assert header["flavor"] == pt.PAPER_FLAVOR and "AAAI26_Archive" in header["source"]
    assert len(rows) == 46
    for r in rows:
        assert r.set.split("/")[0] in gt.SOURCE_KINDS, r
        assert r.source.endswith(".png") and "AAAI26_Archive" in r.source, r
    assert pt.paper_sets()[0] == "coco_panoptic/val" and len(pt.paper_sets()) == 22


# ------------------------------------------------------------------------------------------ comparison
def test_a_results_file_without_a_set_gives_not_evaluated_rows():
    rows = pt.compare({"refcoco/val": {"cIoU": 80.0, "gIoU": 70.0}})
    assert len(rows) == len(pt.load_table()[1])  # every row of the paper, none dropped
    by = {(c.row.set, c.row.metric): c for c in rows}
    assert by["refcoco/val", "cIoU"].status == "" and by["refcoco/val", "cIoU"].ours == 80.0
    missing = [c for c in rows if c.row.set != "refcoco/val"]
    assert missing and all(c.ours is None and c.status == "not evaluated" for c in missing)
    # with the built sets known: a set under the shards but not in results is "not evaluated", else "not
    # built"
    rows = pt.compare({}, built=["refcoco+/val"])
    by = {(c.row.set, c.row.metric): c.status for c in rows}
    assert by["refcoco+/val", "cIoU"] == "not evaluated" and by["refcoco/val", "cIoU"] == "not built"


def test_delta_is_ours_minus_the_paper():
    rows = pt.compare({"refcoco/val": {"cIoU": 80.0}, "coco_vgd/val_box": {"AP": 50.25, "AP50": None}})
    by = {(c.row.set, c.row.metric): c for c in rows}
    assert by["refcoco/val", "cIoU"].delta == pytest.approx(80.0 - 85.1)
    assert by["coco_vgd/val_box", "AP"].delta == pytest.approx(50.25 - 49.5)
    assert by["coco_vgd/val_box", "AP50"].delta is None
    assert by["coco_vgd/val_box", "AP50"].status.startswith("undefined")
    table = pt.format_comparison(rows, pt.PAPER_FLAVOR, "paper")
    line = next(x for x in table.splitlines() if x.startswith("refcoco/val "))
    assert line.split()[2:5] == ["80.00", "85.1", "-5.10"]
    assert "+0.75" in next(x for x in table.splitlines() if x.startswith("coco_vgd/val_box ") and " AP " in x)


def test_a_metric_scored_without_its_library_says_why():
    details = {"sets": {"grandf_gcg/val": {"notes": ["METEOR, CIDEr not computed: java not found on PATH"]}}}
    rows = pt.compare({"grandf_gcg/val": {"AP50": 30.0, "mIoU": 60.0}}, details)
    by = {(c.row.set, c.row.metric): c.status for c in rows}
    assert by["grandf_gcg/val", "METEOR"] == "METEOR, CIDEr not computed: java not found on PATH"
    assert by["grandf_gcg/val", "AP50"] == ""


def test_the_flavor_warning_is_one_line_for_any_other_flavor():
    rows = pt.compare({})
    assert "warning" not in pt.format_comparison(rows, "xsam-phi3", "paper")
    other = pt.format_comparison(rows, "xsam-debug", "paper").splitlines()
    warnings = [x for x in other if x.startswith("warning:")]
    assert warnings == ["warning: flavor xsam-debug; the paper's numbers are for X-SAM's flavor xsam-phi3"]
    none = pt.format_comparison(rows, None, "paper")
    assert "warning: no flavor (predictions scored as given)" in none


def test_the_header_shows_the_recorded_protocol_or_unknown():
    assert pt.protocol_of({}, {}) == "unknown"
    assert pt.protocol_of({}, {"protocol": "paper"}) == "paper"
    assert pt.protocol_of({}, {"protocol": {"name": "standard"}}) == "standard"
    assert pt.protocol_of({"protocol": "paper"}, {"sets": {}}) == "paper"
    assert pt.protocol_of({}, {"eval_protocol": "paper"}) == "paper"
    per_set = {"sets": {"a/val": {"protocol": "standard"}, "b/val": {"protocol": {"name": "standard"}}}}
    assert pt.protocol_of({}, per_set) == "standard"
    per_set["sets"]["b/val"]["protocol"] = "paper"  # two protocols in one run: not one name
    assert pt.protocol_of({}, per_set) == "unknown"
    assert "(protocol: standard; flavor: xsam-phi3)" in pt.format_comparison(
        pt.compare({}), "xsam-phi3", "standard"
    )


# ------------------------------------------------------------------------------------------ the CLI
def _eval_folder(tmp_path: Path, results: object, **beside: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "results.json").write_text(json.dumps(results))
    for name, doc in beside.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    return tmp_path / "results.json"


def test_cli_reads_the_flavor_and_protocol_beside_results(tmp_path, capsys):
    path = _eval_folder(
        tmp_path,
        {"refcoco/val": {"cIoU": 85.1}},
        details={"protocol": "paper", "shards": str(tmp_path / "nowhere"), "sets": {}},
        inference={"flavor": "xsam-phi3"},
    )
    assert run_cli(pt.main, [str(path)]) == 0
    out = capsys.readouterr().out
    assert "(protocol: paper; flavor: xsam-phi3)" in out and "warning" not in out
    assert re.search(r"refcoco/val\s+cIoU\s+85\.10\s+85\.1\s+\+0\.00", out)
    assert run_cli(pt.main, [str(path), "--flavor", "xsam-debug"]) == 0
    assert "warning: flavor xsam-debug" in capsys.readouterr().out
    # metadata beside the sets (a recorded protocol) is not a set
    path = _eval_folder(tmp_path / "meta", {"protocol": {"name": "paper"}, "refcoco/val": {"cIoU": 80.0}})
    assert run_cli(pt.main, [str(path)]) == 0
    assert "(protocol: paper; flavor: none)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("{not json", "not a readable results JSON file"),
        ("[1, 2]", "not a results JSON object"),
        ('{"refcoco/val": 3}', "not a results.json"),
    ],
)
def test_cli_bad_file_exits_2_with_one_line(tmp_path, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    p = subprocess.run(
        [sys.executable, "-m", "orchestrate.evaluation.paper_table", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def paper_demo(demo_root, tmp_path_factory) -> tuple[Path, Path, dict[str, list[dict]]]:
    """The demo's val and test splits (every set of the paper's table), with perfect predictions."""
    out = tmp_path_factory.mktemp("paper") / "shards"
    build(str(demo_root), str(out), splits=PAPER_SPLITS)
    names = [n for n in gt.built_sets(str(out)) if n.split("/")[0] in gt.SOURCE_KINDS]
    return demo_root, out, {n: set_lines(out, demo_root, n) for n in names}


def test_sets_paper_expands_to_the_built_sets_of_the_table(paper_demo, demo_val):
    _, shards, _ = paper_demo
    assert pt.expand_sets(["paper"], gt.built_sets(str(shards))) == pt.paper_sets()
    assert pt.expand_sets(["grefcoco/val", "paper", "refcoco/val"], pt.paper_sets())[:2] == [
        "grefcoco/val",
        "coco_panoptic/val",
    ]
    partial = pt.expand_sets(["paper"], gt.built_sets(str(demo_val[1])))  # val splits only: no test/testA
    assert "refcoco/val" in partial and "refcoco/testA" not in partial
    with pytest.raises(pt.EvaluationError, match="none of the paper's sets is built"):
        pt.expand_sets(["paper"], ["grefcoco/val"])


def test_compare_paper_end_to_end_every_scored_key_is_a_key_of_the_table(
    paper_demo, no_java, tmp_path, capsys
):
    datas, shards, perfect = paper_demo
    preds = write_jsonl(tmp_path / "p.jsonl", [x for lines in perfect.values() for x in lines])
    args = ["--predictions", str(preds), "--shards", str(shards), "--data-root", str(datas)]
    rc = evaluate.main([*args, "--sets", "paper", "--out", str(tmp_path / "eval"), "--compare-paper"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "warning: no flavor (predictions scored as given)" in out
    assert "42/46 of the paper's numbers compared" in out  # GCG val/test METEOR, CIDEr need Java (hidden)
    rows = pt.read_eval_folder(str(tmp_path / "eval/results.json")).compare()
    for c in rows:  # the scorers write exactly the keys the table names: every perfect number is 100
        if c.row.metric in ("METEOR", "CIDEr"):
            assert "java not found" in c.status, c
        else:
            assert c.ours == pytest.approx(100.0) and c.status == "", c
    tables = list((tmp_path / "eval/wandb").rglob("paper_table_*.table.json"))
    assert len(tables) == 1, "the comparison is not in the wandb run"
    logged = json.loads(tables[0].read_text())
    assert logged["columns"][:6] == ["benchmark", "set", "metric", "paper_metric", "ours", "paper"]
    assert len(logged["data"]) == 46


def test_compare_paper_says_not_built_for_a_split_the_shards_lack(
    demo_val, perfect, no_java, tmp_path, capsys
):
    datas, shards, names = demo_val  # val splits only
    preds = write_jsonl(tmp_path / "p.jsonl", perfect["refcoco/val"])
    args = ["--predictions", str(preds), "--shards", str(shards), "--data-root", str(datas)]
    rc = evaluate.main(
        [
            *args,
            "--sets",
            "refcoco/val",
            "--out",
            str(tmp_path / "e"),
            "--compare-paper",
            "--wandb-mode",
            "disabled",
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(x.startswith("refcoco/testA ") and x.endswith("[not built]") for x in lines)
    assert any(x.startswith("refcoco+/val ") and x.endswith("[not evaluated]") for x in lines)
    assert any(re.match(r"refcoco/val\s+cIoU\s+100\.00\s+85\.1\s+\+14\.90", x) for x in lines)


# ------------------------------------------------------------------------------------------ the runbook
def _argv(command: str) -> list[str]:
    """The arguments after the script of a runbook command (line continuations joined)."""
    words = shlex.split(command.replace("\\\n", " "))
    return words[next(i for i, w in enumerate(words) if w.endswith(".py")) + 1 :]


def test_the_runbook_prints_its_commands_exactly():
    text = (ROOT / "docs" / "evaluation.md").read_text()
    assert "## Reproducing the paper's table" in text
    assert pt.RUNBOOK_BUILD in text and pt.RUNBOOK_EVALUATE in text


def test_the_runbook_build_makes_exactly_the_papers_sets(demo_root):
    from orchestrate import build_shards
    from pipelines.build.driver import resolve_jobs

    args = build_shards.parse_args(_argv(pt.RUNBOOK_BUILD))
    assert args.preset == "paper"
    jobs = resolve_jobs(str(demo_root), args.sources.split(","), args.splits.split(","), {})
    assert sorted(f"{src.name}/{split}" for src, split, _ in jobs) == sorted(pt.paper_sets())


def test_the_runbook_evaluation_parses_and_names_the_papers_sets(capsys):
    argv = _argv(pt.RUNBOOK_EVALUATE)
    assert argv[argv.index("--protocol") + 1] == "paper"
    try:
        args = evaluate.parse_args(argv)
    except SystemExit:  # an evaluate.py from before --protocol: the rest of the command must still parse
        assert "--protocol" in capsys.readouterr().err
        i = argv.index("--protocol")
        args = evaluate.parse_args(argv[:i] + argv[i + 2 :])
    assert args.sets == "paper" and args.compare_paper and args.use_gpu and args.export


def test_compare_paper_on_an_export_warns_for_its_flavor_and_logs_the_table(
    demo_val, no_java, tmp_path, capsys
):
    from tests.support.exports import write_debug_export

    datas, shards, _ = demo_val
    export = write_debug_export(tmp_path / "stage3" / "export", 3)
    out = tmp_path / "eval"
    argv = ["--export", export, "--shards", str(shards), "--data-root", str(datas), "--out", str(out)]
    rc = evaluate.main([*argv, "--sets", "refcoco/val", "--max-samples", "2", "--compare-paper", "-q"])
    assert rc == 0
    flavor = json.loads((out / "inference.json").read_text())["flavor"]
    assert flavor != pt.PAPER_FLAVOR
    printed = capsys.readouterr().out
    assert f"warning: flavor {flavor}; the paper's numbers are for X-SAM's flavor xsam-phi3" in printed
    assert re.search(r"refcoco/val\s+cIoU\s+\d+\.\d\d\s+85\.1\s+[+-]\d+\.\d\d", printed)
    tables = list((out / "wandb").rglob("paper_table_*.table.json"))
    assert len(tables) == 1 and len(json.loads(tables[0].read_text())["data"]) == 46
