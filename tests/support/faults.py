"""Worker faults for the Ray Train tests, as trainer callbacks (never part of a production run).

In-process tests pass them to :func:`orchestrate.runner.fit`; a test that submits ``orchestrate/train.py`` as
a Ray job names :func:`from_env` in ``XSAM_TRAIN_CALLBACKS`` and the fault in ``XSAM_TEST_FAULT``::

    XSAM_TRAIN_CALLBACKS=tests.support.faults:from_env XSAM_TEST_FAULT=hold:2
"""

from __future__ import annotations

import os
import signal
import time

from orchestrate.callbacks import Callback

FAULT_ENV = "XSAM_TEST_FAULT"


def _committed() -> None:
    """Wait until what was reported so far is registered, so a restart will find it."""
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


class KillWorker(Callback):
    """SIGKILL rank ``rank`` once (a marker file in the stage folder) after step ``step`` and its
    checkpoint."""

    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def on_step_end(self, trainer, step, metrics) -> None:
        if step != self.step or trainer.rank != self.rank:
            return
        marker = trainer.plan.layout.local_dir() / ".fault-kill-done"
        if marker.exists():
            return
        _committed()
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


class HoldAtStep(Callback):
    """Park every worker after step ``step`` (and its checkpoint) until ``<stage>/.release`` exists; each
    rank writes ``<stage>/.held-rank<r>`` once parked."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, metrics) -> None:
        if step != self.step:
            return
        folder = trainer.plan.layout.local_dir()
        _committed()
        (folder / f".held-rank{trainer.rank}").write_text(str(os.getpid()))
        while not (folder / ".release").exists():
            time.sleep(0.2)


def from_env() -> list[Callback]:
    """``XSAM_TEST_FAULT``: ``kill:STEP:RANK`` or ``hold:STEP`` (unset: no fault)."""
    spec = os.environ.get(FAULT_ENV, "")
    kind, *args = spec.split(":") if spec else ("",)
    if kind == "kill":
        return [KillWorker(int(args[0]), int(args[1]))]
    if kind == "hold":
        return [HoldAtStep(int(args[0]))]
    if kind:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected kill:STEP:RANK or hold:STEP")
    return []


def write_export_killed_at(url: str, k: int, state: dict, config: dict) -> int:
    """:func:`xsam_model.export.write_export` of ``state`` to ``url`` in a forked child, killed (SIGKILL) just
    before its ``k``-th change to the file system of ``url`` (a rename, copy or delete, a file opened for
    writing). Returns the child's exit code: -9 when killed, 0 when the write made fewer than ``k``
    changes."""
    import multiprocessing

    from pipelines import storage
    from xsam_model.export import write_export

    fs_cls = type(storage.fs_and_path(url)[0])

    def child():
        count = [0]
        original = {name: getattr(fs_cls, name) for name in ("mv", "copy", "rm", "open")}

        def counted(name):
            def wrapper(self, *args, **kwargs):
                mode = args[1] if len(args) > 1 else kwargs.get("mode", "rb")
                if name != "open" or "w" in mode:
                    count[0] += 1
                    if count[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                return original[name](self, *args, **kwargs)

            return wrapper

        for name in original:
            setattr(fs_cls, name, counted(name))
        write_export(url, state, stage=1, config=config, lineage={})

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(120)
    if proc.exitcode is None:
        proc.kill()
        raise TimeoutError(f"the export writer killed at change {k} did not finish")
    return proc.exitcode
