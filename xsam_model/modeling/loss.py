"""Segmentation losses: transformers' Mask2Former Hungarian matcher and loss, extended for a per-batch
number of classes (phrases), samples without targets, an optional ignore region, and X-SAM's mask-count
normaliser averaged over the data-parallel ranks (per micro-step) or over the whole global batch.

``global_batch``: the trainer counts the target masks of every micro-batch of an optimizer step on every rank
before the first forward (:meth:`xsam_model.modeling.xsam.XSam.count_loss_targets`), and sets the normaliser
``M / (world × accumulation)`` for the step with :meth:`SegLoss.step_normaliser`; the gradient is then the
same whatever the split of the global batch (X-SAM's ``global`` at its own layout, accumulation 1). Without a
step normaliser (a direct model call, inference) it behaves as ``global``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss, sample_point

REDUCE_MODES = ("global_batch", "global", "local")


class SegLoss(Mask2FormerLoss):
    """Class CE (no-object weight), point-sampled mask BCE and Dice, weights from the config, per layer.

    ``class_queries_logits`` may have any number of columns; the last one is always "no-object".
    """

    def __init__(self, config: Mask2FormerConfig, *, num_masks_reduce: str = "global_batch"):
        super().__init__(config, weight_dict={})
        self.weights = {
            "cls": config.class_weight,
            "mask_bce": config.mask_weight,
            "dice": config.dice_weight,
        }
        if num_masks_reduce not in REDUCE_MODES:
            raise ValueError(f"num_masks_reduce must be one of {REDUCE_MODES}, got {num_masks_reduce!r}")
        self.num_masks_reduce = num_masks_reduce
        self._step_num_masks: float | None = None

    @contextlib.contextmanager
    def step_normaliser(self, num_masks: float) -> Iterator[None]:
        """Within the block, the mask losses are divided by ``num_masks`` (at least 1): the global batch's
        target count / (world × accumulation), set by the trainer for one optimizer step
        (``global_batch``)."""
        self._step_num_masks = float(num_masks)
        try:
            yield
        finally:
            self._step_num_masks = None

    def num_masks(self, class_labels, device) -> torch.Tensor:
        """The mask losses' normaliser: the step's (``global_batch`` inside :meth:`step_normaliser`), this
        rank's target count (``local``), or (``global``, X-SAM, DETR; ``global_batch`` outside a step) the
        count summed over the process group divided by the world size; at least 1. A collective in the last
        case: under ``torch.distributed`` every rank must call it in the same steps."""
        if self._step_num_masks is not None and self.num_masks_reduce == "global_batch":
            return torch.tensor(self._step_num_masks, device=device).clamp(min=1.0)
        n = torch.tensor(float(sum(len(c) for c in class_labels)), device=device)
        if self.num_masks_reduce != "local" and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            if world > 1:
                dist.all_reduce(n, op=dist.ReduceOp.SUM)
                n = n / world
        return n.clamp(min=1.0)

    def loss_labels(self, class_queries_logits, class_labels, indices):
        b, q, c = class_queries_logits.shape
        weight = class_queries_logits.new_ones(c, dtype=torch.float32)
        weight[-1] = self.eos_coef
        target = torch.full((b, q), c - 1, dtype=torch.long, device=class_queries_logits.device)
        for i, (src, tgt) in enumerate(indices):
            target[i, src.to(target.device)] = class_labels[i][tgt].to(target.device)
        return F.cross_entropy(class_queries_logits.float().transpose(1, 2), target, weight=weight)

    def loss_masks_ignore(self, masks_queries_logits, mask_labels, indices, num_masks, ignore_mask):
        """BCE and Dice on importance-sampled points; points in ``ignore_mask`` (BxLxL) carry no loss."""
        src = [(i, s) for i, (s, _) in enumerate(indices) for s in s.tolist()]
        if not src:
            zero = masks_queries_logits.sum() * 0.0
            return zero, zero
        bi = torch.tensor([i for i, _ in src], device=masks_queries_logits.device)
        pred = masks_queries_logits[bi, torch.tensor([s for _, s in src], device=bi.device)][
            :, None
        ]  # Mx1xHxW
        target = torch.cat([mask_labels[i][t.to(mask_labels[i].device)] for i, (_, t) in enumerate(indices)])
        target = target[:, None].to(pred.dtype)  # Mx1xLxL
        with torch.no_grad():
            coords = self.sample_points_using_uncertainty(
                pred.float(),
                self.calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            ).to(pred.dtype)
            labels = sample_point(target, coords, align_corners=False).squeeze(1)  # MxP
            keep = torch.ones_like(labels)
            if ignore_mask is not None:
                ign = ignore_mask[bi][:, None].to(pred.dtype)
                keep = 1.0 - (
                    sample_point(ign, coords, mode="nearest", align_corners=False).squeeze(1) > 0.5
                ).to(pred.dtype)
        logits = sample_point(pred, coords, align_corners=False).squeeze(1).float()  # MxP
        labels, keep = labels.float(), keep.float()
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        bce = ((bce * keep).sum(1) / keep.sum(1).clamp(min=1)).sum() / num_masks
        # dice on kept points only: ignored points count neither as prediction nor as target
        probs = logits.sigmoid() * keep
        dice = 1 - (2 * (probs * labels).sum(-1) + 1) / (probs.sum(-1) + (labels * keep).sum(-1) + 1)
        return bce, dice.sum() / num_masks

    def forward(self, predictions, mask_labels, class_labels, ignore_mask=None) -> dict[str, torch.Tensor]:
        """predictions: per-layer dicts from :class:`MaskDecoder` (last = final); mask_labels: B × NixLxL;
        class_labels: B × Ni long; ignore_mask: BxLxL bool or None. Returns weighted ``cls``, ``mask_bce``,
        ``dice``, each summed over the layers used (all with auxiliary loss, else the final one). The batch
        may be any list of decoder runs (images, or per-``<SEG>`` runs)."""
        device = predictions[-1]["masks_queries_logits"].device
        num_masks = self.num_masks(class_labels, device)
        totals = {k: torch.zeros((), device=device) for k in self.weights}
        for pred in predictions:
            masks, logits = pred["masks_queries_logits"], pred["class_queries_logits"]
            indices = []
            for i in range(masks.shape[0]):
                if len(class_labels[i]) == 0:
                    indices.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
                else:
                    indices += self.matcher(
                        masks[i : i + 1].float(),
                        logits[i : i + 1].float(),
                        [mask_labels[i]],
                        [class_labels[i]],
                    )
            bce, dice = self.loss_masks_ignore(masks, mask_labels, indices, num_masks, ignore_mask)
            totals["cls"] = totals["cls"] + self.weights["cls"] * self.loss_labels(
                logits, class_labels, indices
            )
            totals["mask_bce"] = totals["mask_bce"] + self.weights["mask_bce"] * bce
            totals["dice"] = totals["dice"] + self.weights["dice"] * dice
        return totals
