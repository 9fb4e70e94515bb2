"""The loader's resume state: format ``xsam-loader/2``, the checks that a state fits a loader, and the
conversion of an ``xsam-loader/1`` state.

A state is plain JSON with no rank or worker count in its data (docs/architecture.md, "Loader state"):

- identity fields (:func:`identity`): format, stage, mixture digest, seed, global batch, window, exclusion
  flags, length grouping, re-draw switches — a state loads only into a loader where all of them are equal;
- ``split``: how the global batch was split (batch_size, grad_accum, world_size, lanes) — informative; it
  decides only where a state taken inside a global step can resume (:func:`resume_micro_step`);
- ``micro_step`` / ``step``: the next micro-step and its global step;
- ``cursors``: the datasets' global stream positions at the start of ``step`` (recomputed and compared);
- ``stats``: this rank's counters (:meth:`pipelines.loader.stats.LoaderStats.to_dict`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pipelines.loader.stats import LoaderStats

logger = logging.getLogger(__name__)

STATE_FORMAT = "xsam-loader/2"
V1_FORMAT = "xsam-loader/1"
V1_BEFORE = "030c8b6"  # the last commit whose loader wrote xsam-loader/1 (per-(rank, lane) slices)


@dataclass(frozen=True)
class Split:
    """How one loader splits the global batch (``batch_size × grad_accum × world_size``), and who it is."""

    batch_size: int
    grad_accum: int
    world_size: int
    lanes: int
    rank: int = 0

    def to_dict(self) -> dict:
        """The state's ``split`` field (the rank is not part of it: any rank's state resumes any rank)."""
        return {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "world_size": self.world_size,
            "lanes": self.lanes,
        }


def identity(
    *,
    stage: int,
    mixture_digest: str,
    seed: int,
    global_batch: int,
    shuffle_window: int,
    exclude_flags: Sequence[str],
    length_group: int,
    redraw_conversations: bool,
    variant_categories: bool,
) -> dict:
    """The fields a state must share with the loader that loads it, in the state's key order."""
    return {
        "format": STATE_FORMAT,
        "stage": stage,
        "mixture_digest": mixture_digest,
        "seed": seed,
        "global_batch": global_batch,
        "shuffle_window": shuffle_window,
        "exclude_flags": list(exclude_flags),
        "length_group": length_group,
        "redraw_conversations": redraw_conversations,
        "variant_categories": variant_categories,
    }


def check_fits(state: Mapping, mine: Mapping) -> None:
    """ValueError naming every identity field where ``state`` and this loader differ (a state written before
    ``variant_categories`` was a field re-drew genseg prompts: True)."""
    state = {"variant_categories": True, **state}
    diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
    if diff:
        raise ValueError(
            "loader state does not fit this loader (field: state vs loader): "
            + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
        )


def from_v1(state: Mapping, mine: Mapping, split: Split, names: Sequence[str]) -> dict:
    """An ``xsam-loader/1`` state (per-(rank, lane) positions) as a v2 state, only when it was written by the
    same rank, world size, lanes, sizes and identity as this loader; else ValueError naming the fields.

    Its positions cannot be carried over (they index per-(rank, lane) slices that the world-size-free order
    does not have), so the run continues at the state's micro-step in the new order: from that step on it
    sees the samples any v2 run of this seed sees at those steps, not the ones a v1 run would have. That is
    logged as a warning."""
    state = dict(state)
    if isinstance(state.get("stage"), str) and state["stage"].isdigit():
        state["stage"] = int(state["stage"])  # states saved before stages were ints
    state.setdefault("length_group", 1)  # states saved before length grouping: ungrouped
    skip = ("format", "global_batch", "redraw_conversations", "variant_categories")
    v1 = {k: v for k, v in mine.items() if k not in skip}
    v1.update(rank=split.rank, world_size=split.world_size, lanes=split.lanes)
    v1.update(batch_size=split.batch_size, grad_accum=split.grad_accum)
    if split.batch_size == 1:  # v1 stored length_group 1 when batch_size was 1
        v1["length_group"] = 1
    try:
        check_fits(state, v1)
    except ValueError as e:
        raise ValueError(
            f"{e} — an {V1_FORMAT} state (written by the per-(rank, lane) loader up to commit {V1_BEFORE}) "
            f"loads only on the same rank, world size, loader workers and sizes; restart the stage or resume "
            f"with the sizes it was written with"
        ) from None
    logger.warning(
        "loader: %s state at micro-step %d continues in the world-size-free order (xsam-loader/2): the samples "
        "from here on are not the ones the per-(rank, lane) loader would have read",
        V1_FORMAT,
        int(state["micro_step"]),
    )
    stats = LoaderStats.new(names)
    for lane_stats in state.get("stats", []):
        stats.merge(LoaderStats.from_dict(lane_stats))
    micro = int(state["micro_step"])
    return {
        **mine,
        "split": split.to_dict(),
        "micro_step": micro,
        "step": micro // split.grad_accum,
        "stats": stats.to_dict(),
    }


def resume_micro_step(state: Mapping, split: Split) -> int:
    """The micro-step a loader split as ``split`` resumes at: the state's under the same split,
    ``step × grad_accum`` under another one — which needs the state at a global-step boundary (ValueError
    with the reason otherwise)."""
    micro, saved = int(state["micro_step"]), state.get("split", {})
    if all(saved.get(k) == v for k, v in split.to_dict().items() if k != "lanes"):
        return micro
    accum = int(saved.get("grad_accum", 0)) or None
    if accum is None or micro % accum:
        raise ValueError(
            f"loader state stopped at micro-step {micro}, inside a global step of its split {saved} "
            f"(micro-batches of one step are only known as a whole); this loader splits the global batch as "
            f"{split.to_dict()}: resume from a checkpoint taken at a global-step boundary, or with the same "
            f"batch_size / grad_accum / world_size"
        )
    return micro // accum * split.grad_accum


def resume(
    state: Mapping,
    mine: Mapping,
    split: Split,
    names: Sequence[str],
    cursors: Callable[[int], dict[str, int]],
    seed: int,
) -> tuple[int, dict]:
    """Check ``state`` against this loader (identity ``mine``, split ``split``, datasets ``names``) and return
    ``(micro-step to resume at, the state's stats)``: v1 states are converted (:func:`from_v1`); the saved
    cursors must be the ones ``cursors(step)`` recomputes from the seed. ValueError names what differs."""
    if state.get("format") == V1_FORMAT:
        state = from_v1(state, mine, split, names)
    elif state.get("format") != STATE_FORMAT:
        raise ValueError(f"loader state format {state.get('format')!r}: this loader reads {STATE_FORMAT}")
    check_fits(state, mine)
    micro = resume_micro_step(state, split)
    saved_step = int(state["step"])
    if "cursors" in state:
        expected = cursors(saved_step)
        if state["cursors"] != expected:
            raise ValueError(
                f"loader state cursors {state['cursors']} at step {saved_step} are not the ones seed "
                f"{seed} gives ({expected}): written by another sampler"
            )
    return micro, state["stats"]
