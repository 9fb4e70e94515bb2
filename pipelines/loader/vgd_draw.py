"""VGD prompts drawn at batch time (issue 16 item 1), as X-SAM's paper code draws them.

X-SAM ``[archive]`` fills every ``<region>`` slot of a vgdseg sample, at every step, with the prompt of one
instance of the slot's category picked at random among **all** instances of that category in the per-device
batch, from any image (``model/xsam.py:394-413``), its features read from that image's grid; the prompt type is
drawn per access among the instance's non-empty prompts (``dataset/vgdseg_dataset.py:324-330``). With
``use_negative_sample=True, num_class=5`` (stage 3) a sample gets, with probability 0.5, ``randint(0, 5)``
extra slots for categories absent from its image (``dataset/vgdseg_dataset.py:237-241``), shuffled among the
positives; their prompts come from other images of the batch and no target mask carries their label.

This module plans those draws from the samples' ``prompt_pool`` (no tensors, nothing decoded): which instance
and prompt type fills each slot, which negatives are added and where. :meth:`XSamProcessor.collate` decodes
only the chosen prompts, in their source image's SAM frame. Every draw is a pure function of the micro-batch's
content — the seed and the sorted ``(key, use)`` of its samples — never of rank, micro-step or the order of
the samples in the batch: instances are enumerated in key order and each sample draws from its own RNG.

Bad input is counted, never fatal (the counter names are :data:`COUNTERS`): a slot whose category has no
prompt anywhere in the batch keeps the sample's stored prompt; a batch of one image draws among its own
instances; a negative with no candidate category (no other image holds an absent category) is not added.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipelines.schema import REGION_TYPES, PoolPrompt

COUNTERS = (
    "vgd_slots",  # slots planned (positives and negatives)
    "vgd_cross_image",  # slots whose prompt comes from another image of the batch (negatives included)
    "vgd_negatives",  # negative slots added
    "vgd_negative_coin",  # samples whose 0.5 coin asked for negatives
    "vgd_stored_fallback",  # positive slots whose category has no prompt in the batch: stored prompt kept
    "vgd_single_image_batch",  # batches of one image (cross-image drawing impossible)
    "vgd_negative_no_candidate",  # negatives asked for but not added: no absent category in another image
    "vgd_negative_not_extendable",  # samples whose question has no single <p><region></p> list to extend
    "vgd_negative_too_long",  # samples whose question with its negatives would pass max_length: none added
)


@dataclass(frozen=True)
class DrawOptions:
    """``cross_image``: slots draw among the batch's instances (False: the stored same-image prompt, as
    before issue 16); ``negatives``: the archive's negatives (False: X-SAM ``main``, which has none)."""

    cross_image: bool = True
    negatives: bool = True
    negative_prob: float = 0.5  # the archive's coin
    max_negatives: int = 5  # the archive's num_class: randint(0, 5)


@dataclass
class VgdEntry:
    """What the planner needs of one batch sample."""

    key: str
    use: int
    seed: int
    slots: list[int]  # category id of each stored slot, in slot order
    pool: list[PoolPrompt]
    extendable: bool = True  # its question can take extra slots (see the processor)


@dataclass
class SlotPick:
    """What fills one slot: a pool prompt (``rle`` of ``type`` from batch sample ``image``), or the stored
    region ``stored`` of the sample itself (``rle`` None)."""

    category_id: int
    image: int
    negative: bool = False
    type: str | None = None
    rle: dict | None = None
    stored: int | None = None


@dataclass
class SamplePlan:
    """One sample's slots in their new order; ``label_map``: stored slot -> new slot (positives)."""

    slots: list[SlotPick]
    label_map: dict[int, int]
    coin: bool = False  # the 0.5 coin asked for negatives
    requested: int = 0  # randint(0, max_negatives) when the coin said yes
    counts: Counter = field(default_factory=Counter)

    @property
    def negatives(self) -> int:
        return sum(s.negative for s in self.slots)

    def without_negatives(self) -> SamplePlan:
        """The same positives, in their relative order, with no negative slot."""
        keep = [i for i, s in enumerate(self.slots) if not s.negative]
        new_of_old = {old: keep.index(new) for old, new in self.label_map.items()}
        return SamplePlan([self.slots[i] for i in keep], new_of_old, self.coin, self.requested, self.counts)


def _rng(*parts: object) -> random.Random:
    digest = hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def batch_digest(entries: Sequence[VgdEntry]) -> str:
    """The micro-batch's content: its seed(s) and sorted ``(key, use)`` pairs (order- and rank-free)."""
    content = sorted((e.seed, e.key, e.use) for e in entries)
    return hashlib.blake2b(repr(content).encode(), digest_size=16).hexdigest()


def _by_category(entries: Sequence[VgdEntry]) -> dict[int, list[tuple[int, PoolPrompt]]]:
    """category -> [(batch index, instance)], samples in (key, use) order, instances in pool order."""
    order = sorted(range(len(entries)), key=lambda i: (entries[i].key, entries[i].use))
    by_cat: dict[int, list[tuple[int, PoolPrompt]]] = {}
    for i in order:
        for p in entries[i].pool:
            if any(k in p.prompts for k in REGION_TYPES):
                by_cat.setdefault(p.category_id, []).append((i, p))
    return by_cat


def _pick(rng: random.Random, cands: list[tuple[int, PoolPrompt]], category: int, negative: bool) -> SlotPick:
    """One instance uniformly among ``cands`` (as X-SAM), then a prompt type uniformly among its own."""
    image, inst = cands[rng.randrange(len(cands))]
    kinds = [k for k in REGION_TYPES if k in inst.prompts]
    kind = kinds[rng.randrange(len(kinds))]
    return SlotPick(category, image, negative, kind, inst.prompts[kind])


def _positives(i: int, e: VgdEntry, by_cat: dict, opts: DrawOptions, rng, counts: Counter) -> list[SlotPick]:
    out = []
    for s, cat in enumerate(e.slots):
        cands = by_cat.get(cat, []) if opts.cross_image else []
        if cands:
            out.append(_pick(rng, cands, cat, False))
        else:  # same-image option, or no prompt of this category anywhere in the batch
            counts["vgd_stored_fallback"] += bool(opts.cross_image)
            out.append(SlotPick(cat, i, stored=s))
    return out


def _negatives(i: int, e: VgdEntry, by_cat: dict, opts: DrawOptions, rng, plan: SamplePlan) -> list[SlotPick]:
    """The archive's coin and count, then distinct absent categories that another image of the batch holds."""
    plan.coin = rng.random() < opts.negative_prob
    if not plan.coin:
        return []
    plan.counts["vgd_negative_coin"] += 1
    plan.requested = rng.randint(0, opts.max_negatives)
    if not plan.requested:
        return []
    if not e.extendable:
        plan.counts["vgd_negative_not_extendable"] += 1
        return []
    own = set(e.slots) | {p.category_id for p in e.pool}
    absent = sorted(c for c, cands in by_cat.items() if c not in own and any(j != i for j, _ in cands))
    chosen = rng.sample(absent, min(plan.requested, len(absent)))
    plan.counts["vgd_negative_no_candidate"] += plan.requested - len(chosen)
    return [_pick(rng, [c for c in by_cat[cat] if c[0] != i], cat, True) for cat in chosen]


def plan_sample(
    i: int, entries: Sequence[VgdEntry], by_cat: dict, digest: str, opts: DrawOptions
) -> SamplePlan:
    """Sample ``i``'s slots: positives in stored order, negatives inserted at uniform positions (a uniform
    shuffle of the union when the stored order is one, as the archive's ``_sample(pos + neg)``)."""
    e = entries[i]
    rng = _rng(digest, e.key, e.use)
    plan = SamplePlan([], {})
    slots = _positives(i, e, by_cat, opts, rng, plan.counts)
    negs = _negatives(i, e, by_cat, opts, rng, plan) if opts.negatives else []
    origin = list(range(len(slots)))  # stored slot of each position; -1 = negative
    for neg in negs:
        at = rng.randint(0, len(slots))
        slots.insert(at, neg)
        origin.insert(at, -1)
    plan.slots = slots
    plan.label_map = {old: new for new, old in enumerate(origin) if old >= 0}
    plan.counts["vgd_slots"] += len(slots)
    plan.counts["vgd_negatives"] += len(negs)
    plan.counts["vgd_cross_image"] += sum(s.image != i for s in slots)
    return plan


def plan_batch(entries: Sequence[VgdEntry], opts: DrawOptions) -> tuple[list[SamplePlan], Counter]:
    """Every sample's plan and the batch's counters (:data:`COUNTERS`)."""
    digest = batch_digest(entries)
    by_cat = _by_category(entries)
    plans = [plan_sample(i, entries, by_cat, digest, opts) for i in range(len(entries))]
    counts: Counter = Counter({k: 0 for k in COUNTERS})
    counts["vgd_single_image_batch"] += int(opts.cross_image and len({e.key for e in entries}) == 1)
    for p in plans:
        counts.update(p.counts)
    return plans, counts
