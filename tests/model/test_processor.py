"""The processor: tokens, labels, cond_ids and seg_ids agree with the Sample; images and masks in the right
frames."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from pipelines.schema import Turn
from tests.support.model import H, W, image_bytes, make_samples
from xsam_model import ProcessorError, XSamProcessor, build_processor, collate
from xsam_model.config import COCO_PANOPTIC_CATEGORY_IDS
from xsam_model.tokenizer import build_debug_tokenizer, load_tokenizer, prepare_tokenizer

TASKS = ["genseg", "refseg", "reaseg", "gcgseg", "vgdseg", "chat"]


def _decode(proc: XSamProcessor, ids: torch.Tensor) -> str:
    return proc.tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("task", TASKS)
def test_tokens_agree_with_sample(processor, samples, task):
    s = samples[task]
    item = processor(s, image_bytes(0))
    ids, labels, cond, seg = item["input_ids"], item["labels"], item["cond_ids"], item["seg_ids"]
    assert ids.shape == labels.shape == cond.shape == seg.shape and ids.dtype == torch.long
    assert ids[0] == processor.tokenizer.bos_token_id
    assert (ids == -200).sum() == 1 and (labels[ids < 0] == -100).all()

    # labels: exactly the assistant turns, each closed by <|end|>; nothing else carries loss
    answers = "".join(t.text + "<|end|>" for t in s.conversation if t.role == "assistant")
    assert _decode(processor, labels[labels != -100]) == answers
    # the whole prompt follows the Phi-3 template
    text = _decode(processor, ids[1:].clamp(min=0))
    assert text.startswith("<|user|>\n") and text.count("<|assistant|>\n") == len(s.conversation) // 2

    # cond_ids: span k covers <p> … </p> of phrase k, in order
    n_spans = int(cond.max()) + 1
    assert n_spans == len(s.phrases)
    for k, phrase in enumerate(s.phrases):
        span = ids[cond == k]
        assert span[0] == processor.p_open_id and span[-1] == processor.p_close_id
        pos = (cond == k).nonzero().flatten()
        assert (pos.diff() == 1).all(), "a span is contiguous"
        if task == "vgdseg":
            assert span[1:-1].tolist() == [-300]
        else:
            assert _decode(processor, span) == f"<p>{phrase}</p>"

    # seg_ids: k on the k-th <SEG>, one per assistant turn for refseg/reaseg, none for chat
    seg_pos = (ids == processor.seg_id).nonzero().flatten()
    expected = {"refseg": 2, "reaseg": 2, "chat": 0}.get(task, 1)
    assert len(seg_pos) == expected
    assert seg[seg_pos].tolist() == list(range(expected)) and (seg >= 0).sum() == expected
    assert (labels[seg_pos] == processor.seg_id).all(), "<SEG> is predicted by the LM"


def test_images_and_masks_in_sam_frame(processor, samples):
    c = processor.config
    item = processor(samples["genseg"], image_bytes(0))
    assert item["pixel_values"].shape == (3, c.siglip_size, c.siglip_size)
    assert item["extra_pixel_values"].shape == (3, c.sam_size, c.sam_size)
    sh, sw = item["scaled_size"].tolist()
    assert (sh, sw) == (round(H * c.sam_size / W), c.sam_size)
    assert (item["extra_pixel_values"][:, sh:] == 0).all(), "zero padding below the image"
    masks = item["mask_labels"]
    assert masks.shape == (4, c.sam_size, c.sam_size) and masks.dtype == torch.uint8
    assert masks[:, sh:].sum() == 0
    # mask 1 is the bottom half of the image (rows 20..40 of 40): nearest-resized it spans the lower half of
    # sh
    rows = masks[1].any(1).nonzero().flatten()
    assert abs(rows.min().item() - sh / 2) <= 1 and rows.max().item() == sh - 1
    # area ratio of mask 0 (20x20 of 40x56) is kept by the resize
    assert abs(masks[0].float().sum().item() / (sh * sw) - 400 / (H * W)) < 0.02
    assert item["class_labels"].tolist() == [m.label for m in samples["genseg"].masks]
    cat = COCO_PANOPTIC_CATEGORY_IDS
    assert item["category_labels"].tolist() == [cat.index(18), cat.index(199), cat.index(1), cat.index(1)]
    assert not item["ignore_mask"].any() and item["region_masks"].shape == (0, c.sam_size, c.sam_size)


def test_ignore_and_regions(processor, samples):
    rea = processor(samples["reaseg"], image_bytes(0))
    assert rea["ignore_mask"].any() and rea["ignore_mask"].dtype == torch.bool
    assert not (rea["ignore_mask"] & rea["mask_labels"][0].bool()).any()
    vgd = processor(samples["vgdseg"], image_bytes(0))
    r = vgd["region_masks"]
    assert r.shape[0] == 2 and r.dtype == torch.bool and r[0].any() and r[1].any()
    # region 0 (box inside mask 0) lies inside target 0
    assert (r[0] & ~vgd["mask_labels"][0].bool()).sum() <= r[0].sum() * 0.1


def test_collate_pads_and_checks_one_task(processor, samples):
    a, b = processor(samples["refseg"], image_bytes(0)), processor(samples["genseg"], image_bytes(1))
    b2 = processor(samples["gcgseg"], image_bytes(2))
    with pytest.raises(ValueError, match="one task"):
        collate([a, b])
    items = [processor(samples["genseg"], image_bytes(0)), b]
    items[0]["input_ids"] = items[0]["input_ids"][:-3]  # make lengths differ
    for k in ("labels", "cond_ids", "seg_ids"):
        items[0][k] = items[0][k][:-3]
    batch = processor.collate(items)
    n0, n1 = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert batch["input_ids"].shape == (2, n1) and batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert (batch["labels"][0, n0:] == -100).all() and (batch["cond_ids"][0, n0:] == -1).all()
    assert (batch["input_ids"][0, n0:] == processor.pad_id).all()
    assert (
        batch["pixel_values"].shape[0] == 2 and len(batch["mask_labels"]) == 2 and batch["task"] == "genseg"
    )
    assert processor.collate([b2])["keys"] == [samples["gcgseg"].key]


def test_bad_samples_raise(processor, samples):
    s = dataclasses.replace(samples["genseg"], phrases=["dog"])
    with pytest.raises(ProcessorError, match="phrases"):
        processor(s, image_bytes(0))
    with pytest.raises(ProcessorError, match="Sample says"):
        processor(samples["genseg"], image_bytes(0, h=H + 1))
    short = XSamProcessor(dataclasses.replace(processor.config, max_length=20), processor.tokenizer)
    with pytest.raises(ProcessorError, match="max_length"):
        short(samples["genseg"], image_bytes(0))
    s = dataclasses.replace(samples["vgdseg"], regions=list(reversed(samples["vgdseg"].regions)))
    with pytest.raises(ProcessorError, match="region"):
        processor(s, image_bytes(0))
    s = dataclasses.replace(
        samples["chat"], conversation=[Turn("assistant", "hi"), *samples["chat"].conversation]
    )
    with pytest.raises(ProcessorError, match="expected 'user'"):
        processor(s, image_bytes(0))


def test_picklable_and_folder_tokenizer_same_path(processor, samples, tmp_path):
    """Workers get a pickled processor; a tokenizer saved to a folder loads through load_tokenizer like
    Phi-3's."""
    clone = pickle.loads(pickle.dumps(processor))
    s = samples["vgdseg"]
    a, b = processor(s, image_bytes(3)), clone(s, image_bytes(3))
    for k in ("input_ids", "labels", "cond_ids", "seg_ids", "pixel_values", "mask_labels", "region_masks"):
        assert torch.equal(a[k], b[k]), k
    build_debug_tokenizer().save_pretrained(tmp_path / "tok")
    tok = prepare_tokenizer(load_tokenizer(tmp_path / "tok"), ("<SEG>", "<p>", "</p>"))
    c = XSamProcessor(processor.config, tok)(s, image_bytes(3))
    assert torch.equal(c["input_ids"], a["input_ids"]) and torch.equal(c["cond_ids"], a["cond_ids"])
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nothing")
    assert build_processor("debug")(s, image_bytes(3))["input_ids"].tolist() == a["input_ids"].tolist()


def test_every_fixture_sample_is_processed():
    proc = build_processor("debug")
    for s in make_samples().values():
        assert proc(s, image_bytes(0))["task"] == s.task


def test_reaseg_train_batches_count_this_uses_explanation_draws(processor, samples):
    """Each use's LISA explanation coins reach the step's ``data/reaseg_*`` counters via the batch."""
    s = samples["reaseg"]
    n = len(s.phrases)
    explained = dataclasses.replace(
        s, split="train", meta={**s.meta, "explanation": "Because.", "explained": [True] + [False] * (n - 1)}
    )
    plain = dataclasses.replace(s, split="train", meta={**s.meta, "explained": [False] * n})
    batch = processor.collate([processor(explained, image_bytes(0)), processor(plain, image_bytes(1))])
    assert batch["reaseg_counts"] == {
        "reaseg_turns": 2 * n,
        "reaseg_explained_turns": 1,
        "reaseg_unexplained_samples": 1,
    }
    val = dataclasses.replace(s, split="val")
    assert "reaseg_counts" not in processor.collate([processor(val, image_bytes(0))])
