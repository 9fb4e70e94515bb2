"""VGD prompts at batch time through the processor's collate and the model.

Three synthetic COCO-VGD train samples of different image sizes share category 18; every instance has four
prompts. Over many draws: prompts come from other images, each region is the named image's prompt in that
image's SAM frame, negatives have no target, the model reads each region from its source image's grid, the
options off give today's batch, and a drawn micro-batch trains a step of the debug model.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
import torch

from pipelines.schema import REGION, ImageRef, MaskTarget, PoolPrompt, Region, Sample, validate
from pipelines.sources.vgd import vgd_conversation
from tests.support.model import box, image_bytes
from xsam_model import build_xsam
from xsam_model.processor import XSamProcessor

SIZES = [(40, 56), (56, 40), (48, 48)]
INSTANCES = [  # (category, (y0, y1, x0, x1)) per image; category 18 in images 0 and 1
    [(18, (0, 16, 0, 20)), (18, (20, 38, 2, 18)), (1, (5, 35, 30, 54))],
    [(3, (0, 20, 0, 30)), (18, (25, 50, 5, 35))],
    [(5, (10, 40, 10, 40)), (7, (2, 9, 30, 46))],
]


def _prompts(b: tuple[int, int, int, int], h: int, w: int) -> dict[str, dict]:
    y0, y1, x0, x1 = b
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    return {
        "point": box(cy - 1, cy + 2, cx - 1, cx + 2, h, w),
        "scribble": box(cy, cy + 1, x0 + 1, x1 - 1, h, w),
        "box": box(y0 + 1, y1 - 1, x0 + 1, x1 - 1, h, w),
        "mask": box(y0, y1, x0, x1, h, w),
    }


def vgd_sample(i: int, use: int) -> Sample:
    """Image ``i`` as the converter writes it: shuffled slots, every instance a target, the stored region the
    first instance's box prompt, every instance's prompts in the pool; ``meta["draw"]`` as the loader sets."""
    (h, w), inst = SIZES[i], INSTANCES[i]
    rng = random.Random(i)
    slots = sorted({c for c, _ in inst})
    rng.shuffle(slots)
    slot = {c: k for k, c in enumerate(slots)}
    pool = [PoolPrompt(c, n, _prompts(b, h, w)) for n, (c, b) in enumerate(inst)]
    first = {c: next(p for p in pool if p.category_id == c) for c in slots}
    s = Sample(
        key=f"coco_vgd/train/{i:012d}",
        source="coco_vgd",
        task="vgdseg",
        split="train",
        image=ImageRef(path=f"img/{i}.png", width=w, height=h),
        conversation=vgd_conversation(rng, len(slots), "<image>\n"),
        phrases=[REGION] * len(slots),
        masks=[MaskTarget(rle=box(*b, h, w), label=slot[c], category_id=c) for c, b in inst],
        regions=[Region(slot[c], "box", first[c].prompts["box"]) for c in slots],
        meta={"slot_category_ids": slots, "draw": [0, use]},
        prompt_pool=pool,
    )
    validate(s)
    return s


def _items(proc: XSamProcessor, use: int, which=(0, 1, 2), strip_pool: bool = False) -> list[dict]:
    out = []
    for i in which:
        s = vgd_sample(i, use)
        s = replace(s, prompt_pool=[]) if strip_pool else s
        out.append(proc(s, image_bytes(i, *SIZES[i])))
    return out


def _frame(proc: XSamProcessor, i: int, rle: dict) -> torch.Tensor:
    return proc._to_sam_frame([rle], proc.sam_scaled_size(*SIZES[i]))[0].bool()


def _identify(proc: XSamProcessor, mask: torch.Tensor, src: int) -> int:
    """The category of the one pool prompt of image ``src`` that, in ``src``'s SAM frame, is ``mask``."""
    hits = [
        c
        for c, b in INSTANCES[src]
        for rle in _prompts(b, *SIZES[src]).values()
        if torch.equal(_frame(proc, src, rle), mask)
    ]
    assert len(hits) == 1, hits
    return hits[0]


def test_regions_come_from_the_named_image_and_negatives_carry_no_target(processor):
    cross = negatives = coin_samples = zeros = total_zero = 0
    for use in range(30):
        batch = processor.collate(_items(processor, use))
        n_neg = 0
        for b in range(3):
            own = {c for c, _ in INSTANCES[b]}
            masks, src = batch["region_masks"][b], batch["region_image"][b]
            labels, cats = batch["class_labels"][b], [c for c, _ in INSTANCES[b]]
            ids = batch["input_ids"][b]
            assert int((ids == processor.config.region_token_index).sum()) == len(masks) == len(src)
            for r in range(len(masks)):
                if int(src[r]) == -1:  # a negative with nothing left to show: no prompt, no target
                    assert not masks[r].any() and not (labels == r).any()
                    n_neg, zeros = n_neg + 1, zeros + 1
                    continue
                cat = _identify(processor, masks[r], int(src[r]))  # right image, right frame
                cross += int(src[r]) != b
                targets = [cats[k] for k in (labels == r).nonzero().flatten().tolist()]
                if cat in own:  # a positive: every target of the slot is of its category, and there is one
                    assert targets and set(targets) == {cat}
                else:  # a negative: another image's prompt, and no target
                    assert targets == [] and int(src[r]) != b
                    n_neg += 1
            assert len(set(labels.tolist())) == len(own)  # every present category keeps its targets
            coin_samples += len(masks) > len(own)
        assert batch["vgd_counts"]["vgd_negatives"] == n_neg
        negatives += n_neg
        total_zero += batch["vgd_counts"]["vgd_negative_zero"]
    assert cross > 0 and negatives > 0 and 20 < coin_samples < 55  # expected ~5/12 of 90
    assert total_zero == zeros > 0  # the archive's zero-feature fill (every absent instance already shown)


def test_same_batch_content_same_draws_in_any_order(processor):
    a = processor.collate(_items(processor, 3))
    again = processor.collate(_items(processor, 3))
    rev = processor.collate(_items(processor, 3, which=(2, 0, 1)))
    for k in ("input_ids", "labels", "cond_ids"):
        assert torch.equal(a[k], again[k])
    for j, i in enumerate((2, 0, 1)):  # each sample's regions and text follow it, not its place
        assert torch.equal(a["region_masks"][i], rev["region_masks"][j])
        assert torch.equal(a["class_labels"][i], rev["class_labels"][j])
        n = int(a["attention_mask"][i].sum())
        assert torch.equal(a["input_ids"][i, :n], rev["input_ids"][j, :n])
    other = [processor.collate(_items(processor, u)) for u in (4, 5, 6)]
    assert any(
        any(not torch.equal(x, y) for x, y in zip(a["region_masks"], o["region_masks"], strict=True))
        for o in other
    )


def test_options_off_give_todays_batch(processor):
    off = XSamProcessor(
        replace(processor.config, vgd_cross_image=False, vgd_negatives=False), processor.tokenizer
    )
    ours = off.collate(_items(off, 5))
    today = processor.collate(_items(processor, 5, strip_pool=True))  # what a shard without a pool gives
    assert ours.keys() == today.keys() and "vgd_counts" not in ours
    for k, v in today.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, ours[k]), k
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(v, ours[k], strict=True)), k
        else:
            assert v == ours[k], k
    assert all(torch.equal(x, torch.full_like(x, b)) for b, x in enumerate(ours["region_image"]))
    # one image: no cross-image draw (counted); a negative there can only get zero features (-1)
    single = processor.collate(_items(processor, 5, which=(0,)))
    assert single["vgd_counts"]["vgd_single_image_batch"] == 1
    assert set(single["region_image"][0].tolist()) <= {0, -1}


def _drawn_batch(proc: XSamProcessor) -> dict:
    """The first use whose batch has a cross-image positive, a negative shown an instance and a zero one."""
    for use in range(50):
        batch = proc.collate(_items(proc, use))
        c = batch["vgd_counts"]
        if c["vgd_negative_zero"] and c["vgd_cross_image"] > c["vgd_negatives"] > c["vgd_negative_zero"]:
            return batch
    raise AssertionError("no use in 50 drew all three")


def test_model_reads_each_region_from_its_source_grid(debug_model, processor):
    model, batch = debug_model, _drawn_batch(processor)
    with torch.no_grad():
        sam_feats, _ = model.encode_sam(batch["extra_pixel_values"])
        image_tokens, grid = model.encode_images(batch["pixel_values"], sam_feats)
        # the random debug encoders give (nearly) the same grid for every image: distinct grids make a read
        # from the wrong image visible
        grid = torch.randn(grid.shape, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        x = model._expand(batch, image_tokens, grid)
        torch.manual_seed(1)  # the same point draws, region by region, straight from the sampler
        direct = [
            [
                model.region_sampler(grid[int(s)], m[None])
                if s >= 0
                else grid.new_zeros(1, 1, grid.shape[-1])
                for m, s in zip(ms, ss, strict=True)
            ]
            for ms, ss in zip(batch["region_masks"], batch["region_image"], strict=True)
        ]
    shift = model.config.num_image_tokens - 1  # the image placeholder comes first
    crossed = zeros = 0
    for b in range(3):
        slots = (batch["input_ids"][b] == model.config.processor.region_token_index).nonzero().flatten()
        for r, pos in enumerate(slots.tolist()):
            assert torch.allclose(x["embeds"][b, pos + shift], direct[b][r][0, 0].to(x["embeds"].dtype))
            src = int(batch["region_image"][b][r])
            if src == -1:  # X-SAM's zero features for a negative with nothing to show
                zeros += int(not x["embeds"][b, pos + shift].any())
                continue
            if src != b:  # its own image's grid would give other features
                torch.manual_seed(2)
                mine = model.region_sampler(grid[b], batch["region_masks"][b][r : r + 1])
                crossed += not torch.allclose(mine, direct[b][r])
    assert crossed > 0 and zeros > 0


def test_a_drawn_micro_batch_trains_one_step():
    torch.manual_seed(0)
    model = build_xsam("debug")
    batch = _drawn_batch(model.processor)
    n_slots = max(len(m) for m in batch["region_masks"])
    out = model(batch, stage=3)
    assert torch.isfinite(out.loss) and all(
        float(out.losses[k]) > 0 for k in ("lm", "cls", "mask_bce", "dice")
    )
    assert out.predictions[-1]["class_queries_logits"].shape[-1] == n_slots + 1  # negatives are classes too
    out.loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("llm.") for n in before) and any(n.startswith("mask_decoder.") for n in before)
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("bad", ["slots", "too_long"])
def test_bad_vgd_items(processor, bad):
    s = vgd_sample(0, 1)
    if bad == "slots":  # a slot without its category: a one-line error naming the sample
        s.meta["slot_category_ids"] = s.meta["slot_category_ids"][:1]
        with pytest.raises(ValueError, match=f"{s.key}: meta slot_category_ids"):
            processor(s, image_bytes(0, *SIZES[0]))
        return
    # a question that would not fit max_length with its negatives keeps its positives (counted)
    lengths = [len(processor.tokenize(vgd_sample(i, 0))["input_ids"]) for i in range(3)]
    j = max(range(3), key=lengths.__getitem__)
    tight = XSamProcessor(replace(processor.config, max_length=lengths[j]), processor.tokenizer)
    seen = 0
    for use in range(40):
        batch = tight.collate(_items(tight, use))
        seen += batch["vgd_counts"]["vgd_negative_too_long"]
        assert len(batch["region_masks"][j]) == len(vgd_sample(j, 0).phrases)
    assert seen > 0


def test_demo_coco_vgd_through_the_loader_workers(processor, tmp_path):
    """The demo's coco_vgd train split through MixtureLoader's DataLoader worker: the loader's ``(seed, use)``
    reach the collate, batches cross images and add negatives, and a second loader draws the same."""
    from pipelines.build import mixture_weights
    from pipelines.build.driver import build
    from pipelines.demo_data import write_demo
    from pipelines.loader import MixtureLoader

    root = write_demo(tmp_path / "datas", families=["vgd"])
    out = tmp_path / "shards"
    build(str(root), str(out), sources=["coco_vgd"])
    mixture_weights.write(str(out), mixture_weights.compute(str(out)))

    def batches() -> list[dict]:
        kw = {"stage": 3, "batch_size": 3, "num_workers": 1, "seed": 5, "length_group": 1}
        loader = MixtureLoader(str(out), transform=processor, collate=processor.collate, **kw)
        got = []
        for b in loader:
            got.append(b.data)
            if len(got) == 12:
                return got
        raise AssertionError("loader ended")

    first, second = batches(), batches()
    totals = Counter()
    for a, b in zip(first, second, strict=True):
        assert a["task"] == "vgdseg" and a["keys"] == b["keys"]
        assert all(torch.equal(x, y) for x, y in zip(a["region_masks"], b["region_masks"], strict=True))
        assert all(torch.equal(x, y) for x, y in zip(a["region_image"], b["region_image"], strict=True))
        assert torch.equal(a["input_ids"], b["input_ids"])
        totals.update(a["vgd_counts"])
    assert totals["vgd_cross_image"] > totals["vgd_negatives"] > 0


@pytest.mark.parametrize("pool,tokens", [("max", 1), ("mean", 4)])
def test_region_sampler_reads_each_region_from_its_image(pool, tokens):
    from xsam_model.modeling.region_sampler import RegionSampler

    sampler = RegionSampler(num_points=16, pool=pool, num_tokens=tokens)
    grids = torch.randn(3, 8, 8, 6, generator=torch.Generator().manual_seed(0))
    masks = torch.rand(5, 32, 32, generator=torch.Generator().manual_seed(1)) > 0.8
    image = torch.tensor([2, 0, 2, 1, 0])
    torch.manual_seed(3)
    got = sampler(grids, masks, image=image)
    torch.manual_seed(3)  # one region at a time from its own grid: the same point draws in the same order
    want = torch.cat([sampler(grids[int(i)], masks[r : r + 1]) for r, i in enumerate(image)])
    assert got.shape == (5, tokens, 6) and torch.equal(got, want)
    torch.manual_seed(3)
    assert not torch.allclose(sampler(grids[0], masks), got)  # every region from image 0 differs
    with pytest.raises(ValueError, match="one image index per region"):
        sampler(grids, masks, image=image[:4])
    # -1: zero tokens (X-SAM's fill for a VGD negative with nothing to show); the others' draws unchanged
    torch.manual_seed(3)
    keep = sampler(grids, masks[[0, 2, 4]], image=image[[0, 2, 4]])
    torch.manual_seed(3)
    got = sampler(grids, masks, image=torch.tensor([2, -1, 2, -1, 0]))
    assert not got[[1, 3]].any() and torch.equal(got[[0, 2, 4]], keep)
