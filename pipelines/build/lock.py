"""One build at a time per output folder (issue 20 item 6).

``<out>/.build.lock`` holds the host and pid of the build that holds it, created with ``O_EXCL``. A second
build into the same ``--out`` stops with a one-line :class:`~pipelines.errors.BuildConfigError` naming that
host and pid. A lock left by a build that died (same host, pid no longer running) is taken over. Local
folders only: on object storage there is no exclusive create, so the lock is skipped there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator

from pipelines import storage
from pipelines.errors import BuildConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = ".build.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # being written, or unreadable: treated as held by an unknown build


def _try_create(path: str, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(me, f)
    return True


@contextlib.contextmanager
def build_lock(out_url: str) -> Iterator[None]:
    """Hold ``<out>/.build.lock`` for the duration of a build."""
    fs, root = storage.fs_and_path(out_url)
    if getattr(fs, "protocol", None) not in ("file", ("file", "local")):
        yield
        return
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK_FILE)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):  # once more after taking over a stale lock
        if _try_create(path, me):
            break
        held = _holder(path)
        if held.get("host") == me["host"] and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
            logger.warning("%s: taking over the lock of a build that died (pid %s)", path, held["pid"])
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        raise BuildConfigError(
            f"{out_url}: another build is writing here (host {held.get('host', '?')}, pid {held.get('pid', '?')}); "
            f"wait for it, or remove {path} if that build is gone"
        )
    else:
        raise BuildConfigError(f"{out_url}: could not take {path}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _holder(path).get("pid") == me["pid"]:
                os.remove(path)
