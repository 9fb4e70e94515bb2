"""Ray Train checkpoints of one stage: every rank's DeepSpeed shard + its loader state + the train state.

One checkpoint folder, merged by Ray Train from what each rank reported (``ray.train.report`` with a
``Checkpoint.from_directory``)::

    checkpoint_<time>/
        latest, deepspeed/…                     DeepSpeed: mp_rank_00_model_states.pt (rank 0) and
                                                zero_pp_rank_<r>_mp_rank_00_optim_states.pt (every rank)
        loader_rank<r>.json                     each rank's :class:`pipelines.loader.MixtureLoader` state
        train_state.json                        step, samples, mixture seen, resume key (rank 0)
        complete_rank<r>.json                   rank r's completion marker, written after its upload: the
                                                files it uploaded with their sizes, and the world size

        universal/…                             DeepSpeed's universal format of deepspeed/, made by the driver
                                                when a later run resumes on another world size
                                                (:mod:`orchestrate.universal`)

A checkpoint counts only when complete (:func:`checkpoint_complete`): every rank's marker is there and
every file the markers list has its size. A full disk, a kill or a lost node part-way through an upload
leaves a folder without all markers, which :func:`list_checkpoints` leaves out (logged), so a resume takes
the newest complete checkpoint (:mod:`orchestrate.resume_point`, which also keeps Ray Train's own checkpoint
list in line with it).

Resuming is Ray Train v2's: run ``fit()`` again with the same ``RunConfig(name, storage_path)`` and
``ray.train.get_checkpoint()`` returns the latest checkpoint (v2 refuses ``resume_from_checkpoint``).

Another world size: the resume key holds the global batch, not the world size or the micro × accumulation
split, so a stage continues on another ``--num-workers`` / ``--loader-workers`` when its global batch is kept.
The DeepSpeed state then loads from the universal conversion (ZeRO-1/2) or directly (ZeRO-0, unpartitioned);
the loader state loads on any rank when it is world-size-free (``xsam-loader/2``: rank 0's step and global
cursors, each rank's own counters when the checkpoint has them); an ``xsam-loader/1`` state still fits only
the (ranks, lanes) layout that wrote it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrate import universal
from orchestrate.run_errors import ResumeError
from orchestrate.run_layout import StageLayout
from pipelines import storage

# Heavy imports (torch, ray) are deferred into the functions that need them: the driver reads layouts without.

logger = logging.getLogger(__name__)

DS_TAG = "deepspeed"
TRAIN_STATE = "train_state.json"
WORLD_FREE_LOADER_FORMATS = ("xsam-loader/2",)
"""Loader state formats that hold no rank or lane (step + per-dataset global cursors): any rank loads them."""


def loader_file(rank: int) -> str:
    return f"loader_rank{rank}.json"


def marker_file(rank: int) -> str:
    return f"complete_rank{rank}.json"


MARKER_FORMAT = "xsam-complete/1"


def marker_record(local_dir: str | Path, rank: int, world_size: int) -> dict:
    """Rank ``rank``'s completion marker for its local checkpoint folder: every file in it (relative path →
    size) and the world size, so a reader knows how many markers make the checkpoint whole."""
    local = Path(local_dir)
    files = {
        p.relative_to(local).as_posix(): p.stat().st_size
        for p in sorted(local.rglob("*"))
        if p.is_file() and not p.match("complete_rank*.json")  # markers describe data, not each other
    }
    return {"format": MARKER_FORMAT, "rank": rank, "world_size": world_size, "files": files}


def upload_then_mark(storage_context, local_dir: str, rank: int, world_size: int):
    """Ray Train's ``checkpoint_upload_fn`` for this rank: Ray's own upload of its folder
    (``storage_context.persist_current_checkpoint``, what Ray does without an upload function), then the
    rank's marker (:func:`marker_record`), written last: an upload cut short by a full disk or a kill leaves
    no marker, and the checkpoint does not count."""
    record = marker_record(local_dir, rank, world_size)  # now: Ray deletes the folder after the upload

    def upload(checkpoint, checkpoint_dir_name: str):
        persisted = storage_context.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
        with persisted.filesystem.open_output_stream(f"{persisted.path}/{marker_file(rank)}") as f:
            f.write(json.dumps(record).encode())
        return persisted

    return upload


def checkpoint_complete(checkpoint_url: str) -> str | None:
    """None when the checkpoint is complete (every rank's marker, and every file they list at its size);
    else why not, in a few words."""
    fs, path = storage.fs_and_path(checkpoint_url)
    markers = {}
    for f in fs.glob(f"{path}/complete_rank*.json"):
        try:
            rec = storage.read_json(fs, f)
            markers[int(rec["rank"])] = rec
        except (OSError, ValueError, KeyError, TypeError):
            return f"{f.rsplit('/', 1)[1]} is unreadable"
    if not markers:
        return "no completion marker"
    world = markers.get(0, {}).get("world_size")
    if not isinstance(world, int) or world < 1:
        return "rank 0 did not finish its upload"
    missing = [r for r in range(world) if r not in markers]
    if missing:
        return f"rank(s) {missing} did not finish their upload"
    sizes = {k.removeprefix(path + "/"): v.get("size") for k, v in fs.find(path, detail=True).items()}
    for rec in markers.values():
        for name, size in rec.get("files", {}).items():
            if sizes.get(name) != size:
                return f"{name} is {sizes.get(name, 'missing')} bytes, rank {rec['rank']} uploaded {size}"
    return None


@dataclass
class TrainState:
    """What rank 0 records besides the DeepSpeed states: enough to continue counting and to check a resume."""

    step: int = 0
    """Optimizer steps done."""
    samples: int = 0
    tokens: int = 0
    source_steps: dict[str, int] = field(default_factory=dict)
    """Steps drawn from each dataset so far (the mixture actually seen)."""
    resume_key: dict = field(default_factory=dict)
    attempt: int = 0
    """How many times this stage has (re)started; 0 = the first start."""
    layout: dict = field(default_factory=dict)
    """How the run that wrote the checkpoint was split: ``world_size``, ``micro_batch``, ``grad_accum``,
    ``loader_workers`` (empty in checkpoints written before elastic resume: see :meth:`saved_world_size`)."""

    def saved_world_size(self) -> int:
        """Ranks that wrote the checkpoint (older checkpoints kept it in the resume key's batch)."""
        if "world_size" in self.layout:
            return int(self.layout["world_size"])
        return int(self.resume_key.get("batch", {}).get("world_size", 0))

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def check_resume_key(saved: dict, current: dict, where: str) -> None:
    """Every field of ``current`` (:meth:`~orchestrate.stages.StageConfig.resume_key`) as in ``saved``; else
    :class:`ResumeError` listing each difference. Keys written before elastic resume held the whole batch
    split (``batch``); only its global batch is compared now."""
    if "global_batch" not in saved and isinstance(saved.get("batch"), dict):
        saved = {**saved, "global_batch": saved["batch"].get("global_batch")}
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        raise ResumeError(
            f"checkpoint {where} was written by a run with other settings (field: checkpoint vs now): "
            + "; ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items())
            + ". Resume with the same settings, or start the stage under another --run-root."
        )


def check_loader_layout(checkpoint_url: str, world_size: int, lanes: int) -> None:
    """The checkpoint's loader states fit a run of ``world_size`` ranks × ``lanes`` DataLoader lanes
    (``max(1, loader workers)``); else :class:`ResumeError` with both layouts. A checkpoint without loader
    states is left to :func:`restore` to refuse.

    A world-size-free state (:data:`WORLD_FREE_LOADER_FORMATS`) fits any layout: only rank 0's file must be
    there. An ``xsam-loader/1`` state keeps its positions per (rank, lane) slice, so it fits only the layout
    that wrote it, with one ``loader_rank<r>.json`` per rank. Checked on the driver, so a changed
    ``--num-workers`` or ``--loader-workers`` is one line before Ray starts instead of a failure in every
    worker, retried ``max_failures`` times."""
    fs, path = storage.fs_and_path(checkpoint_url)
    files = fs.glob(f"{path}/loader_rank*.json")
    if not files:
        return
    ranks = sorted(int(f.rsplit("loader_rank", 1)[1].removesuffix(".json")) for f in files)
    state = _read_loader_state(fs, path, checkpoint_url, ranks[0])
    if state.get("format") in WORLD_FREE_LOADER_FORMATS:
        if ranks[0] != 0:
            raise ResumeError(f"checkpoint {checkpoint_url} lacks {loader_file(0)} (incomplete checkpoint?)")
        return
    try:
        saved_world, saved_lanes = int(state["world_size"]), int(state["lanes"])
    except (ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"{checkpoint_url}/{loader_file(ranks[0])}: unreadable loader state ({e})") from e
    if ranks != list(range(saved_world)):
        raise ResumeError(
            f"checkpoint {checkpoint_url} holds loader states of ranks {ranks}, but they were written by "
            f"{saved_world} ranks (incomplete checkpoint?)"
        )
    if (saved_world, saved_lanes) != (world_size, lanes):
        raise ResumeError(
            f"checkpoint {checkpoint_url} was written by {saved_world} workers × {saved_lanes} loader lanes, "
            f"this run has {world_size} × {lanes}: its loader state ({state.get('format', 'xsam-loader/1')}) "
            f"is kept per (rank, lane), so resume with --num-workers {saved_world} --loader-workers "
            f"{saved_lanes if saved_lanes > 1 else '0 (or 1)'} (states written since the world-size-free "
            f"loader, {WORLD_FREE_LOADER_FORMATS[0]}, resume on any)"
        )


def _read_loader_state(fs, path: str, checkpoint_url: str, rank: int) -> dict:
    try:
        return storage.read_json(fs, f"{path}/{loader_file(rank)}")
    except (OSError, ValueError) as e:
        raise ResumeError(f"{checkpoint_url}/{loader_file(rank)}: unreadable loader state ({e})") from e


def prepare_deepspeed_state(checkpoint_url: str, world_size: int, zero_stage: int) -> bool:
    """Driver side, before Ray Train starts: make the checkpoint loadable on ``world_size`` ranks. A ZeRO-1/2
    checkpoint of another world size is converted to DeepSpeed's universal format once
    (:func:`orchestrate.universal.convert`, reused on later resumes). Returns whether the workers load the
    universal folder (:func:`loads_universal` says the same on their side)."""
    saved_world = latest_train_state(checkpoint_url).saved_world_size()
    if not saved_world or not universal.needs_universal(saved_world, world_size, zero_stage):
        return False  # 0: a layout this checkpoint does not record; DeepSpeed's own load says what it finds
    logger.info(
        "checkpoint %s was written by %d workers, this run has %d: DeepSpeed's ZeRO-%d state goes through "
        "its universal format",
        checkpoint_url,
        saved_world,
        world_size,
        zero_stage,
    )
    universal.convert(checkpoint_url, DS_TAG)
    return True


def loads_universal(checkpoint, world_size: int, zero_stage: int, *, run_root: str, rank: int) -> bool:
    """Worker side, before ``deepspeed.initialize``: whether the DeepSpeed state of ``checkpoint`` (a
    ``ray.train.Checkpoint``) must come from its universal folder (then the engine is built with
    ``load_universal``). The driver converts before Ray starts when it knows the world size; under an
    elastic worker range (:func:`orchestrate.runner.fit`'s ``min_workers``) only the workers know it, so
    rank 0 converts a checkpoint still lacking the folder while the others wait (a collective: every rank
    calls this)."""
    import torch.distributed as dist

    fs, path = checkpoint.filesystem, checkpoint.path
    with fs.open_input_stream(f"{path}/{TRAIN_STATE}") as f:
        saved_world = TrainState.from_dict(json.loads(f.read())).saved_world_size()
    if not saved_world or not universal.needs_universal(saved_world, world_size, zero_stage):
        return False
    if rank == 0:
        universal.convert(_checkpoint_url(path, run_root), DS_TAG)  # reused when the driver made it
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return True


def _checkpoint_url(path: str, run_root: str) -> str:
    """A Ray checkpoint's path as a URL :mod:`pipelines.storage` opens: Ray drops the scheme of its
    ``storage_path`` (``s3://b/run`` → ``b/run/…``), which the run root still has."""
    scheme = run_root.split("://", 1)[0] if "://" in run_root else ""
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def save(
    engine,
    *,
    rank: int,
    loader_state: dict,
    train_state: TrainState,
    metrics: dict[str, Any],
    upload: str = "async",
) -> None:
    """Every rank: write its shard + loader state into a local temporary folder and report it to Ray Train
    (a barrier). ``upload="async"``: Ray Train copies the folder to the run root in a background thread (one
    upload at a time, in order) and deletes it afterwards, so the next steps train meanwhile; a checkpoint
    counts once every rank's upload is done, and a worker lost mid-upload resumes from the previous one.
    ``sync``: the step waits for the upload."""
    import ray.train

    # not a TemporaryDirectory: an async upload reads the folder after report() returns, and removes it
    tmp = tempfile.mkdtemp(prefix="xsam-ckpt-")
    engine.save_checkpoint(tmp, tag=DS_TAG)  # collective: every rank writes its optimizer partition
    (Path(tmp) / loader_file(rank)).write_text(json.dumps(loader_state))
    if rank == 0:
        (Path(tmp) / TRAIN_STATE).write_text(json.dumps(asdict(train_state)))
    mode = ray.train.CheckpointUploadMode.ASYNC if upload == "async" else ray.train.CheckpointUploadMode.SYNC
    context = ray.train.get_context()
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(tmp),
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
        checkpoint_upload_fn=upload_then_mark(context.get_storage(), tmp, rank, context.get_world_size()),
    )


def restore(
    engine, checkpoint, *, rank: int, resume_key: dict, universal_state: bool = False
) -> tuple[TrainState, dict, bool]:
    """Load DeepSpeed states (model, optimizer partition, scheduler) and return (train state, loader state,
    whether the loader state's counters are this rank's: :func:`loader_state_for_rank`).
    ``universal_state``: from the checkpoint's universal folder (another world size wrote it; the engine was
    built with ``load_universal``, :func:`loads_universal`)."""
    with checkpoint.as_directory() as d:
        d = Path(d)
        state_file = d / TRAIN_STATE
        if not state_file.is_file():
            raise ResumeError(f"checkpoint {checkpoint.path} lacks {TRAIN_STATE}")
        state = TrainState.from_dict(json.loads(state_file.read_text()))
        check_resume_key(state.resume_key, resume_key, str(checkpoint.path))
        loader_state, own_stats = loader_state_for_rank(d, rank, str(checkpoint.path))
        ds_dir = d / universal.UNIVERSAL_DIR if universal_state else d
        path, _ = engine.load_checkpoint(str(ds_dir), tag=DS_TAG, load_module_strict=True)
        if path is None:
            raise ResumeError(f"DeepSpeed found no states under {ds_dir}/{DS_TAG}")
        if universal_state:
            _load_buffers(engine, ds_dir / DS_TAG)
        return state, loader_state, own_stats


def loader_state_for_rank(d: Path, rank: int, where: str) -> tuple[dict, bool]:
    """This rank's loader state from checkpoint folder ``d``, and whether its counters (``stats``) are this
    rank's own. World-size-free states (:data:`WORLD_FREE_LOADER_FORMATS`): rank 0's step and cursors,
    with this rank's own counters when the checkpoint has a file for it; else (a rank the writing run did
    not have) the loader starts its counters at zero (``keep_stats=False``; logged). Older states: this
    rank's own file (the driver checked the layout)."""
    first, own = d / loader_file(0), d / loader_file(rank)
    if first.is_file():
        state = json.loads(first.read_text())
        if state.get("format") in WORLD_FREE_LOADER_FORMATS:
            if rank == 0:
                return state, True
            if own.is_file():
                return {**state, "stats": json.loads(own.read_text()).get("stats")}, True
            logger.info(
                "rank %d: checkpoint %s has no %s (written by fewer workers): its loader counters start at "
                "zero; the data order comes from rank 0's step and cursors",
                rank,
                where,
                own.name,
            )
            return state, False
    if not own.is_file():
        raise ResumeError(f"checkpoint {where} lacks {own.name} (was it written with another world size?)")
    return json.loads(own.read_text()), True


def _load_buffers(engine, tag_dir: Path) -> None:
    """After a universal load: the module's buffers from the saved module state. DeepSpeed's universal load
    restores parameters from ``zero/`` only (frozen ones are rebuilt identically by every run); a buffer
    a forward pass updates would otherwise restart from its initial value."""
    import torch

    buffers = dict(engine.module.named_buffers())
    if not buffers:
        return
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    saved = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    with torch.no_grad():
        for name, buf in buffers.items():
            if name in saved:
                buf.copy_(saved[name].to(buf.device, buf.dtype))


def list_checkpoints(layout: StageLayout, registered: Collection[str] = ()) -> list[tuple[int, str]]:
    """``[(step, checkpoint folder)]`` of a stage's complete checkpoints (:func:`checkpoint_complete`),
    oldest first (steps read from their train states). An incomplete folder is left out with a warning
    naming it. ``registered``: folder names Ray Train's snapshot lists; such a folder without any marker
    (written before markers existed) counts as complete, as Ray registers a checkpoint only after every
    rank's upload."""
    fs, _ = storage.fs_and_path(layout.dir)
    out = []
    folders = [
        d for d, info in fs.glob(layout.checkpoint_glob, detail=True).items() if info["type"] == "directory"
    ]
    for d in sorted(folders):  # not checkpoint_manager_snapshot.json
        url = storage.url_of(fs, d)  # s3://… keeps its protocol
        why = checkpoint_complete(url)
        if why == "no completion marker" and d.rsplit("/", 1)[1] in registered:
            why = None
        try:
            step = int(storage.read_json(fs, f"{d}/{TRAIN_STATE}")["step"]) if why is None else -1
        except (OSError, ValueError, KeyError, TypeError):
            why = f"{TRAIN_STATE} is unreadable"
        if why is not None:
            logger.warning(
                "checkpoint %s is incomplete (%s): not resumed from; remove it to free its space", url, why
            )
            continue
        out.append((step, url))
    return sorted(out)


def latest_train_state(checkpoint_url: str) -> TrainState:
    fs, path = storage.fs_and_path(checkpoint_url)
    return TrainState.from_dict(storage.read_json(fs, f"{path}/{TRAIN_STATE}"))
