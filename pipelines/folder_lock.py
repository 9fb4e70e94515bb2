"""One writer per folder: a lock file holding the host and pid of the process that holds it.

``<folder>/<name>`` is created with ``O_EXCL``; a second writer stops with a one-line error (the caller's
:class:`~pipelines.errors.XsamError` subclass) naming the holder's host and pid. A lock left by a process that
is gone is taken over: same host and (the pid is not running, or the host rebooted since, or the pid now
belongs to a process started later). A lock of another host is never taken over (its process cannot be
seen from here): the message says which file to remove once that process is known to be gone.

Local and shared file systems only (NFS honours ``O_EXCL``). An object store has no exclusive create, so
there the lock is skipped with a warning: one writer at a time is the user's to ensure.

Used by the build (``<out>/.build.lock``, :mod:`pipelines.build.lock`) and by training
(``<run-root>/stage<N>/.train.lock``, :func:`orchestrate.runner.stage_lock`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator

from pipelines import storage
from pipelines.errors import XsamError

logger = logging.getLogger(__name__)


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def holder_gone(held: dict, me: dict) -> bool:
    """Whether the process recorded in ``held`` is certainly gone (only decidable on its own host)."""
    pid = held.get("pid")
    if held.get("host") != me["host"] or not isinstance(pid, int):
        return False
    if held.get("boot") and me.get("boot") and held["boot"] != me["boot"]:
        return True  # the host rebooted since: every pid of then is gone
    if not _alive(pid):
        return True
    started = held.get("started")
    return started is not None and _start_ticks(pid) not in (None, started)  # the pid was reused


def _holder(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # being written, or unreadable: treated as held by an unknown process


def _try_create(path: str, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
    except OSError:  # a full disk: no half-written lock left behind
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    return True


def me() -> dict:
    """This process as a lock records it."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "boot": _boot_id(), "started": _start_ticks(pid)}


def _take(url: str, path: str, what: str, error: type[XsamError], mine: dict) -> None:
    for _ in range(2):  # once more after taking over a stale lock
        if _try_create(path, mine):
            return
        held = _holder(path)
        if holder_gone(held, mine):
            logger.warning("%s: taking over the lock of a %s that is gone (pid %s)", path, what, held["pid"])
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        raise error(
            f"{url}: another {what} is writing here (host {held.get('host', '?')}, pid {held.get('pid', '?')}); "
            f"wait for it, or remove {path} if that {what} is gone"
        )
    raise error(f"{url}: could not take {path}")


@contextlib.contextmanager
def folder_lock(url: str, name: str, *, what: str, error: type[XsamError]) -> Iterator[None]:
    """Hold ``<url>/<name>`` while the block runs (the folder is created if absent). ``what`` names the
    writer in messages ("build", "training"); ``error`` is raised when another one holds the folder or the
    lock cannot be written (a read-only or full location)."""
    fs, root = storage.fs_and_path(url)
    if "file" not in fs.protocol:
        logger.warning(
            "%s: no lock on object storage: make sure only one %s writes here at a time", url, what
        )
        yield
        return
    path = os.path.join(root, name)
    mine = me()
    try:
        os.makedirs(root, exist_ok=True)
        _take(url, path, what, error, mine)
    except OSError as e:
        raise error(f"{url}: cannot write the lock {path}: {e.strerror or e}") from None
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _holder(path).get("pid") == mine["pid"]:
                os.remove(path)
