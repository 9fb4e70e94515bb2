"""``--protocol paper|standard``: X-SAM's evaluation code (``AAAI26_Archive``) vs the benchmarks' own
definitions, each difference checked against a port of the few lines of X-SAM it follows (cited per test)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrate import evaluate
from orchestrate.evaluation import EvaluationError
from orchestrate.evaluation.export_inference import InferenceOptions
from orchestrate.evaluation.run import score_predictions
from orchestrate.evaluation.scoring import ScoreOptions
from pipelines.errors import run_cli
from tests.support.evaluation import evaluate_argv, write_jsonl


def _argv(demo_val, tmp_path, path, *extra: str) -> list[str]:
    datas, shards, _ = demo_val
    return evaluate_argv(path, shards, datas, tmp_path / "o", *extra)


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


# ------------------------------------------------------------------------------------------ E5/E6 GCG
def _xsam_gcg(samples: list, lines: list[dict]) -> dict:
    """Port of X-SAM's GCG path on our predictions: the failed-generation rule (``[A] xsam/xsam/model/
    xsam.py:728-731``: no cond (no ``<p>``) or no ``<SEG>`` embeds, or more than one ``<SEG>``, gives no
    segmentation output, and ``[A] xsam/xsam/tools/eval.py:143-154`` skips the sample), the painted map
    (``[A] xsam/xsam/dataset/process_fns/postprocess_fns/gcgseg_process_fn.py:46-65``), its re-split by area
    (``[A] xsam/xsam/evaluation/evaluators/gcgseg_evaluator.py:96-105``), mIoU over the images with a mask
    (``:170-201`` with ``compute_miou``, ``[A] xsam/xsam/evaluation/utils/miou.py:201-216``) and AP50 with
    COCOeval restricted to those images (``:203-215``). Image ids follow the key order."""
    from pycocotools import mask as cmask
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from orchestrate.evaluation.predictions import phrase_spans
    from pipelines import masks as mask_ops

    by_key = {x["key"]: x for x in lines}
    keys = sorted(s.key for s in samples)
    images, gts, preds, captions = [], [], [], []
    for s in sorted(samples, key=lambda s: s.key):
        image_id = keys.index(s.key) + 1
        h, w = s.image.height, s.image.width
        images.append({"id": image_id, "height": h, "width": w})
        for m in s.masks:
            gts.append(
                {
                    "id": len(gts) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": m.rle,
                    "area": float(mask_ops.area(m.rle)),
                    "bbox": mask_ops.bbox(m.rle),
                    "iscrowd": 0,
                }
            )
        line = by_key[s.key]
        text = line["text"]
        if "<SEG>" not in text or not phrase_spans(text) or text.count("<SEG>") > 1:
            continue  # seg_outputs is None: a failed sample
        captions.append(s.key)
        segmentation = np.full((h, w), 255)
        for label_id in range(len(phrase_spans(text))):
            for m in line["masks"]:
                if m["label"] == label_id:
                    segmentation[mask_ops.decode(m["rle"]) > 0] = label_id + 1
        labels, areas = np.unique(segmentation, return_counts=True)
        for label in labels[np.argsort(-areas)]:
            if label < 255:
                rle = cmask.encode(np.asfortranarray((segmentation == label).astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                preds.append({"image_id": image_id, "category_id": 1, "segmentation": rle, "score": 1.0})
    imgids = sorted({p["image_id"] for p in preds})
    if not preds:  # X-SAM's loadRes fails on no detection; ours reports the metrics as undefined
        return {"mIoU": float("nan"), "AP50": float("nan"), "captions": captions}
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": 1}]}
    coco_gt.createIndex()
    mious = []
    for i in imgids:
        gt_m = [mask_ops.decode(a["segmentation"]) > 0 for a in gts if a["image_id"] == i]
        dt_m = [mask_ops.decode(p["segmentation"]) > 0 for p in preds if p["image_id"] == i]
        iou = np.array([[(d & g).sum() / (d | g).sum() for g in gt_m] for d in dt_m]).reshape(len(dt_m), -1)
        paired = []
        while iou.size > 0 and iou.max() > 0:
            r, c = np.unravel_index(np.argmax(iou), iou.shape)
            paired.append(iou[r, c])
            iou = np.delete(np.delete(iou, r, axis=0), c, axis=1)
        mious.append(np.mean(paired) if paired else 0.0)
    ev = COCOeval(coco_gt, coco_gt.loadRes(preds), "segm")
    ev.params.imgIds, ev.params.catIds = imgids, [1]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return {"mIoU": float(np.mean(mious) * 100), "AP50": float(ev.stats[1] * 100), "captions": captions}


def _gcg_cases(perfect: dict, names: list[str]) -> list[dict]:
    """Every GCG sample's perfect line, then, among the samples of the sets other than refcocog_gcg: the 1st
    without <SEG>, the 2nd with two, the 3rd without a <p> span, the 4th with its masks all empty;
    refcocog_gcg's sample (whose phrase masks overlap already) gets its first mask grown over the whole image,
    so every later phrase paints over it."""
    import copy

    from pipelines import masks as mask_ops

    lines = copy.deepcopy([x for n in names for x in perfect[n]])
    other = [x for x in lines if not x["key"].startswith("refcocog_gcg/")]
    assert len(other) >= 4, "the demo needs four GCG samples outside refcocog_gcg for these cases"
    other[0]["text"] = other[0]["text"].replace("<SEG>", "")
    other[1]["text"] = other[1]["text"] + " <SEG>"
    other[2]["text"] = other[2]["text"].replace("<p>", "").replace("</p>", "")
    other[2]["masks"] = []
    for m in other[3]["masks"]:
        m["rle"] = mask_ops.encode(np.zeros(m["rle"]["size"], bool))[0]
    grown = next(x for x in lines if x["key"].startswith("refcocog_gcg/"))["masks"][0]
    grown["rle"] = mask_ops.encode(np.ones(grown["rle"]["size"], bool))[0]
    return lines


def test_gcg_population_and_masks_equal_xsams_evaluator(demo_val, perfect, no_java, tmp_path):
    from orchestrate.evaluation import ground_truth as gt
    from orchestrate.evaluation.predictions import index_predictions
    from orchestrate.evaluation.scoring import ScoreOptions, score_shard

    datas, shards, names = demo_val
    gcg = [n for n in names if gt.SOURCE_KINDS[n.split("/")[0]] == "gcg"]
    lines = _gcg_cases(perfect, gcg)
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    paper = score_predictions(
        str(path), str(shards), str(datas), sets=gcg, out_dir=str(tmp_path / "o"), wandb_mode="disabled"
    )
    standard = score_predictions(str(path), str(shards), str(datas), sets=gcg, protocol="standard")
    details = json.loads((tmp_path / "o" / "details.json").read_text())["sets"]
    refs = index_predictions(str(path))
    compared = 0
    for name in gcg:
        evs = gt.open_set(str(shards), str(datas), name)
        samples = [s for sh in evs.shards for s in gt.iter_shard_samples(evs, sh)]
        want = _xsam_gcg(samples, [x for x in lines if x["key"].startswith(name + "/")])
        got = paper[name]
        for metric in ("mIoU", "AP50"):
            if np.isnan(want[metric]):  # no image with a predicted mask
                assert np.isnan(got[metric]), (name, metric)
                continue
            assert got[metric] == pytest.approx(want[metric], abs=1e-6), (name, metric)
            compared += 1
        parts = [
            score_shard(
                evs,
                sh,
                str(path),
                {k: r for k, r in refs.items() if k.startswith(name + "/")},
                ScoreOptions(protocol="paper"),
            )
            for sh in evs.shards
        ]
        assert sorted(k for p in parts for k, _, _ in p.scorer.captions) == sorted(want["captions"])
        assert details[name]["samples"] == len(samples)
    counts = {
        k: sum(details[n]["counts"][k] for n in gcg) for k in ("no_seg", "multi_seg", "no_phrase", "no_mask")
    }
    assert counts == {"no_seg": 1, "multi_seg": 1, "no_phrase": 1, "no_mask": 1}
    assert compared >= 2 and any(paper[n] != standard[n] for n in gcg)
    assert all(
        "counts" not in d
        for d in json.loads((tmp_path / "o" / "details.json").read_text())["sets"].values()
        if d["protocol"] == "standard"
    )


def test_painted_masks_overwrite_in_label_order():
    """Two overlapping phrase masks: the later label keeps the overlap; largest first; an empty one is
    gone."""
    from orchestrate.evaluation.scoring import painted_masks
    from pipelines import masks as mask_ops

    a, b = np.zeros((4, 6), bool), np.zeros((4, 6), bool)
    a[:, :4], b[:, 2:] = True, True  # 16 and 16 pixels; b paints over a's columns 2-3
    empty = mask_ops.encode(np.zeros((4, 6), bool))[0]
    out = painted_masks([mask_ops.encode(a)[0], empty, mask_ops.encode(b)[0]], (4, 6))
    assert [lb for _, lb in out] == [2, 0]
    assert (mask_ops.decode(out[0][0]) > 0).sum() == 16 and (mask_ops.decode(out[1][0]) > 0).sum() == 8


# ------------------------------------------------------------------------------------------ E8 instance AP
def _detectron2_polygon_area(polygons: list[list[float]]) -> float:
    """detectron2's ``PolygonMasks.area`` for one instance, which X-SAM's ``convert_to_coco_dict`` writes as
    ``area`` (``[A] xsam/xsam/evaluation/utils/map.py:386-392``): the shoelace formula per part, summed."""
    total = 0.0
    for p in polygons:
        x, y = np.asarray(p[0::2], float), np.asarray(p[1::2], float)
        total += 0.5 * np.abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    return float(total)


def test_instance_ap_ground_truth_is_xsams_without_crowd(real_data, tmp_path):
    """``paper``: the AP equals COCOeval on X-SAM's ground truth (crowd annotations removed, invalid parts
    dropped, ``[A] xsam/xsam/dataset/genseg_dataset.py:342-356``; polygon areas), so a detection on the crowd
    region is a false positive; ``standard`` ignores it (the crowd region of the original file)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from orchestrate.evaluation import ground_truth as gt
    from tests.evaluation.test_real_data import real_instances
    from tests.support.evaluation import set_lines

    datas, shards, _, src = real_instances(real_data, tmp_path)
    name = "coco_instance/val"
    evs = gt.open_set(str(shards), str(datas), name)
    samples = {s.key: s for sh in evs.shards for s in gt.iter_shard_samples(evs, sh)}
    paper_gt = {k: gt.instance_truth(evs, s, "paper") for k, s in samples.items()}
    standard_gt = {k: gt.instance_truth(evs, s, "standard") for k, s in samples.items()}
    assert not any(t.iscrowd for ts in paper_gt.values() for t in ts)
    assert sum(t.iscrowd for ts in standard_gt.values() for t in ts) == 1
    crowd = next(a for a in src["annotations"] if a["iscrowd"])
    key = next(k for k, s in samples.items() if s.meta["image_id"] == crowd["image_id"])
    lines = set_lines(shards, datas, name)
    line = next(x for x in lines if x["key"] == key)
    region = next(t for t in standard_gt[key] if t.iscrowd)
    # ranked first, so as a false positive it lowers the precision of everything after it
    line["instances"].insert(0, {"rle": region.rle, "category_id": crowd["category_id"], "score": 1.0})
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    paper = score_predictions(str(path), str(shards), str(datas))[name]
    standard = score_predictions(str(path), str(shards), str(datas), protocol="standard")[name]
    assert standard["AP"] == 100.0 and paper["AP"] < 100.0
    # X-SAM's ground truth file, scored by pycocotools
    anns = []
    for a in src["annotations"]:
        if a["iscrowd"]:
            continue
        parts = [p for p in a["segmentation"] if len(p) % 2 == 0 and len(p) >= 6]
        if parts:
            anns.append({**a, "segmentation": parts, "area": _detectron2_polygon_area(parts)})
    key_to_id = {k: s.meta["image_id"] for k, s in samples.items()}
    dets = [
        {
            "image_id": key_to_id[x["key"]],
            "category_id": i["category_id"],
            "segmentation": i["rle"],
            "score": i["score"],
        }
        for x in lines
        for i in x["instances"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {**src, "annotations": anns}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "segm")
        ev.params.imgIds = sorted(key_to_id.values())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    expected = {n: (100 * v if v > -1 else None) for n, v in zip(names, ev.stats[:6], strict=True)}
    assert {k: (None if v != v else v) for k, v in paper.items()} == pytest.approx(expected, abs=1e-9)
    areas = {round(t.area, 6) for ts in paper_gt.values() for t in ts}
    assert areas == {round(a["area"], 6) for a in anns}


# ------------------------------------------------------------------------------------------ E3 COCO mIoU
def _xsam_semseg_miou(
    pan_json: dict, pngs: dict[int, np.ndarray], preds: dict[int, np.ndarray], cats
) -> float:
    """X-SAM's COCO semantic mIoU: the ground truth PNG as Mask2Former's ``_process_panoptic_to_semantic``
    writes it (255 everywhere, each segment, crowd included, its contiguous class id; facebookresearch/
    Mask2Former datasets/prepare_coco_semantic_annos_from_panoptic_annos.py), the confusion matrix and mIoU
    of ``[A] xsam/xsam/evaluation/evaluators/genseg_evaluator.py:116-141,219-233``."""
    from pipelines import masks as mask_ops

    contiguous = {c: i for i, c in enumerate(cats)}
    k = len(cats)
    conf = np.zeros((k + 1, k + 1), np.int64)
    for ann in pan_json["annotations"]:
        ids = mask_ops.rgb2id(pngs[ann["image_id"]])
        gt = np.full(ids.shape, 255, np.uint32)
        for seg in ann["segments_info"]:
            gt[ids == seg["id"]] = contiguous[seg["category_id"]]
        gt[gt == 255] = k
        pred = preds[ann["image_id"]]
        conf += np.bincount((k + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=conf.size).reshape(
            conf.shape
        )
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = conf[:-1, :-1].sum(0).astype(float)
    pos_pred = conf[:-1, :-1].sum(1).astype(float)
    union = pos_gt + pos_pred - tp
    valid = (pos_gt > 0) & (union > 0)
    return float(100 * np.sum(tp[valid] / union[valid]) / np.sum(valid))


def test_coco_semantic_miou_is_xsams_dense_pass_with_crowd_labelled(real_data, tmp_path):
    """COCO panoptic's ``mIoU`` comes from the ``semantic`` field (every pixel a class) against labels where a
    crowd region is its class; the panoptic segments' own mIoU (crowd ignored, uncovered pixels missed)
    stays as ``mIoU_panoptic``. Real panopticapi images (one with a person crowd, one with person and
    umbrella crowds)."""
    import io

    from PIL import Image

    from orchestrate.evaluation import ground_truth as gt
    from pipelines import masks as mask_ops
    from tests.evaluation.test_real_data import PAN, build_real_panoptic
    from tests.support.evaluation import set_lines

    datas, shards = build_real_panoptic(real_data, tmp_path)
    name = "coco_panoptic/val"
    evs = gt.open_set(str(shards), str(datas), name)
    cats = sorted(evs.categories)
    samples = {s.key: s for sh in evs.shards for s in gt.iter_shard_samples(evs, sh)}
    lines = set_lines(shards, datas, name)
    pan_json = json.loads((real_data / f"{PAN}panoptic_examples.json").read_text())
    pngs, preds = {}, {}
    rng = np.random.default_rng(0)
    for line in lines:
        s = samples[line["key"]]
        image_id = s.meta["image_id"]
        png = real_data / f"{PAN}panoptic_examples__{image_id:012d}.png"
        pngs[image_id] = np.asarray(Image.open(io.BytesIO(png.read_bytes())).convert("RGB"))
        # a dense prediction: the labelled GT with the unlabelled pixels given random classes and one segment
        # called another class
        h, w = s.image.height, s.image.width
        dense = rng.integers(0, len(cats), (h, w))
        for i, (rle, c) in enumerate(gt.semantic_truth(evs, gt.panoptic_truth(evs, s))):
            dense[mask_ops.decode(rle) > 0] = cats.index(c) if i else (cats.index(c) + 1) % len(cats)
        preds[image_id] = dense
        line["semantic"] = [
            {"rle": mask_ops.encode(dense == k)[0], "category_id": cats[k]} for k in np.unique(dense).tolist()
        ]
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    result = score_predictions(str(path), str(shards), str(datas))[name]
    assert result["mIoU"] == pytest.approx(_xsam_semseg_miou(pan_json, pngs, preds, cats), abs=1e-9)
    assert result["mIoU_panoptic"] == 100.0 and result["mIoU"] < 100.0  # the panoptic lines are perfect
    for line in lines:
        del line["semantic"]
    result = score_predictions(str(write_jsonl(tmp_path / "q.jsonl", lines)), str(shards), str(datas))[name]
    assert "mIoU" not in result and result["mIoU_panoptic"] == 100.0


# ------------------------------------------------------------------------------------------ VGD areas
def test_vgd_area_ranges_use_xsams_area(demo_val, real_data):
    """``paper``: a VGD ground-truth instance's area (COCOeval's small/medium/large ranges) is the one X-SAM's
    ``convert_to_coco_dict`` computes from the annotation it keeps (``[A] xsam/xsam/evaluation/utils/
    map.py:386-392``): detectron2's ``PolygonMasks.area`` for polygons (real COCO annotations), the RLE's
    pixel count for an RLE (the demo's released-form file); ``standard``: the mask's pixel count."""
    from orchestrate.evaluation import ground_truth as gt
    from pipelines import masks as mask_ops
    from pipelines.sources import SOURCES
    from pipelines.sources.vgd import _xsam_area
    from tests.evaluation.test_real_data import MMDET

    datas, shards, names = demo_val
    name = next(n for n in names if n.startswith("coco_vgd/"))
    evs = gt.open_set(str(shards), str(datas), name)
    released = json.loads(
        open(SOURCES["coco_vgd"].locate(str(datas), evs.split).inputs["annotations"]).read()
    )
    anns = {a["id"]: a for r in released for a in r["annotations"]}
    checked = 0
    for sh in evs.shards:
        for s in gt.iter_shard_samples(evs, sh):
            paper, standard = gt.instance_truth(evs, s, "paper"), gt.instance_truth(evs, s, "standard")
            for p, q, ann_id in zip(paper, standard, s.meta["ann_ids"], strict=True):
                segm = anns[ann_id]["segmentation"]
                assert isinstance(segm, dict) and p.area == mask_ops.area(segm) and q.area is None
                checked += 1
    assert checked
    # real COCO polygons: the shoelace area, not the pixel count
    src = json.loads((real_data / MMDET).read_text())
    img = {i["id"]: i for i in src["images"]}
    polys = [a for a in src["annotations"] if isinstance(a["segmentation"], list)]
    for a in polys:
        rle = mask_ops.segmentation_to_rle(
            a["segmentation"], img[a["image_id"]]["height"], img[a["image_id"]]["width"]
        )
        assert _xsam_area(a["segmentation"], rle) == pytest.approx(
            _detectron2_polygon_area(a["segmentation"])
        )
    assert any(_detectron2_polygon_area(a["segmentation"]) != a["area"] for a in polys)
