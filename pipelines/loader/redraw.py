"""Conversations re-drawn at load time (docs/fidelity.md#data-recipe-fidelity), as X-SAM re-draws them on
every ``__getitem__``.

A shard stores one rendering of each conversation (use 0, seeded by ``(seed, key)`` at build time). Each later
use of the sample re-draws its wording from the Sample's structured fields with an RNG that is a pure function
of ``(seed, key, use)``, so a resumed run sees exactly the text an uninterrupted one would have seen:

* genseg (train): the category prompt as the archive's ``use_variant_cat`` (stage 3): with probability 0.5 the
  whole vocabulary, else the present categories plus ``randint(0, 10000 − |present|)`` absent ones (so nearly
  always all of them), shuffled either way; mask labels follow their phrase. "Present" = a category with a
  target mask (a crowd-only category is not known to the Sample and counts as absent; its pixels are ignored
  anyway). ``redraw(..., variant_categories=False)`` keeps the stored list. Then the wordings;
* ovseg / vgdseg: the question and answer wordings (the phrase list and its order stay: labels are slots);
* refseg: the turn order (labels follow their turn) and each turn's question and answer wording;
* reaseg (LISA): each turn's 0.5 coin between the plain and the explanatory answer, and its wordings; the
  explanation is ``meta["explanation"]`` (written by the LISA converter since its version 2), else read back
  from an explained turn of the stored rendering (an older shard's sample whose stored turns are all plain
  keeps plain answers); every use's draw is counted by :func:`reaseg_counts` (:data:`COUNTERS`);
* gcgseg: the question wording and the answer's suffix (the tagged caption stays);
* chat, intseg: unchanged.

Use 0 returns the stored Sample untouched. Every re-drawn Sample is checked with
:func:`pipelines.schema.validate`; a failure is a :class:`~pipelines.errors.LoaderError` naming the source and
key, never a silent fallback.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

from pipelines import templates
from pipelines.errors import LoaderError
from pipelines.schema import IMAGE, Sample, Turn, validate

__all__ = ["COUNTERS", "reaseg_counts", "redraw", "use_rng", "variant_prompt"]

COUNTERS = (
    "reaseg_turns",  # reaseg train turns used
    "reaseg_explained_turns",  # ... whose coin asked for the explanation
    "reaseg_unexplained_samples",  # reaseg train samples used with no explanation to give
)


def use_rng(seed: int, key: str, use: int) -> random.Random:
    """The RNG of one use of one sample: a pure function of ``(seed, key, use)``."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{use}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _image_prefix(sample: Sample) -> str:
    """The image token the stored first user turn starts with (``<image>\\n``, ``<image>`` or nothing)."""
    first = sample.conversation[0].text if sample.conversation else ""
    if not first.startswith(IMAGE):
        return ""
    return IMAGE + "\n" if first.startswith(IMAGE + "\n") else IMAGE


def _with_image(sample: Sample, question: str) -> str:
    return templates.with_image(question, _image_prefix(sample))


def _genseg(sample: Sample, rng: random.Random) -> Sample:
    question = templates.pick(rng, templates.GENSEG_QUESTIONS).format(
        cats=templates.join_tags(sample.phrases)
    )
    answer = templates.pick(rng, templates.SEG_ANSWERS)
    return replace(
        sample, conversation=[Turn("user", _with_image(sample, question)), Turn("assistant", answer)]
    )


VARIANT_NUM_CLASS = 10000  # the archive's GenSegDataset num_class, which its stage-3 COCO config leaves as is


def variant_prompt(sample: Sample, rng: random.Random) -> Sample:
    """The archive's ``use_variant_cat`` prompt (module docstring): phrases re-chosen and shuffled, each
    mask's label moved to its phrase's new slot."""
    n = len(sample.phrases)
    pos = sorted({m.label for m in sample.masks if m.label >= 0})
    if rng.random() < 0.5:
        neg = sorted(set(range(n)) - set(pos))
        keep = pos + rng.sample(neg, min(len(neg), rng.randint(0, max(VARIANT_NUM_CLASS - len(pos), 0))))
    else:
        keep = list(range(n))
    rng.shuffle(keep)
    slot = {old: new for new, old in enumerate(keep)}
    return replace(
        sample,
        phrases=[sample.phrases[o] for o in keep],
        masks=[replace(m, label=slot[m.label]) if m.label >= 0 else m for m in sample.masks],
    )


def _vgdseg(sample: Sample, rng: random.Random) -> Sample:
    # the stored question's <p><region></p> list is rebuilt from the slot count (one slot per phrase)
    regions = templates.join_tags(sample.phrases)
    question = templates.pick(rng, templates.VGD_QUESTIONS).format(regions=regions)
    answer = templates.pick(rng, templates.SEG_ANSWERS)
    return replace(
        sample, conversation=[Turn("user", _with_image(sample, question)), Turn("assistant", answer)]
    )


def _refseg(sample: Sample, rng: random.Random) -> Sample:
    """Turns in a new random order (X-SAM shuffles the objects of a sample), labels following their turn."""
    order = list(range(len(sample.phrases)))
    rng.shuffle(order)
    new_label = {old: new for new, old in enumerate(order)}
    conversation: list[Turn] = []
    for i, old in enumerate(order):
        q = templates.pick(rng, templates.REFSEG_QUESTIONS).format(phrase=templates.tag(sample.phrases[old]))
        conversation.append(Turn("user", _with_image(sample, q) if i == 0 else q))
        conversation.append(Turn("assistant", templates.pick(rng, templates.REFSEG_ANSWERS)))
    relabelled = [replace(m, label=new_label.get(m.label, m.label)) for m in sample.masks]
    regions = [replace(r, label=new_label.get(r.label, r.label)) for r in sample.regions]
    return replace(
        sample,
        conversation=conversation,
        phrases=[sample.phrases[o] for o in order],
        masks=relabelled,
        regions=regions,
    )


def lisa_explanation(sample: Sample) -> str | None:
    """The sample's explanation: ``meta["explanation"]``, else the text before the suffix of an explained turn
    of the stored rendering (``meta["explained"]`` marks them), else None."""
    if sample.meta.get("explanation"):
        return sample.meta["explanation"]
    answers = [t.text for t in sample.conversation if t.role == "assistant"]
    for answer, explained in zip(answers, sample.meta.get("explained") or [], strict=False):
        if not explained:
            continue
        for suffix in sorted(templates.REASEG_EXPLAIN_SUFFIXES, key=len, reverse=True):
            if answer.endswith(" " + suffix):
                return answer[: -len(suffix) - 1]
    return None


def reaseg_counts(sample: Sample) -> dict[str, int]:
    """One use of a reaseg sample, as :data:`COUNTERS` (its ``meta["explained"]``: this use's coins)."""
    explained = sample.meta.get("explained") or []
    return {
        "reaseg_turns": len(sample.phrases),
        "reaseg_explained_turns": sum(bool(x) for x in explained),
        "reaseg_unexplained_samples": int(lisa_explanation(sample) is None),
    }


def _reaseg(sample: Sample, rng: random.Random) -> Sample:
    """Per turn, X-SAM's 0.5 coin between the explanatory and the plain answer (when there is an
    explanation)."""
    explanation = lisa_explanation(sample)
    pool = (
        templates.REASEG_LONG_QUESTIONS
        if sample.meta.get("is_sentence")
        else templates.REASEG_SHORT_QUESTIONS
    )
    conversation: list[Turn] = []
    explained: list[bool] = []
    for i, phrase in enumerate(sample.phrases):
        sent = templates.tag(phrase)
        explained.append(bool(explanation) and rng.random() < 0.5)
        if explained[-1]:
            q = templates.pick(rng, templates.REASEG_EXPLAIN_QUESTIONS).format(sent=sent)
            a = f"{explanation} {templates.pick(rng, templates.REASEG_EXPLAIN_SUFFIXES)}"
        else:
            q = templates.pick(rng, pool).format(sent=sent)
            a = templates.pick(rng, templates.SEG_ANSWERS)
        conversation += [Turn("user", _with_image(sample, q) if i == 0 else q), Turn("assistant", a)]
    return replace(sample, conversation=conversation, meta={**sample.meta, "explained": explained})


def _gcgseg(sample: Sample, rng: random.Random) -> Sample:
    """A new question wording and answer suffix; the tagged caption (everything before the suffix) stays."""
    answer = sample.conversation[-1].text
    tagged = next(
        (
            answer[: -len(s) - 1]
            for s in sorted(templates.GCG_ANSWER_SUFFIXES, key=len, reverse=True)
            if answer.endswith(" " + s)
        ),
        None,
    )
    if tagged is None:
        raise LoaderError(f"{sample.source} {sample.key}: stored GCG answer ends with no known suffix")
    question = _with_image(sample, templates.pick(rng, templates.GCG_QUESTIONS))
    suffix = templates.pick(rng, templates.GCG_ANSWER_SUFFIXES)
    return replace(sample, conversation=[Turn("user", question), Turn("assistant", f"{tagged} {suffix}")])


_BY_TASK = {
    "genseg": _genseg,
    "ovseg": _genseg,
    "vgdseg": _vgdseg,
    "refseg": _refseg,
    "reaseg": _reaseg,
    "gcgseg": _gcgseg,
}


def redraw(sample: Sample, seed: int, use: int, variant_categories: bool = True) -> Sample:
    """The Sample as used for the ``use``-th time: use 0 is the stored rendering; later uses re-draw the
    conversation (see the module docstring; ``variant_categories=False``: genseg keeps its stored category
    list). Raises :class:`LoaderError` (source and key) if the re-drawn Sample breaks a schema invariant."""
    fn = _BY_TASK.get(sample.task)
    if use == 0 or fn is None or not sample.conversation:
        return sample
    rng = use_rng(seed, sample.key, use)
    if variant_categories and sample.task == "genseg" and sample.split == "train" and sample.phrases:
        sample = variant_prompt(sample, rng)
    out = fn(sample, rng)
    try:
        validate(out)
    except Exception as e:  # noqa: BLE001 — any invariant broken is this module's bug, named with the sample
        raise LoaderError(
            f"{sample.source} {sample.key}: re-drawn conversation (use {use}) is invalid: {e}"
        ) from e
    return out
