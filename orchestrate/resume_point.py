"""Which checkpoint a stage resumes from, decided on the driver before Ray starts.

The resume point is the stage's newest complete checkpoint
(:func:`orchestrate.train_checkpoints.list_checkpoints`: every rank's completion marker there). Ray Train
keeps its own list of a run's checkpoints, ``<stage>/checkpoint_manager_snapshot.json``, and hands its latest
to the workers (``ray.train.get_checkpoint``). That list can go wrong on its own: a full disk while Ray
rewrote it leaves it empty or cut short (Ray then stops with a ``CheckpointManagerInitializationError`` that
names no file), it may name a checkpoint folder that was removed (the same error), or it may lag behind the
newest complete checkpoint (a driver killed between the uploads and Ray's bookkeeping).

Such a snapshot is moved aside (``checkpoint_manager_snapshot.json.bad-<time>``, one warning line naming
both files) and the workers start from the newest complete checkpoint by path
(:attr:`orchestrate.plan.RunPlan.resume_from`). Nothing is lost by that: the snapshot holds no state of the
run that the checkpoints do not (step, optimizer, loader state are in the checkpoint folders); Ray only
forgets which older checkpoints it would have deleted under ``num_to_keep``, and those stay on disk.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime

from orchestrate import train_checkpoints
from orchestrate.run_layout import StageLayout
from pipelines import storage

logger = logging.getLogger(__name__)

SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train v2's list of a run's checkpoints, in its run folder (``ray.train.v2`` constants)."""


def read_snapshot(layout: StageLayout) -> tuple[dict | None, str | None]:
    """``(snapshot, why it is unusable)``: ``(None, None)`` when there is none, ``(dict, None)`` when it is
    readable, ``(None, reason)`` when it is empty or not Ray's JSON."""
    fs, path = storage.fs_and_path(storage.join(layout.dir, SNAPSHOT))
    if not fs.exists(path):
        return None, None
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
        snap = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError) as e:
        return None, f"is unreadable ({e})"
    if snap is None:
        return None, f"is empty ({len(raw)} bytes)"
    if not isinstance(snap, dict) or not isinstance(snap.get("checkpoint_results"), list):
        return None, "is not Ray Train's snapshot JSON"
    return snap, None


def snapshot_names(snap: dict | None) -> tuple[set[str], str | None]:
    """``(every checkpoint folder the snapshot lists, its latest)``."""
    if not snap:
        return set(), None
    names = {r.get("checkpoint_dir_name") for r in snap["checkpoint_results"] if isinstance(r, dict)}
    latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    return {n for n in names if isinstance(n, str)}, latest


def _move_aside(layout: StageLayout, why: str, newest: str | None) -> None:
    fs, path = storage.fs_and_path(storage.join(layout.dir, SNAPSHOT))
    aside = f"{path}.bad-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    fs.mv(path, aside)
    logger.warning(
        "%s: Ray Train's checkpoint list %s; moved aside to %s, resuming from %s",
        storage.url_of(fs, path),
        why,
        storage.url_of(fs, aside),
        newest or "the start (no complete checkpoint)",
    )


def resume_point(layout: StageLayout) -> tuple[list[tuple[int, str]], str | None]:
    """``(the stage's complete checkpoints oldest first, the checkpoint the workers must be given by path)``.
    The second is None when Ray's snapshot already names the newest complete checkpoint as its latest (or
    there is neither); else Ray's snapshot, if any, is moved aside (logged) and the newest complete
    checkpoint is returned."""
    snap, bad = read_snapshot(layout)
    names, latest = snapshot_names(snap)
    found = train_checkpoints.list_checkpoints(layout, registered=names)
    newest = found[-1][1] if found else None
    if snap is not None:
        fs, root = storage.fs_and_path(layout.dir)
        gone = sorted(n for n in names if not fs.exists(f"{root}/{n}"))
        if gone:
            bad = f"names checkpoint folders that are gone ({', '.join(gone)})"
        elif latest != (newest.rstrip("/").rsplit("/", 1)[1] if newest else None):
            bad = f"ends at {latest or 'no checkpoint'}, not at the newest complete one"
    if bad is not None:
        _move_aside(layout, bad, newest)
        return found, newest
    if snap is None and newest is not None:
        logger.info("%s: no Ray Train checkpoint list; resuming from %s", layout.dir, newest)
        return found, newest
    return found, None
