"""How one stage-3 batch is decoded: which ``<SEG>`` conditions which decoder run, which phrases are its
classes, which masks are its targets (``DecoderConfig.seg_reduce``; reference/xsam_fidelity.md D1).

Pure tensor functions of the projected LLM states; no module state. Modes:

- ``per_seg`` (paper, refseg/reaseg): one run per ``<SEG>`` (S runs, batched); run (b, j) is conditioned on
  sample b's j-th ``<SEG>``, its classes are all phrases of the batch concatenated (sample order) plus the
  background, and its target is the union of sample b's masks labelled j, with label ``offset_b + j``.
- ``main``: one run per image, conditioned on its last ``<SEG>``; batch-concatenated classes, labels offset.
- ``last`` / ``mean``: one run per image, conditioned on its last ``<SEG>`` / the mean of its ``<SEG>``;
  classes are the sample's own phrases, padded to the batch maximum (``valid`` marks real ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodePlan:
    """R decoder runs (R = B, or S = number of ``<SEG>`` in the batch for ``per_seg``)."""

    seg_embeds: torch.Tensor
    """RxC: added to every query of the run."""
    cond: torch.Tensor
    """RxKxC phrase embeddings (the classes, before the background column)."""
    valid: torch.Tensor
    """RxK bool: real phrase columns (padding columns get logit -1e9)."""
    rows: torch.Tensor | None
    """R long: the image of each run; None = one run per image, in order."""
    runs: torch.Tensor
    """Rx2 long: (image, ``<SEG>`` index) of each run; the index is -1 for one-run-per-image modes."""
    masks: list[torch.Tensor] | None = None
    """R × NrxLxL targets (None without targets)."""
    labels: list[torch.Tensor] | None = None
    """R × Nr class indices into the run's K phrase columns."""


def span_means(hidden: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden BxTxC, ids BxT (k on the tokens of span k, -1 elsewhere) → BxKxC span means, BxK bool
    present."""
    k = max(int(ids.max()) + 1, 1)
    onehot = (ids.unsqueeze(1) == torch.arange(k, device=ids.device)[None, :, None]).to(hidden.dtype)  # BxKxT
    counts = onehot.sum(-1)
    return torch.bmm(onehot, hidden) / counts.clamp(min=1).unsqueeze(-1), counts > 0


def _reduce_seg(seg: torch.Tensor, present: torch.Tensor, how: str) -> torch.Tensor:
    """BxNxC per-``<SEG>`` embeddings → BxC: the last present one, or the mean of the present ones (zeros for
    a sample without ``<SEG>``)."""
    w = present.to(seg.dtype)
    if how == "last":
        w = w * (present.cumsum(1) == present.sum(1, keepdim=True)).to(seg.dtype)
    return (seg * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1)


def _global_index(valid: torch.Tensor) -> torch.Tensor:
    """BxK bool → BxK long: the column of phrase (b, k) in the batch concatenation (-1 where absent)."""
    index = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)
    index[valid] = torch.arange(int(valid.sum()), device=valid.device)
    return index


def plan_decoding(
    mode: str,
    hidden: torch.Tensor,
    cond_ids: torch.Tensor,
    seg_ids: torch.Tensor,
    masks: list[torch.Tensor] | None = None,
    labels: list[torch.Tensor] | None = None,
) -> DecodePlan:
    """hidden BxTxC (projected LLM states); cond_ids/seg_ids BxT; optional per-sample targets: masks
    B × NixLxL and labels B × Ni (phrase indices, already checked to be in range)."""
    cond, valid = span_means(hidden, cond_ids)  # BxKxC, BxK
    seg, present = span_means(hidden, seg_ids)  # BxNxC, BxN
    b = hidden.shape[0]
    if mode in ("last", "mean"):
        runs = torch.stack(
            [torch.arange(b, device=hidden.device), torch.full((b,), -1, device=hidden.device)], 1
        )
        return DecodePlan(_reduce_seg(seg, present, mode), cond, valid, None, runs, masks, labels)
    index = _global_index(valid)
    flat = cond[valid]  # KtotxC, sample order
    if mode == "main":
        runs = torch.stack(
            [torch.arange(b, device=hidden.device), torch.full((b,), -1, device=hidden.device)], 1
        )
        plan = DecodePlan(
            _reduce_seg(seg, present, "last"),
            flat.unsqueeze(0).expand(b, -1, -1),
            valid.new_ones(b, flat.shape[0]),
            None,
            runs,
        )
        if labels is not None:
            plan.masks = masks
            plan.labels = [index[i, lab.to(index.device)].to(lab.device) for i, lab in enumerate(labels)]
        return plan
    if mode != "per_seg":
        raise ValueError(f"unknown seg_reduce mode {mode!r}")
    bi, ji = present.nonzero(as_tuple=True)  # S runs: sample, <SEG> index (sample order, then <SEG> order)
    s = bi.shape[0]
    plan = DecodePlan(
        seg[bi, ji],
        flat.unsqueeze(0).expand(s, -1, -1),
        valid.new_ones(s, flat.shape[0]),
        bi,
        torch.stack([bi, ji], 1),
    )
    if labels is not None:
        plan.masks, plan.labels = _per_seg_targets(bi.tolist(), ji.tolist(), index, masks, labels)
    return plan


def _per_seg_targets(bi, ji, index, masks, labels) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One target per run (b, j): the union of sample b's masks labelled j (none if it has no such mask),
    labelled with phrase (b, j)'s column in the batch concatenation."""
    out_m, out_l = [], []
    for b, j in zip(bi, ji, strict=True):
        m = masks[b][(labels[b] == j).to(masks[b].device)]
        if len(m) > 1:
            m = m.amax(0, keepdim=True)  # several masks of one phrase → one target, as one referent
        col = int(index[b, j]) if j < index.shape[1] else -1  # a <SEG> without a phrase has no masks either
        out_m.append(m)
        out_l.append(torch.full((len(m),), col, dtype=torch.long, device=labels[b].device))
    return out_m, out_l


def count_targets(mode: str, seg_ids: torch.Tensor, labels: list[torch.Tensor]) -> int:
    """The number of target masks :func:`plan_decoding` gives the loss, from the token ids alone (no LLM
    pass): seg_ids BxT, labels B × Ni phrase indices. ``per_seg`` has one target per ``<SEG>`` j of sample b
    that has a mask labelled j (several masks of a phrase are one union); the other modes keep every mask."""
    if mode != "per_seg":
        return sum(len(lab) for lab in labels)
    total = 0
    for b, lab in enumerate(labels):
        segs = seg_ids[b][seg_ids[b] >= 0].unique().tolist()
        total += len(set(segs) & set(lab.tolist()))
    return total
