"""Inference over the demo's val sets with debug exports: evaluate.py --export, Ray workers, predict.py.

A debug export's predictions are scored by the evaluation's own checks (keys, RLE sizes, labels, categories,
overlaps), so a file that scores is a valid predictions file; the metrics of random weights are not asserted.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrate import evaluate, predict
from orchestrate.evaluation.export_inference import InferenceOptions, run_inference
from orchestrate.evaluation.run import score_predictions
from pipelines.errors import run_cli
from tests.support.exports import write_debug_export

FAST_SETS = ["refcoco/val", "coco_panoptic/val", "grandf_gcg/val", "coco_vgd/val_box"]


@pytest.fixture(scope="module")
def export3(tmp_path_factory):
    return write_debug_export(tmp_path_factory.mktemp("exports") / "stage3" / "export", 3)


@pytest.fixture
def quiet_java(monkeypatch):
    """METEOR/CIDEr start Java (slow): hidden in the fast tests (the note says so)."""
    monkeypatch.setattr("orchestrate.evaluation.captions.shutil.which", lambda name: None)


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in open(path).read().splitlines()]


def test_export_then_predictions_give_the_same_results(demo_val, export3, tmp_path, quiet_java, capsys):
    """evaluate.py --export on a set of every kind; the file it wrote, scored with --predictions, gives the
    same results.json."""
    datas, shards, _ = demo_val
    common = ["--shards", str(shards), "--data-root", str(datas), "--sets", ",".join(FAST_SETS)]
    rc = evaluate.main(
        ["--export", export3, *common, "--out", str(tmp_path / "a"), "--max-new-tokens", "8", "-q"]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert all(s in table for s in FAST_SETS)
    pred = tmp_path / "a" / "predictions.jsonl"
    rc = evaluate.main(["--predictions", str(pred), *common, "--out", str(tmp_path / "b"), "-q"])
    assert rc == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert a == b and set(a) == set(FAST_SETS)
    lines = _lines(pred)
    assert len({x["key"] for x in lines}) == len(lines)
    inference = json.loads((tmp_path / "a" / "inference.json").read_text())
    assert inference["stage"] == 3 and inference["sets"]["grandf_gcg/val"]["mode"] == "generate"
    assert inference["sets"]["refcoco/val"]["mode"] == "teacher" and inference["protocol"] == "paper"
    # the exact question of each set's first sample: the genseg prompt lists the vocabulary by X-SAM's names
    first = inference["sets"]["coco_panoptic/val"]["first_sample"]
    assert first["key"] == lines[[x["key"].startswith("coco_panoptic/") for x in lines].index(True)]["key"]
    (question,) = first["questions"]
    assert question.startswith("<image>\n") and "<p>wall</p>" in question and "wall other" not in question
    assert all(inference["sets"][s]["first_sample"]["questions"] for s in FAST_SETS)
    # COCO panoptic: the dense semantic pass of the same output, every pixel a class
    from pipelines import masks as mask_ops

    pan = [x for x in lines if x["key"].startswith("coco_panoptic/")]
    for x in pan:
        covered = sum(mask_ops.area(e["rle"]) for e in x["semantic"])
        assert x["semantic"] and covered == np.prod(x["semantic"][0]["rle"]["size"])
    # X-SAM's protocol: teacher-forced answers are the references, and the masks come out of them
    refer = [x for x in lines if x["key"].startswith("refcoco/")]
    assert all(x["text"] and "<SEG>" in x["text"] for x in refer) and any(x["masks"] for x in refer)
    assert list((tmp_path / "a" / "wandb" / "wandb").glob("offline-run-*/files/media/images/eval/*.png"))


@pytest.mark.ray
def test_two_ray_workers_write_what_inline_writes(demo_val, export3, tmp_path, ray_local):
    datas, shards, _ = demo_val
    sets = ["refcoco/val", "coco_panoptic/val", "coco_vgd/val_box"]
    opts = InferenceOptions(max_new_tokens=8, batch_size=3)
    inline = run_inference(export3, str(shards), str(datas), sets, str(tmp_path / "inline"), opts)
    ray2 = run_inference(export3, str(shards), str(datas), sets, str(tmp_path / "ray"), opts, num_workers=2)
    assert inline.samples == ray2.samples and sum(inline.samples.values()) == 9 + 4 + 3
    assert _lines(inline.predictions) == _lines(ray2.predictions)


def test_max_samples_scores_the_first_samples_only(demo_val, export3, tmp_path):
    from orchestrate.evaluation.export_inference import evaluate_export

    datas, shards, _ = demo_val
    results = evaluate_export(
        export3,
        str(shards),
        str(datas),
        ["coco_interactive/val"],
        str(tmp_path),
        InferenceOptions(max_samples=5, batch_size=2),
        wandb_mode="disabled",
    )
    details = json.loads((tmp_path / "details.json").read_text())["sets"]["coco_interactive/val"]
    assert details["samples"] == 5 and len(_lines(tmp_path / "predictions.jsonl")) == 5
    assert set(results["coco_interactive/val"]) >= {"cIoU", "gIoU"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["teacher", "generate"])
def test_every_demo_val_set_gets_a_valid_predictions_file(demo_val, export3, tmp_path, mode, quiet_java):
    """Every scored val split of the demo build, teacher-forced and generated: the file scores (so every
    key, RLE, label and category is valid); generated answers of random weights rarely hold a <SEG>."""
    datas, shards, names = demo_val
    run = run_inference(
        export3, str(shards), str(datas), names, str(tmp_path), InferenceOptions(mode=mode, max_new_tokens=12)
    )
    results = score_predictions(run.predictions, str(shards), str(datas), names, wandb_mode="disabled")
    assert set(results) == set(names) and all(results.values())
    if mode == "generate":
        assert sum(run.no_seg.values()) > 0  # counted, not crashed on


def test_bad_exports_and_sets_are_one_line_errors(demo_val, export3, tmp_path, capsys):
    datas, shards, _ = demo_val
    stage1 = write_debug_export(tmp_path / "s1" / "export", 1)
    stage2 = write_debug_export(tmp_path / "s2" / "export", 2)
    base = ["--shards", str(shards), "--data-root", str(datas), "--out", str(tmp_path / "o"), "-q"]
    cases = [
        ([stage1, "--sets", "refcoco/val"], "stage-1 export"),
        ([stage2, "--sets", "coco_panoptic/val"], "stage-2 export"),
        ([export3, "--sets", "refcoco/testA"], "refcoco/testA was not built"),
        ([str(tmp_path), "--sets", "refcoco/val"], "not a stage export"),
    ]
    for args, expected in cases:
        assert run_cli(evaluate.main, ["--export", *args, *base]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
    # weights of another flavor: the export's config names debug, its tensors are cut
    from xsam_model.export import Export, write_export

    state = Export.read(export3).state()
    bad = {k: v for k, v in state.items() if not k.startswith("llm.")}
    write_export(
        str(tmp_path / "cut" / "export"),
        bad,
        stage=3,
        config={"stage": {"model": {"flavor": "debug", "init_dir": None}}, "model": {}},
        lineage={},
    )
    assert (
        run_cli(evaluate.main, ["--export", str(tmp_path / "cut" / "export"), "--sets", "refcoco/val", *base])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "do not fit a stage-3 'debug' model" in err and len(err.splitlines()) == 1
    # a byte of the weights flipped in place: refused before anything is scored, naming the file
    import shutil

    flipped = tmp_path / "flipped" / "export"
    shutil.copytree(export3, flipped)
    blob = bytearray((flipped / "model.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (flipped / "model.safetensors").write_bytes(bytes(blob))
    assert run_cli(evaluate.main, ["--export", str(flipped), "--sets", "refcoco/val", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flipped}/model.safetensors: sha256" in err and "differs" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "results.json").exists()


def test_predict_writes_png_and_json(demo_val, export3, tmp_path, capsys):
    datas, _, _ = demo_val
    image = next((datas / "img_genseg" / "coco2017" / "val2017").glob("*.jpg"))
    out = tmp_path / "pred"
    args = ["--export", export3, "--image", str(image), "--out", str(out), "--max-new-tokens", "6", "-q"]
    assert predict.main([*args, "--prompt", "Please segment <p>the cat</p> in this image."]) == 0
    record = json.loads((out / f"{image.stem}.json").read_text())
    assert record["task"] == "refseg" and set(record["prediction"]) >= {"key", "text", "masks"}
    from PIL import Image

    with Image.open(out / f"{image.stem}.png") as png:
        arr = np.asarray(png)
    assert arr.shape[0] >= 240 and arr.shape[1] > 320  # the image (320 wide) and the text panel beside it
    # a box prompt: one <region>, interactive segmentation, the mask at the image's size
    assert (
        predict.main([*args, "--prompt", "What is shown by <p><region></p>?", "--box", "10,10,100,80"]) == 0
    )
    record = json.loads((out / f"{image.stem}.json").read_text())
    assert record["task"] == "intseg"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert (
        run_cli(predict.main, [*args[:2], "--image", str(bad), "--out", str(out), "--prompt", "<p>a</p>"])
        == 2
    )
    assert run_cli(predict.main, [*args, "--prompt", "hello", "--task", "chat"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "neither JPEG nor PNG data" in errors[0] and "no <SEG>-producing task" in errors[1]
