"""One build at a time per output folder: ``<out>/.build.lock`` (:func:`pipelines.folder_lock.folder_lock`).

A second build into the same ``--out`` stops with a one-line :class:`~pipelines.errors.BuildConfigError`
naming the first one's host and pid; a lock left by a build that died on this host is taken over. Local and
shared folders only: on object storage the lock is skipped with a warning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pipelines.errors import BuildConfigError
from pipelines.folder_lock import folder_lock

LOCK_FILE = ".build.lock"


@contextlib.contextmanager
def build_lock(out_url: str) -> Iterator[None]:
    """Hold ``<out>/.build.lock`` for the duration of a build."""
    with folder_lock(out_url, LOCK_FILE, what="build", error=BuildConfigError):
        yield
