"""Where outputs live: a local folder or any fsspec URI (``s3://…``, ``gs://…``, ``file://…``, ``memory://…``).

Everything the builder writes goes through these few functions, so local runs and shared storage behave
the same: files are written under a temporary name and moved to their final name only when complete.
A remote URI needs the protocol's fsspec package on every node that touches it (``s3fs`` for ``s3://``,
``gcsfs`` for ``gs://``) and the store's usual credentials (``AWS_*`` variables or files, GCP application
default credentials); ``AWS_ENDPOINT_URL`` points both s3fs and pyarrow (Ray Train) at an S3-compatible
store such as MinIO.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipelines.errors import OutputError

TMP_MARK = ".tmp-"


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system of ``url`` and the path on it (no trailing ``/``).

    Directory listings are not cached: what we list (checkpoints, shards, exports) is written by other
    processes — Ray Train workers, other nodes, an earlier attempt — and fsspec keeps one file system object
    per process, whose cached listing of an object store would hide every file written since."""
    fs, path = url_to_fs(str(url), use_listings_cache=False)
    return fs, path.rstrip("/")


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` of ``fs`` (as ``glob``/``find``/``ls`` return it: no protocol) as a URL :func:`fs_and_path`
    resolves to the same file: a local path stays as it is, a remote one gets its protocol back."""
    return path if "file" in fs.protocol else fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


@contextmanager
def atomic_write(fs: fsspec.AbstractFileSystem, path: str) -> IO[bytes]:
    """Open ``path`` for writing under a temporary sibling name; move it into place only on success."""
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/{TMP_MARK}{name}-{uuid.uuid4().hex[:8]}"
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    with atomic_write(fs, path) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.load(f)


PROBE_BYTES = 1 << 20
"""What :func:`check_writable` writes: a location with less room than this fails up front."""


def check_writable(url: str, what: str) -> None:
    """Probe-write :data:`PROBE_BYTES` into ``url`` (created if absent) and remove them, so a read-only,
    full or unreachable output location is one line before any work rather than a traceback after it.
    ``what`` names the option in the message (``--out``). Raises :class:`pipelines.errors.OutputError`."""
    fs, root = fs_and_path(url)
    probe = f"{root}/{TMP_MARK}write-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(root, exist_ok=True)
        if "file" in fs.protocol:  # fsync: the blocks must really be allocated (a full disk fails here)
            with open(probe, "wb") as f:
                f.write(b"\0" * PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        else:
            with fs.open(probe, "wb") as f:
                f.write(b"\0" * PROBE_BYTES)
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise OutputError(
            f"{what} {url}: cannot write there ({reason}); free space, fix its permissions or choose "
            f"another location"
        ) from None
    finally:
        try:
            if fs.exists(probe):
                fs.rm(probe)
        except OSError:
            pass


def remove_temporaries(fs: fsspec.AbstractFileSystem, folder: str) -> int:
    """Delete leftovers of killed writers (``.tmp-*``) under ``folder``; returns how many."""
    if not fs.exists(folder):
        return 0
    n = 0
    for p in fs.find(folder):
        if os.path.basename(p).startswith(TMP_MARK):
            fs.rm(p)
            n += 1
    return n


class LineLog:
    """Text lines appended to a local file or an object at any fsspec URI (rank 0's ``metrics.jsonl``).

    A local file (or ``file://``) is appended to and flushed line by line. Object stores cannot append, so
    for a remote URL the log keeps its text in memory (what the URL already held first: a restarted attempt
    continues the same log) and writes the whole object again at most every ``sync_every_s`` seconds and on
    :meth:`close`; a killed writer loses at most the lines of the last ``sync_every_s`` seconds. One writer
    per URL."""

    def __init__(self, url: str, *, sync_every_s: float = 30.0):
        self.url, self.sync_every_s = str(url), sync_every_s
        self.fs, self.path = fs_and_path(url)
        self._file: IO[str] | None = None
        self._text: list[str] = []
        self._dirty, self._synced_at = False, time.monotonic()
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        elif self.fs.exists(self.path):
            self._text.append(self.fs.cat_file(self.path).decode("utf-8"))

    def write(self, line: str) -> None:
        """Append ``line`` (a newline is added)."""
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
            return
        self._text.append(line + "\n")
        self._dirty = True
        if time.monotonic() - self._synced_at >= self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        """Upload the whole log now (remote URLs; a local file is already flushed)."""
        if self._file is None and self._dirty:
            self._text = ["".join(self._text)]
            self.fs.pipe_file(self.path, self._text[0].encode("utf-8"))  # one PUT: readers never see half
            self._dirty, self._synced_at = False, time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        else:
            self.sync()


# ---------------------------------------------------------------------------------------------- folder swaps
STAGE_MARK = ".tmp-stage-"
_COMPLETE = "COMPLETE"  # written into a staging folder once its new version is whole: it may be swapped in
FAULT_ENV = "XSAM_FAULT_KILL_AT"  # tests: SIGKILL this process at the named point of a swap


def fault_point(name: str) -> None:
    """Kill this process (SIGKILL, as a node loss would) when ``$XSAM_FAULT_KILL_AT`` names ``name``: the
    tests' way to stop a writer between two steps that must both happen."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def replaced_folder(path: str) -> Iterator[str]:
    """Write a new version of the local folder ``path`` elsewhere, then swap it in whole::

        with replaced_folder(out) as tmp:   # tmp: <parent>/.tmp-stage-<name>-<host>-<pid>-<hex>/<name>
            write everything under tmp

    Readers of ``path`` see the complete previous version until the swap, then the complete new one: the
    swap is one ``renameat2(RENAME_EXCHANGE)`` (or one rename when ``path`` did not exist); where the file
    system cannot exchange, ``path`` is moved aside and the new folder renamed in, and a writer killed between
    the two renames is finished by the next one. Staging folders left by dead writers on this host are
    cleaned (or finished) at start; on an error the staging folder is removed and ``path`` is untouched."""
    path = os.path.abspath(path).rstrip("/")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    recover_staged(path)
    top = os.path.join(parent, f"{STAGE_MARK}{name}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staged = os.path.join(top, name)
    os.makedirs(staged)
    try:
        yield staged
        open(os.path.join(top, _COMPLETE), "w").close()
        fault_point("staged")
        _swap_in(top, staged, path)
    except BaseException:
        shutil.rmtree(top, ignore_errors=True)
        raise


def _swap_in(top: str, staged: str, path: str) -> None:
    if not os.path.lexists(path):
        os.rename(staged, path)
    elif not _exchange(staged, path):
        os.rename(path, os.path.join(top, "previous"))
        fault_point("moved_aside")
        os.rename(staged, path)
    fault_point("swapped")
    shutil.rmtree(top)  # the previous version, now inside the staging folder


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    C library or the file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, os.strerror(err), b)


def recover_staged(path: str) -> list[str]:
    """Deal with the staging folders of ``path`` whose writer (on this host) is gone: a complete one whose
    swap was cut between its two renames is moved in (``path`` is missing then); every other one is removed.
    Returns what was done, one line each (also logged)."""
    parent, name = os.path.split(os.path.abspath(path).rstrip("/"))
    done = []
    prefix = f"{STAGE_MARK}{name}-"
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        if not entry.startswith(prefix) or not _writer_gone(entry[len(prefix) :]):
            continue
        top = os.path.join(parent, entry)
        staged = os.path.join(top, name)
        if (
            not os.path.lexists(path)
            and os.path.exists(os.path.join(top, _COMPLETE))
            and os.path.isdir(staged)
        ):
            os.rename(staged, path)
            done.append(f"{path}: the complete new version a killed writer left in {top} moved in")
        elif not os.path.lexists(path) and os.path.isdir(os.path.join(top, "previous")):
            os.rename(os.path.join(top, "previous"), path)
            done.append(f"{path}: the previous version moved back from {top}")
        shutil.rmtree(top, ignore_errors=True)
        done.append(f"removed {top} (left by a killed writer)")
    for line in done:
        logging.getLogger(__name__).warning(line)
    return done


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def _writer_gone(tail: str) -> bool:
    """Whether the writer named in a staging folder's ``<host>-<pid>-<hex>`` has exited (only this host's
    writers can be known gone; another host's folder is left alone)."""
    parts = tail.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(parts[1]) == os.getpid()  # our own pid: an earlier writer in this process
