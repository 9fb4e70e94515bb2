"""Where outputs live: a local folder or any fsspec URI (``s3://…``, ``gs://…``, ``file://…``, ``memory://…``).

Everything the builder writes goes through these few functions, so local runs and shared storage behave
the same: files are written under a temporary name and moved to their final name only when complete.
A remote URI needs the protocol's fsspec package on every node that touches it (``s3fs`` for ``s3://``,
``gcsfs`` for ``gs://``) and the store's usual credentials (``AWS_*`` variables or files, GCP application
default credentials); ``AWS_ENDPOINT_URL`` points both s3fs and pyarrow (Ray Train) at an S3-compatible
store such as MinIO.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

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
