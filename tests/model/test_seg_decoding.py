"""Per-``<SEG>`` decoding of refseg/reaseg (the paper's D1) against a naive reference, and the other modes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.support.model import image_bytes, refseg_sample
from xsam_model import XSAM_FLAVORS, build_xsam
from xsam_model.modeling.seg_plan import plan_decoding


def _model(**decoder):
    cfg = copy.deepcopy(XSAM_FLAVORS["debug"])
    cfg.decoder = dataclasses.replace(cfg.decoder, **decoder)
    torch.manual_seed(0)
    return build_xsam(cfg)


def _batch(model, samples):
    return model.processor.collate([model.processor(s, image_bytes(i)) for i, s in enumerate(samples)])


def _llm_states(model, batch):
    """The forward's intermediate tensors up to the projected LLM states (stage 3)."""
    sam_feats, pyramid = model.encode_sam(batch["extra_pixel_values"])
    image_tokens, grid = model.encode_images(batch["pixel_values"], sam_feats)
    x = model._expand(batch, image_tokens, grid)
    hidden = model.llm.model(inputs_embeds=x["embeds"], attention_mask=x["attention_mask"]).last_hidden_state
    return model.seg_connector(pyramid), model.llm_projector(hidden), x


def test_per_seg_equals_one_decoder_call_per_seg():
    """Two refseg samples with 2 and 3 phrases: 5 runs in one batched call equal 5 separate decoder calls,
    each with its own <SEG> and the 5 phrases of the batch as classes; labels are offset by the phrase
    counts."""
    model = _model().eval()
    batch = _batch(model, [refseg_sample(1, 2), refseg_sample(2, 3)])
    with torch.no_grad():
        feats, proj, x = _llm_states(model, batch)
        plan = plan_decoding(
            "per_seg", proj, x["cond_ids"], x["seg_ids"], batch["mask_labels"], batch["class_labels"]
        )
        batched = model.mask_decoder(
            feats, seg_embeds=plan.seg_embeds, cond=plan.cond, cond_valid=plan.valid, rows=plan.rows
        )
        # the reference: phrase means and <SEG> embeddings by plain indexing, one decoder call per <SEG>
        phrases = [proj[b, x["cond_ids"][b] == k].mean(0) for b, n in ((0, 2), (1, 3)) for k in range(n)]
        cond = torch.stack(phrases)[None]  # 1x5xC
        runs = [(b, j) for b, n in ((0, 2), (1, 3)) for j in range(n)]
        for r, (b, j) in enumerate(runs):
            seg = proj[b, x["seg_ids"][b] == j]
            assert seg.shape[0] == 1
            ref = model.mask_decoder(
                [f[b : b + 1] for f in feats],
                seg_embeds=seg,
                cond=cond,
                cond_valid=torch.ones(1, 5, dtype=torch.bool),
            )
            for layer_b, layer_ref in zip(batched, ref, strict=True):
                for k in ("masks_queries_logits", "class_queries_logits"):
                    torch.testing.assert_close(layer_b[k][r : r + 1], layer_ref[k], atol=2e-5, rtol=1e-4)
    assert plan.runs.tolist() == [list(r) for r in runs]
    assert [lab.tolist() for lab in plan.labels] == [[0], [1], [2], [3], [4]]  # offsets 0 and 2
    for r, (b, j) in enumerate(runs):  # one target each: the mask of phrase j of sample b
        assert torch.equal(plan.masks[r][0], batch["mask_labels"][b][j])
    # the model's forward takes the same path
    with torch.no_grad():
        out = model(batch, stage=3, compute_loss=False)
    torch.testing.assert_close(
        out.predictions[-1]["class_queries_logits"], batched[-1]["class_queries_logits"]
    )
    assert out.runs.tolist() == plan.runs.tolist()


def test_refseg_with_three_turns_gives_three_matched_targets(monkeypatch):
    model = _model()
    batch = _batch(model, [refseg_sample(3, 3)])
    seen = {}
    forward = model.criterion.forward

    def spy(predictions, mask_labels, class_labels, ignore_mask=None):
        seen.update(masks=mask_labels, labels=class_labels, preds=predictions)
        return forward(predictions, mask_labels, class_labels, ignore_mask)

    monkeypatch.setattr(model.criterion, "forward", spy)
    out = model(batch, stage=3)
    assert torch.isfinite(out.loss) and out.losses["dice"] > 0
    assert [len(m) for m in seen["masks"]] == [1, 1, 1] and [t.tolist() for t in seen["labels"]] == [
        [0],
        [1],
        [2],
    ]
    final = seen["preds"][-1]
    matched = [
        model.criterion.matcher(
            final["masks_queries_logits"][r : r + 1].float(),
            final["class_queries_logits"][r : r + 1].float(),
            [seen["masks"][r]],
            [seen["labels"][r]],
        )[0]
        for r in range(3)
    ]
    assert [len(src) for src, _ in matched] == [1, 1, 1]
    assert float(model.criterion.num_masks(seen["labels"], "cpu")) == 3.0


def _hand_plan(mode, with_targets=True):
    """B=2: sample 0 has phrases 0,1 and <SEG>s 0,1; sample 1 has phrases 0,1,2 and <SEG>s 0,1,2."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 4)
    cond = torch.tensor(
        [[0, 0, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1], [0, 1, 1, 2, -1, -1, -1, -1, -1, -1, -1, -1]]
    )
    seg = torch.tensor([[-1] * 8 + [0, -1, 1, -1], [-1] * 6 + [0, -1, 1, -1, 2, -1]])
    masks = [
        torch.arange(2 * 9, dtype=torch.uint8).view(2, 3, 3),
        torch.arange(3 * 9, dtype=torch.uint8).view(3, 3, 3),
    ]
    labels = [torch.tensor([1, 0]), torch.tensor([0, 1, 2])]
    args = (masks, labels) if with_targets else ()
    return hidden, cond, seg, masks, labels, plan_decoding(mode, hidden, cond, seg, *args)


@pytest.mark.parametrize("mode", ["per_seg", "main", "last", "mean"])
def test_every_seg_reduce_mode_does_what_it_says(mode):
    hidden, cond, seg, masks, labels, plan = _hand_plan(mode)
    phrase = lambda b, k: hidden[b, cond[b] == k].mean(0)  # noqa: E731
    segs = lambda b: hidden[b, seg[b] >= 0]  # noqa: E731  (in <SEG> order)
    everything = torch.stack([phrase(0, 0), phrase(0, 1), phrase(1, 0), phrase(1, 1), phrase(1, 2)])
    if mode == "per_seg":
        torch.testing.assert_close(plan.seg_embeds, torch.cat([segs(0), segs(1)]))
        assert plan.rows.tolist() == [0, 0, 1, 1, 1] and plan.cond.shape == (5, 5, 4) and plan.valid.all()
        torch.testing.assert_close(plan.cond[3], everything)
        # run (0, 0) targets sample 0's mask labelled 0 (its second), with global label 0; run (1, 2) label 4
        assert torch.equal(plan.masks[0][0], masks[0][1]) and plan.labels[0].tolist() == [0]
        assert [lab.tolist() for lab in plan.labels] == [[0], [1], [2], [3], [4]]
    elif mode == "main":
        torch.testing.assert_close(plan.seg_embeds, torch.stack([segs(0)[-1], segs(1)[-1]]))
        assert plan.rows is None and plan.cond.shape == (2, 5, 4) and plan.valid.all()
        torch.testing.assert_close(plan.cond[1], everything)
        assert [lab.tolist() for lab in plan.labels] == [[1, 0], [2, 3, 4]] and plan.masks is masks
    else:
        expect = [segs(b)[-1] if mode == "last" else segs(b).mean(0) for b in (0, 1)]
        torch.testing.assert_close(plan.seg_embeds, torch.stack(expect))
        assert plan.rows is None and plan.cond.shape == (2, 3, 4)
        assert plan.valid.tolist() == [[True, True, False], [True, True, True]]
        torch.testing.assert_close(plan.cond[0, :2], everything[:2])
        assert plan.labels is labels
    assert _hand_plan(mode, with_targets=False)[-1].labels is None


def test_per_seg_applies_only_to_its_tasks(samples):
    model = _model()
    genseg = model(_batch(model, [samples["genseg"]] * 2), stage=3)
    assert genseg.runs.tolist() == [[0, -1], [1, -1]]  # one <SEG>: one run per image, own phrases
    rea = model(_batch(model, [samples["reaseg"]] * 2), stage=3)
    assert rea.runs.shape == (4, 2) and rea.predictions[-1]["class_queries_logits"].shape[-1] == 5
    only_ref = _model(seg_reduce_tasks=("refseg",))
    rea = only_ref(_batch(only_ref, [samples["reaseg"]] * 2), stage=3)
    assert (
        rea.runs.tolist() == [[0, -1], [1, -1]] and rea.predictions[-1]["class_queries_logits"].shape[-1] == 3
    )
    last = _model(seg_reduce="last")
    out = last(_batch(last, [refseg_sample(1, 2), refseg_sample(2, 3)]), stage=3)
    assert out.predictions[-1]["class_queries_logits"].shape[::2] == (2, 4)  # max 3 own phrases + background


@pytest.mark.parametrize("seg_reduce", ["per_seg", "main"])
@pytest.mark.parametrize("task", ["genseg", "refseg", "reaseg", "gcgseg", "vgdseg", "chat"])
def test_count_loss_targets_is_what_the_criterion_divides_by(samples, task, seg_reduce, monkeypatch):
    """The trainer's ``global_batch`` normaliser counts targets from the batch alone
    (:meth:`XSam.count_loss_targets`); it must be the number of target masks the forward hands the loss, per
    stage and decoding mode, or a world-size change would change the losses."""
    model = _model(seg_reduce=seg_reduce)
    multi = refseg_sample(5, 3) if task == "refseg" else samples[task]
    batch = _batch(model, [samples[task], multi])
    seen = []
    forward = model.criterion.forward

    def spy(predictions, mask_labels, class_labels, ignore_mask=None):
        seen.append(sum(len(c) for c in class_labels))
        return forward(predictions, mask_labels, class_labels, ignore_mask)

    monkeypatch.setattr(model.criterion, "forward", spy)
    for stage in (1, 3):
        seen.clear()
        model(batch, stage=stage)
        assert model.count_loss_targets(batch, stage=stage) == (seen[0] if seen else 0), (task, stage)
    assert model.count_loss_targets(batch, stage=2) == 0
