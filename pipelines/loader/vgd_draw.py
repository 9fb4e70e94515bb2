"""VGD prompts drawn at batch time (docs/fidelity.md#data-recipe-fidelity), as X-SAM's paper code draws them.

X-SAM ``[archive]`` fills every ``<region>`` slot of a vgdseg sample, at every step, with the prompt of one
instance of the slot's category picked at random among **all** instances of that category in the per-device
batch, from any image (``model/xsam.py:394-413``), its features read from that image's grid; the prompt type
is drawn per access among the instance's non-empty prompts (``dataset/vgdseg_dataset.py:324-330``). With
``use_negative_sample=True, num_class=5`` (stage 3) a sample gets, with probability 0.5, ``randint(0, 5)``
extra slots for categories absent from its image, drawn among the dataset's whole category list
(``dataset/vgdseg_dataset.py:237-241``) and shuffled among the positives; no target mask carries their label.
The model fills every negative slot (``model/xsam.py:401-426``, slots in order): an unused instance of the
slot's category from another image of the batch, else an unused instance of any category absent from the image
and not yet shown to it, else zero features. The three fills are counted apart.

This module plans those draws from the samples' ``prompt_pool`` (no tensors, nothing decoded): which instance
and prompt type fills each slot, which negatives are added and where. :meth:`XSamProcessor.collate` decodes
only the chosen prompts, in their source image's SAM frame. Every draw is a pure function of the micro-batch's
content — the seed and the sorted ``(key, use)`` of its samples — never of rank, micro-step or the order of
the samples in the batch: instances are enumerated in key order and each sample draws from its own RNG.

Bad input is counted, never fatal (the counter names are :data:`COUNTERS`): a slot whose category has no
prompt anywhere in the batch keeps the sample's stored prompt; a batch of one image draws among its own
instances; a negative slot with no instance to show gets zero features (``region_image`` -1), as the archive.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipelines.schema import REGION_TYPES, PoolPrompt

# COCO's 80 instance (thing) category ids: coco_vgd's vocabulary, the archive's ``cat_ids``.
COCO_THING_IDS: tuple[int, ...] = tuple(
    c for c in range(1, 91) if c not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)
FILLS = ("same_category", "any_absent", "zero")  # how a negative slot is filled, in the archive's order

COUNTERS = (
    "vgd_slots",  # slots planned (positives and negatives)
    "vgd_cross_image",  # slots whose prompt comes from another image of the batch (negatives included)
    "vgd_negatives",  # negative slots added
    "vgd_negative_coin",  # samples whose 0.5 coin asked for negatives
    "vgd_negative_same_category",  # negatives shown an instance of their own category (another image)
    "vgd_negative_any_absent",  # negatives shown an instance of another category absent from the image
    "vgd_negative_zero",  # negatives with zero features: no unused absent-category instance in the batch
    "vgd_stored_fallback",  # positive slots whose category has no prompt in the batch: stored prompt kept
    "vgd_single_image_batch",  # batches of one image (cross-image drawing impossible)
    "vgd_negative_no_candidate",  # negatives asked for but not added: the vocabulary has no more absent ones
    "vgd_negative_not_extendable",  # samples whose question has no single <p><region></p> list to extend
    "vgd_negative_too_long",  # samples whose question with its negatives would pass max_length: none added
)


@dataclass(frozen=True)
class DrawOptions:
    """``cross_image``: slots draw among the batch's instances (False: the stored same-image prompt, as
    earlier); ``negatives``: the archive's negatives (False: X-SAM ``main``, which has none)."""

    cross_image: bool = True
    negatives: bool = True
    negative_prob: float = 0.5  # the archive's coin
    max_negatives: int = 5  # the archive's num_class: randint(0, 5)
    vocabulary: tuple[int, ...] = COCO_THING_IDS  # the categories a negative is drawn among (the dataset's)


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
    """What fills one slot: a pool prompt (``rle`` of ``type`` from batch sample ``image``), the stored
    region ``stored`` of the sample itself (``rle`` None), or, for a negative with ``fill == "zero"``, nothing
    (``image`` -1: zero features). ``category_id``: the category of the prompt shown (a zero slot: the one
    drawn)."""

    category_id: int
    image: int
    negative: bool = False
    type: str | None = None
    rle: dict | None = None
    stored: int | None = None
    fill: str | None = None  # negatives: one of FILLS


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

    def negative_counts(self, own: int) -> Counter:
        """The counters this plan's negative slots added (``own``: this sample's batch index)."""
        negs = [s for s in self.slots if s.negative]
        out = Counter(vgd_negatives=len(negs), vgd_slots=len(negs))
        out["vgd_cross_image"] = sum(s.image not in (own, -1) for s in negs)
        out.update(f"vgd_negative_{s.fill}" for s in negs)
        return out

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


Instance = tuple[int, int, PoolPrompt]  # (batch index, index in its pool, the instance)


def _by_category(entries: Sequence[VgdEntry]) -> dict[int, list[Instance]]:
    """category -> [(batch index, pool index, instance)], samples in (key, use) order, instances in pool
    order; only instances with a region prompt."""
    order = sorted(range(len(entries)), key=lambda i: (entries[i].key, entries[i].use))
    by_cat: dict[int, list[Instance]] = {}
    for i in order:
        for j, p in enumerate(entries[i].pool):
            if any(k in p.prompts for k in REGION_TYPES):
                by_cat.setdefault(p.category_id, []).append((i, j, p))
    return by_cat


def _pick(
    rng: random.Random,
    cands: list[Instance],
    negative: bool,
    fill: str | None = None,
    used: set | None = None,
) -> SlotPick:
    """One instance uniformly among ``cands`` (as X-SAM), then a prompt type uniformly among its own;
    ``used`` collects the instance's ``(batch index, pool index)``."""
    image, j, inst = cands[rng.randrange(len(cands))]
    if used is not None:
        used.add((image, j))
    kinds = [k for k in REGION_TYPES if k in inst.prompts]
    kind = kinds[rng.randrange(len(kinds))]
    return SlotPick(inst.category_id, image, negative, kind, inst.prompts[kind], fill=fill)


def _positives(i: int, e: VgdEntry, by_cat: dict, opts: DrawOptions, rng, counts: Counter) -> list[SlotPick]:
    out = []
    for s, cat in enumerate(e.slots):
        cands = by_cat.get(cat, []) if opts.cross_image else []
        if cands:
            out.append(_pick(rng, cands, False))
        else:  # same-image option, or no prompt of this category anywhere in the batch
            counts["vgd_stored_fallback"] += bool(opts.cross_image)
            out.append(SlotPick(cat, i, stored=s))
    return out


def _own(e: VgdEntry) -> set[int]:
    """The categories of the sample's image (its slots and every pooled instance)."""
    return set(e.slots) | {p.category_id for p in e.pool}


def _negative_categories(e: VgdEntry, by_cat: dict, opts: DrawOptions, rng, plan: SamplePlan) -> list[int]:
    """The archive's ``_sample_cats``: the coin, ``randint(0, max_negatives)``, then that many distinct
    categories drawn uniformly among the vocabulary's categories absent from the image (every category a batch
    instance has counts as in the vocabulary)."""
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
    absent = sorted((set(opts.vocabulary) | set(by_cat)) - _own(e))
    chosen = rng.sample(absent, min(plan.requested, len(absent)))
    plan.counts["vgd_negative_no_candidate"] += plan.requested - len(chosen)
    return chosen


def _fill_negatives(e: VgdEntry, slots: list[SlotPick], by_cat: dict, rng: random.Random) -> None:
    """Fill the negative slots in slot order as the archive's model does: an unused instance of the slot's
    category, else an unused instance of any category absent from the image and not yet shown to it, else
    zero features. Positives never show an absent category, so only negatives mark instances used."""
    own = _own(e)
    used: set[tuple[int, int]] = set()
    shown: set[int] = set()
    for k, slot in enumerate(slots):
        if not slot.negative:
            continue
        same = [c for c in by_cat.get(slot.category_id, []) if c[:2] not in used]
        other = [
            c
            for cat, cands in by_cat.items()
            if cat not in own and cat not in shown
            for c in cands
            if c[:2] not in used
        ]
        if same or other:
            slots[k] = _pick(rng, same or other, True, "same_category" if same else "any_absent", used)
            shown.add(slots[k].category_id)
        else:
            slots[k] = SlotPick(slot.category_id, -1, True, fill="zero")


def plan_sample(
    i: int, entries: Sequence[VgdEntry], by_cat: dict, digest: str, opts: DrawOptions
) -> SamplePlan:
    """Sample ``i``'s slots: positives in stored order, negatives inserted at uniform positions (a uniform
    shuffle of the union when the stored order is one, as the archive's ``_sample(pos + neg)``), then
    filled."""
    e = entries[i]
    rng = _rng(digest, e.key, e.use)
    plan = SamplePlan([], {})
    slots = _positives(i, e, by_cat, opts, rng, plan.counts)
    negs = _negative_categories(e, by_cat, opts, rng, plan) if opts.negatives else []
    origin = list(range(len(slots)))  # stored slot of each position; -1 = negative
    for cat in negs:
        at = rng.randint(0, len(slots))
        slots.insert(at, SlotPick(cat, -1, True))
        origin.insert(at, -1)
    _fill_negatives(e, slots, by_cat, rng)
    plan.slots = slots
    plan.label_map = {old: new for new, old in enumerate(origin) if old >= 0}
    plan.counts["vgd_slots"] += len(slots) - len(negs)
    plan.counts["vgd_cross_image"] += sum(s.image not in (i, -1) for s in slots if not s.negative)
    plan.counts.update(plan.negative_counts(i))
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
