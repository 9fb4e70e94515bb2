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


# ------------------------------------------------------------------------------------------ E1 prompt names
def xsam_tag_category(name: str) -> str:
    """Port of X-SAM's ``tag_categories`` for one name, without the ``<p>…</p>`` format
    (``[A] xsam/xsam/dataset/map_fns/dataset_map_fns/genseg_map_fn.py:51-61``)."""
    return name.replace("-merged", "").replace("-other", "").replace("-stuff", "").replace("-", " ").lower()


def xsam_eval_names(categories: list[dict]) -> list[str]:
    """X-SAM's eval prompt list: the annotation file's categories sorted by id, names through
    ``tag_categories`` (``[A] xsam/xsam/dataset/genseg_dataset.py:191-192,233,258``,
    ``[A] xsam/xsam/dataset/ovseg_dataset.py:97-98,123``); whitespace collapsed as our phrases are."""
    return [" ".join(xsam_tag_category(c["name"]).split()) for c in sorted(categories, key=lambda c: c["id"])]


def _evs(source: str, categories: list[dict]):
    from orchestrate.evaluation import ground_truth as gt

    return gt.EvalSet(
        name=f"{source}/val",
        source=source,
        split="val",
        task="genseg",
        kind="panoptic",
        folder="",
        shards=[],
        num_samples=0,
        categories={int(c["id"]): bool(c.get("isthing", 1)) for c in categories},
        category_names={int(c["id"]): c["name"] for c in categories},
    )


def test_coco_prompt_is_xsams_eval_list_on_the_real_categories(real_data):
    """All 133 COCO panoptic categories (panopticapi's file): the prompt is X-SAM's, e.g. 'wall', 'sky'."""
    from orchestrate.evaluation import ground_truth as gt

    cats = json.loads((real_data / "cocodataset+panopticapi__panoptic_coco_categories.json").read_text())
    got = [p for _, p in gt.prompt_vocabulary(_evs("coco_panoptic", cats))]
    assert len(got) == 133 and got == xsam_eval_names(cats)
    assert {"wall", "sky", "floor", "food", "building", "water", "window"} <= set(got)
    assert not [p for p in got if p.endswith(" other")]


# Mask2Former's ADE20K_150_CATEGORIES (the names prepare_ade20k_pan_seg.py writes into
# ade20k_panoptic_val.json, which X-SAM's ovseg dataset reads): a few entries, by id
# (facebookresearch/Mask2Former mask2former/data/datasets/register_ade20k_panoptic.py:8-160)
MASK2FORMER_ADE = {
    1: "building",
    6: "road, route",
    8: "window ",
    44: "chest of drawers, chest, bureau, dresser",
    65: "toilet, can, commode, crapper, pot, potty, stool, throne",
    149: "flag",
}


def test_ade20k_prompt_is_xsams_eval_list(demo_val):
    """ADE20K panoptic and semantic: the synonym lists of Mask2Former's annotation file through
    ``tag_categories`` (LISA's single names before: 'windowpane', 'road'); instance: LISA's 100 thing names,
    which equal X-SAM's."""
    from orchestrate.evaluation import ground_truth as gt
    from pipelines.sources.ade20k import DATA, class_names, thing_classes

    datas, shards, names = demo_val
    m2f_names = json.loads((DATA / "ade20k_classes_xsam.json").read_text())
    assert all(m2f_names[i] == n for i, n in MASK2FORMER_ADE.items())
    file_cats = [{"id": i, "name": n} for i, n in enumerate(m2f_names)]  # ade20k_panoptic_val.json's
    for source in ("ade20k_panoptic", "ade20k_semantic"):
        name = next(n for n in names if n.startswith(source + "/"))
        got = [p for _, p in gt.prompt_vocabulary(gt.open_set(str(shards), str(datas), name))]
        assert got == xsam_eval_names(file_cats), source
        assert got[6] == "road, route" and got[8] == "window"
    name = next(n for n in names if n.startswith("ade20k_instance/"))
    got = gt.prompt_vocabulary(gt.open_set(str(shards), str(datas), name))
    lisa = [" ".join(class_names()[i].lower().replace("_", " ").split()) for i in thing_classes()]
    assert [p for _, p in got] == lisa


def test_the_build_and_the_prompt_use_one_vocabulary(demo_val):
    """A genseg/ovseg val sample lists the whole vocabulary in id order: the very phrases the evaluation
    prompts with, for COCO (demo categories through X-SAM's code path) and ADE20K."""
    from orchestrate.evaluation import ground_truth as gt

    datas, shards, names = demo_val
    for source in ("coco_panoptic", "coco_instance", "ade20k_panoptic", "ade20k_semantic", "ade20k_instance"):
        name = next(n for n in names if n.startswith(source + "/"))
        evs = gt.open_set(str(shards), str(datas), name)
        sample = next(gt.iter_shard_samples(evs, evs.shards[0]))
        assert sorted(sample.phrases) == sorted(p for _, p in gt.prompt_vocabulary(evs)), source
    evs = gt.open_set(str(shards), str(datas), next(n for n in names if n.startswith("coco_panoptic/")))
    cats = [{"id": c, "name": n} for c, n in evs.category_names.items()]
    assert [p for _, p in gt.prompt_vocabulary(evs)] == xsam_eval_names(cats)
