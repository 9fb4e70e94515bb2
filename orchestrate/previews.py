"""Predictions on a fixed batch, as images with masks, for wandb (rank 0 only).

The batch is the first ``n`` samples of the first segmentation dataset of the stage's mixture, read straight
from its first shard: the same samples at every step and after every restart, independent of the training
loader's order. :func:`render` runs the model in eval mode and turns the final decoder layer's queries into a
label map (one label per confident query) next to the ground truth, in the SAM frame cropped to the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import storage
from pipelines.shard_store import iter_shard_samples

SEG_TASKS = ("genseg", "refseg", "reaseg", "gcgseg", "vgdseg", "ovseg", "intseg")


def read_samples(shards_url: str, shard_files: Sequence[str], n: int) -> list[tuple[Any, bytes | None]]:
    """The first ``n`` (Sample, image bytes) of the given shards (paths relative to ``shards_url``), in
    order."""
    fs, root = storage.fs_and_path(shards_url)
    pairs = (p for rel in shard_files for p in iter_shard_samples(fs, storage.join(root, rel)))
    return list(islice(pairs, n))


def fixed_batch(shards_url: str, stage_mixture, processor, n: int) -> tuple[dict | None, list]:
    """``(collated batch, samples)`` of the stage's first segmentation dataset, or ``(None, [])``."""
    seg = [d for d in stage_mixture.datasets if d.task in SEG_TASKS]
    if not seg or n <= 0:
        return None, []
    pairs = read_samples(shards_url, [s.file for s in seg[0].shards], n)
    items, samples = [], []
    for sample, image in pairs:
        try:
            items.append(processor(sample, image))
            samples.append(sample)
        except ValueError:  # a sample the processor refuses is simply not previewed
            continue
    return (processor.collate(items), samples) if items else (None, [])


def _label_map(masks: torch.Tensor, order: Sequence[int], labels: Sequence[int]) -> np.ndarray:
    """masks NxHxW bool → HxW int: pixel = labels[i] + 1 of the last mask in ``order`` covering it, else 0."""
    out = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    for i in order:
        out[masks[i]] = int(labels[i]) + 1
    return out.numpy()


def _image(batch: dict, b: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Sample ``b``'s SAM-frame pixels, de-normalised and cropped to the image: HxWx3 uint8."""
    h, w = (int(v) for v in batch["scaled_size"][b])
    img = batch["extra_pixel_values"][b].float().cpu()
    img = (img * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
    return (img[:, :h, :w].permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _truth_labels(model, batch: dict, b: int, sample, stage: int) -> tuple[dict[int, str], torch.Tensor]:
    """``({label map value: name}, per-mask class labels)`` of sample ``b`` (label -1 = no class)."""
    if stage != 1:
        return {i + 1: p for i, p in enumerate(sample.phrases)}, batch["class_labels"][b]
    # linear head: class = index into the processor's category ids; name them by phrase
    cats = model.config.processor.category_ids
    names = {i + 1: f"category {cid}" for i, cid in enumerate(cats)}
    truth_labels = batch["category_labels"][b]
    for m, c in zip(sample.masks, truth_labels.tolist(), strict=False):
        if c >= 0 and 0 <= m.label < len(sample.phrases):
            names[c + 1] = sample.phrases[m.label]
    return names, truth_labels


@torch.no_grad()
def render(
    model,
    batch: dict,
    samples: Sequence[Any],
    *,
    stage: int,
    mean: Sequence[float],
    std: Sequence[float],
    score_threshold: float = 0.5,
    max_masks: int = 20,
) -> list[dict]:
    """Model predictions on ``batch`` → ``[{"image", "pred", "truth", "labels", "caption"}]`` (see
    Tracker)."""
    was_training = model.training
    model.eval()
    try:
        out = model(batch, stage=stage, compute_loss=False)
    finally:
        model.train(was_training)
    if not out.predictions:
        return []
    final = out.predictions[-1]
    L = batch["extra_pixel_values"].shape[-1]
    masks = F.interpolate(
        final["masks_queries_logits"].float(), size=(L, L), mode="bilinear", align_corners=False
    )
    probs = final["class_queries_logits"].float().softmax(-1)[..., :-1]  # drop no-object: BxQxC
    previews = []
    for b, sample in enumerate(samples):
        image = _image(batch, b, mean, std)
        h, w = image.shape[:2]
        names, truth_labels = _truth_labels(model, batch, b, sample, stage)
        score, label = probs[b].max(-1)  # Q
        keep = [int(q) for q in score.argsort() if score[q] >= score_threshold][
            -max_masks:
        ]  # ascending score
        pred = _label_map((masks[b] > 0).cpu()[:, :h, :w], keep, label.cpu().tolist())
        gt = batch["mask_labels"][b][:, :h, :w].bool()
        valid = [i for i in range(len(truth_labels)) if truth_labels[i] >= 0]
        truth = _label_map(gt, valid, truth_labels.tolist())
        shown = np.unique(np.concatenate([pred.ravel(), truth.ravel()]))
        names.update({i: names.get(i, f"class {i - 1}") for i in shown if i})
        previews.append(
            {
                "image": image,
                "pred": pred,
                "truth": truth,
                "labels": {int(k): str(v) for k, v in names.items()},
                "caption": f"{sample.key} ({len(keep)} predicted, {len(valid)} true masks)",
            }
        )
    return previews
