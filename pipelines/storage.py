"""Where outputs live: a local folder or any fsspec URI (``s3://…``, ``gs://…``, ``file://…``, ``memory://…``).

Everything the builder writes goes through these few functions, so local runs and shared storage behave
the same: files are written under a temporary name and moved to their final name only when complete.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

TMP_MARK = ".tmp-"


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = url_to_fs(str(url))
    return fs, path.rstrip("/")


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
