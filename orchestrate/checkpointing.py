"""Ray Train checkpoints of one stage: every rank's DeepSpeed shard + its loader state + the train state.

One checkpoint folder, merged by Ray Train from what each rank reported (``ray.train.report`` with a
``Checkpoint.from_directory``)::

    checkpoint_<time>/
        latest, deepspeed/…                     DeepSpeed: mp_rank_00_model_states.pt (rank 0) and
                                                zero_pp_rank_<r>_mp_rank_00_optim_states.pt (every rank)
        loader_rank<r>.json                     each rank's :class:`pipelines.loader.stream.MixtureLoader` state
        train_state.json                        step, samples, mixture seen, resume key (rank 0)

Resuming is Ray Train v2's: run ``fit()`` again with the same ``RunConfig(name, storage_path)`` and
``ray.train.get_checkpoint()`` returns the latest checkpoint (v2 refuses ``resume_from_checkpoint``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrate.errors import ResumeError
from orchestrate.run_layout import StageLayout
from pipelines import storage

DS_TAG = "deepspeed"
TRAIN_STATE = "train_state.json"


def loader_file(rank: int) -> str:
    return f"loader_rank{rank}.json"


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

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def check_resume_key(saved: dict, current: dict, where: str) -> None:
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        raise ResumeError(
            f"checkpoint {where} was written by a run with other settings (field: checkpoint vs now): "
            + "; ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items())
            + ". Resume with the same settings, or start the stage under another --run-root."
        )


def check_loader_layout(checkpoint_url: str, world_size: int, lanes: int) -> None:
    """The checkpoint's loader states were written by ``world_size`` ranks × ``lanes`` DataLoader lanes
    (``max(1, loader workers)``), one ``loader_rank<r>.json`` per rank; else :class:`ResumeError` with both
    layouts. A checkpoint without loader states is left to :func:`restore` to refuse.

    Why: :class:`~pipelines.loader.stream.MixtureLoader` keeps its positions per (rank, lane) slice, so a
    state fits only the layout that wrote it (a world-size-free state is issue 21 item 1). Checked on the
    driver, so a changed ``--num-workers`` or ``--loader-workers`` is one line before Ray starts instead of a
    failure in every worker, retried ``max_failures`` times."""
    fs, path = storage.fs_and_path(checkpoint_url)
    files = fs.glob(f"{path}/loader_rank*.json")
    if not files:
        return
    ranks = sorted(int(f.rsplit("loader_rank", 1)[1].removesuffix(".json")) for f in files)
    try:
        state = storage.read_json(fs, f"{path}/{loader_file(ranks[0])}")
        saved_world, saved_lanes = int(state["world_size"]), int(state["lanes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"{checkpoint_url}/{loader_file(ranks[0])}: unreadable loader state ({e})") from e
    if ranks != list(range(saved_world)):
        raise ResumeError(
            f"checkpoint {checkpoint_url} holds loader states of ranks {ranks}, but they were written by "
            f"{saved_world} ranks (incomplete checkpoint?)"
        )
    if (saved_world, saved_lanes) != (world_size, lanes):
        raise ResumeError(
            f"checkpoint {checkpoint_url} was written by {saved_world} workers × {saved_lanes} loader lanes, "
            f"this run has {world_size} × {lanes}: the loader state is kept per (rank, lane), so resume with "
            f"--num-workers {saved_world} --loader-workers {saved_lanes if saved_lanes > 1 else '0 (or 1)'} "
            f"(resuming on another world size or worker count is not supported yet)"
        )


def save(engine, *, rank: int, loader_state: dict, train_state: TrainState, metrics: dict[str, Any]) -> None:
    """Every rank: write its shard + loader state into a temporary folder and report it (a barrier)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="xsam-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)  # collective: every rank writes its optimizer partition
        (Path(tmp) / loader_file(rank)).write_text(json.dumps(loader_state))
        if rank == 0:
            (Path(tmp) / TRAIN_STATE).write_text(json.dumps(asdict(train_state)))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine, checkpoint, *, rank: int, resume_key: dict) -> tuple[TrainState, dict]:
    """Load DeepSpeed states (model, optimizer partition, scheduler) and return (train state, loader state)."""
    with checkpoint.as_directory() as d:
        d = Path(d)
        state_file, loader = d / TRAIN_STATE, d / loader_file(rank)
        if not state_file.is_file() or not loader.is_file():
            raise ResumeError(
                f"checkpoint {checkpoint.path} lacks {TRAIN_STATE} or {loader.name} (was it written "
                f"with another world size?)"
            )
        state = TrainState.from_dict(json.loads(state_file.read_text()))
        check_resume_key(state.resume_key, resume_key, str(checkpoint.path))
        path, _ = engine.load_checkpoint(str(d), tag=DS_TAG, load_module_strict=True)
        if path is None:
            raise ResumeError(f"DeepSpeed found no states under {d}/{DS_TAG}")
        return state, json.loads(loader.read_text())


def list_checkpoints(layout: StageLayout) -> list[tuple[int, str]]:
    """``[(step, checkpoint folder)]`` of a stage, oldest first (read from their train states)."""
    fs, _ = storage.fs_and_path(layout.dir)
    out = []
    for f in fs.glob(f"{layout.checkpoint_glob}/{TRAIN_STATE}"):
        try:
            step = int(storage.read_json(fs, f)["step"])
        except (OSError, ValueError, KeyError):
            continue
        out.append((step, f.rsplit("/", 1)[0]))
    return sorted(out)


def latest_train_state(checkpoint_url: str) -> TrainState:
    fs, path = storage.fs_and_path(checkpoint_url)
    return TrainState.from_dict(storage.read_json(fs, f"{path}/{TRAIN_STATE}"))
