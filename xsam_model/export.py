"""A stage export: the artifact format the model package owns, read and written in one place.

An export folder (a local path or any fsspec URI) holds::

    model.safetensors       the stage's trainable weights
    config.json             the resolved stage config and model config (flavor, init folder, processor)
    lineage.json            where the weights came from, and ``model_sha256`` of model.safetensors
                            (written last)

:func:`write_export` is the only writer (the trainer's export, the untrained baseline, ``convert import``);
:class:`Export` is the only reader (stage chaining, ``train.py --init-from``, ``evaluate.py --export``,
``predict.py``, ``convert export``). Every read checks ``model.safetensors`` against the ``model_sha256`` its
lineage records, so a flipped byte is refused, never trained on or scored (docs/integrity.md).

Replacing an export never deletes the previous one first (docs/checkpoints.md, "Exports"): the new export is
written into ``<name>.tmp-<id>`` beside it, the old one is moved to ``<name>.prev-<id>``, the new one moved
into place, then the old one deleted. A writer killed at any step leaves a complete export: the new one, or
the old one under ``.prev-`` which the next reader puts back. The next writer deletes stale temporaries.
Object stores have no folder rename, so there the files are copied and moved one by one with ``lineage.json``
removed first and written last: a folder without its lineage is incomplete and a reader falls back to the
``.prev-`` copy.

One writer per export folder at a time (the run root's lock holds it for training).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from pipelines import storage
from pipelines.errors import XsamError
from xsam_model.builder import build_xsam
from xsam_model.trainable import WeightMismatchError, load_exported

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LINEAGE_FILE = "lineage.json"
FILES = (MODEL_FILE, CONFIG_FILE, LINEAGE_FILE)
"""In the order they are moved into place: lineage last, so a folder with its lineage is complete."""
TMP_TAG = ".tmp-"
PREV_TAG = ".prev-"
_HEADER_LIMIT = 100 * 2**20


class ExportError(XsamError, ValueError):
    """An export that is missing, incomplete, damaged or not what was asked for; one line naming the file."""


# ---------------------------------------------------------------------------------------------- files
def sha256_of(url: str, chunk: int = 1 << 22) -> str:
    """The SHA-256 of the file at ``url`` (read in chunks)."""
    fs, path = storage.fs_and_path(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safetensors_header(url: str) -> dict[str, dict]:
    """``{key: {"dtype", "shape"}}`` from a safetensors file's JSON header, without reading the tensors.

    The file must be complete: its size is 8 + the header's length + the end of the last tensor the header
    describes, so a truncated copy (an interrupted upload or export) is refused before any tensor is read."""
    fs, path = storage.fs_and_path(url)
    with fs.open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ExportError(f"{url}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _HEADER_LIMIT:
            raise ExportError(f"{url}: not a safetensors file (header length {n})")
        text = f.read(n)
    try:
        header = json.loads(text)
        meta = {k: v for k, v in header.items() if k != "__metadata__"}
        data_end = max((int(v["data_offsets"][1]) for v in meta.values()), default=0)
        keys = {k: {"dtype": v["dtype"], "shape": tuple(v["shape"])} for k, v in meta.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ExportError(
            f"{url}: truncated or damaged safetensors header ({type(e).__name__}: {e}); re-export it"
        ) from None
    size, expected = fs.size(path), 8 + n + data_end
    if size != expected:
        raise ExportError(
            f"{url}: truncated or damaged safetensors file: {size} bytes, its header describes {expected} "
            f"(re-export it, or copy it again)"
        )
    return keys


def _siblings(fs, path: str, tag: str) -> list[str]:
    """``<path><tag>*`` beside the export folder ``path``."""
    parent, name = path.rsplit("/", 1)
    if not fs.exists(parent):
        return []
    return sorted(
        p.rstrip("/")
        for p in fs.ls(parent, detail=False)
        if p.rstrip("/").rsplit("/", 1)[-1].startswith(name + tag)
    )


def _legacy_temporaries(fs, path: str) -> list[str]:
    """``.tmp-<name>-*`` beside ``path``: what writers before the ``<name>.tmp-`` naming left when killed."""
    parent, name = path.rsplit("/", 1)
    if not fs.exists(parent):
        return []
    prefix = f"{storage.TMP_MARK}{name}-"
    return [
        p.rstrip("/")
        for p in fs.ls(parent, detail=False)
        if p.rstrip("/").rsplit("/", 1)[-1].startswith(prefix)
    ]


def _complete(fs, path: str) -> bool:
    return all(fs.exists(f"{path}/{n}") for n in FILES)


def recover(url: str) -> bool:
    """Put back the previous export that a writer killed mid-swap left under ``<name>.prev-*`` (when the
    export folder itself is missing or incomplete). Returns whether one was put back."""
    fs, path = storage.fs_and_path(url)
    if _complete(fs, path):
        return False
    for prev in reversed(_siblings(fs, path, PREV_TAG)):
        if _complete(fs, prev):
            log.warning("%s: incomplete or missing; restoring the previous export from %s", url, prev)
            _put(fs, prev, path, keep_src=True)
            if fs.exists(prev):  # renamed away on a local file system, copied on an object store
                fs.rm(prev, recursive=True)
            return True
    return False


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class Export:
    """A stage export on storage: what it says about itself (tensors not loaded until :meth:`state`)."""

    url: str
    stage: int
    config: dict = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)
    keys: dict[str, dict] = field(default_factory=dict)
    """``{key: {"dtype", "shape"}}`` of model.safetensors."""
    verified_sha256: str | None = None
    """The SHA-256 of model.safetensors as last checked against the lineage (None until checked)."""

    @property
    def model_url(self) -> str:
        return storage.join(self.url, MODEL_FILE)

    @property
    def model_sha256(self) -> str | None:
        """What the lineage records for model.safetensors."""
        return self.lineage.get("model_sha256")

    @property
    def flavor(self) -> str | None:
        """The model flavor the weights are for (the stage recipe's, else the model config's name)."""
        flavor = ((self.config.get("stage") or {}).get("model") or {}).get("flavor")
        return flavor or (self.config.get("model") or {}).get("name")

    @property
    def init_dir(self) -> str | None:
        """The HF folder the model was built from (tokenizer, frozen parts), as recorded."""
        return ((self.config.get("stage") or {}).get("model") or {}).get("init_dir")

    @property
    def category_ids(self) -> tuple[int, ...]:
        """The linear head's categories (stage 1), from the recorded processor config."""
        proc = (self.config.get("model") or {}).get("processor") or {}
        return tuple(proc.get("category_ids") or ())

    @classmethod
    def find(cls, url: str, stage: int, *, needed_by: int | None = None, verify: bool = True) -> Export:
        """The export of stage ``stage`` at ``url``; ``needed_by`` names the stage that starts from it (for
        the message). ``verify`` hashes model.safetensors against the lineage (:meth:`verify`); a caller that
        loads the tensors right away may skip it, :meth:`state` checks the bytes it loads."""
        who = f"stage {needed_by} starts from stage {stage}'s export, " if needed_by else ""
        found = cls._open(
            url,
            hint=f"{who}expected {{missing}} in {url} (run stage {stage} first, or point "
            "--init-from at its export folder)",
        )
        if found.stage != stage:
            raise ExportError(f"{url} is the export of stage {found.stage}, expected stage {stage}")
        if verify:
            found.verify()
        return found

    @classmethod
    def read(cls, url: str, *, verify: bool = True) -> Export:
        """The export at ``url``, whatever its stage."""
        return cls.find(
            url,
            cls._open(url, hint=f"{url}: not a stage export (expected {{missing}} there)").stage,
            verify=verify,
        )

    @classmethod
    def _open(cls, url: str, *, hint: str) -> Export:
        fs, path = storage.fs_and_path(url)
        recover(url)
        missing = [n for n in FILES if not fs.exists(f"{path}/{n}")]
        if missing:
            raise ExportError(hint.format(missing=", ".join(missing)))
        try:
            lineage = storage.read_json(fs, f"{path}/{LINEAGE_FILE}")
            config = storage.read_json(fs, f"{path}/{CONFIG_FILE}")
        except (ValueError, UnicodeDecodeError) as e:
            raise ExportError(f"{url}: a damaged {LINEAGE_FILE} or {CONFIG_FILE} ({e})") from None
        stage = lineage.get("stage") if isinstance(lineage, dict) else None
        if not isinstance(stage, int) or not isinstance(config, dict):
            raise ExportError(f"{url}/{LINEAGE_FILE}: names no stage (not a stage export)")
        keys = safetensors_header(storage.join(url, MODEL_FILE))
        return cls(url=url, stage=stage, config=config, lineage=lineage, keys=keys)

    def _check_hash(self, digest: str) -> str:
        recorded = self.model_sha256
        if not recorded:
            raise ExportError(
                f"{self.url}/{LINEAGE_FILE} records no model_sha256, so {MODEL_FILE} cannot be verified "
                "(every export this project writes records it: re-export, or re-import with convert)"
            )
        if digest != recorded:
            raise ExportError(
                f"{self.model_url}: sha256 {digest[:16]}… differs from {recorded[:16]}… recorded in its "
                f"{LINEAGE_FILE} (damaged or replaced; re-export it, or copy it again)"
            )
        self.verified_sha256 = digest
        return digest

    def verify(self) -> str:
        """Hash model.safetensors and compare with the lineage's ``model_sha256``; returns the hash."""
        return self._check_hash(sha256_of(self.model_url))

    def state(self, keys=None) -> dict:
        """The tensors (name → tensor, CPU), from bytes checked against the lineage's hash; only ``keys`` if
        given."""
        fs, path = storage.fs_and_path(self.model_url)
        with fs.open(path, "rb") as f:
            blob = f.read()
        self._check_hash(hashlib.sha256(blob).hexdigest())
        state = load_bytes(blob)
        return state if keys is None else {k: state[k] for k in keys}

    def build_model(self, device: str = "cpu", dtype=None, *, flavor: str | None = None):
        """The export's flavor built (its recorded ``init_dir`` for the tokenizer and the frozen parts) with
        the export's weights loaded strictly, in eval mode on ``device``. ``flavor``: refuse any other."""
        if not self.flavor:
            raise ExportError(f"{self.url}/{CONFIG_FILE} names no model flavor")
        if flavor is not None and flavor != self.flavor:
            raise ExportError(f"{self.url} is a {self.flavor!r} export, expected flavor {flavor!r}")
        model = build_xsam(self.flavor, init_dir=self.init_dir, device=device, dtype=dtype)
        try:
            load_exported(model, self.state(), stage=self.stage, strict=True)
        except WeightMismatchError as e:
            first = str(e).strip().splitlines()
            raise ExportError(
                f"{self.url}: its weights do not fit a stage-{self.stage} {self.flavor!r} model "
                f"({first[0] if first else 'mismatch'}{' …' if len(first) > 1 else ''})"
            ) from None
        return model.eval()


# ---------------------------------------------------------------------------------------------- writing
def write_export(url: str, state: Mapping[str, Any], *, stage: int, config: dict, lineage: dict) -> str:
    """Write ``state`` (name → tensor), ``config`` and ``lineage`` (``stage``, ``model_sha256``, ``tensors``
    and ``written_at`` added) as the export at ``url``, replacing any previous one only once the new one is
    complete (see the module docstring). Returns ``url``."""
    fs, path = storage.fs_and_path(url)
    remove_stale(url)
    tmp = f"{path}{TMP_TAG}{uuid.uuid4().hex[:8]}"
    fs.makedirs(tmp, exist_ok=True)
    try:
        tensors = {k: state[k].contiguous() for k in sorted(state)}
        blob = save_bytes(tensors, metadata={"stage": str(stage)})
        with fs.open(f"{tmp}/{MODEL_FILE}", "wb") as f:
            f.write(blob)
        lineage = {
            **lineage,
            "stage": stage,
            "model_sha256": hashlib.sha256(blob).hexdigest(),
            "tensors": len(tensors),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        storage.write_json(fs, f"{tmp}/{CONFIG_FILE}", config)
        storage.write_json(fs, f"{tmp}/{LINEAGE_FILE}", lineage)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        raise
    _replace(fs, tmp, path)
    return url


def remove_stale(url: str) -> int:
    """Delete what killed writers left beside the export at ``url`` (``.tmp-*``, and ``.prev-*`` once the
    export itself is complete, restoring it from a ``.prev-*`` first if need be). Returns how many."""
    fs, path = storage.fs_and_path(url)
    recover(url)
    stale = _siblings(fs, path, TMP_TAG) + _legacy_temporaries(fs, path)
    if _complete(fs, path):
        stale += _siblings(fs, path, PREV_TAG)
    for p in stale:
        log.info("removing %s (left by an interrupted export)", p)
        fs.rm(p, recursive=True)
    return len(stale)


def _replace(fs, tmp: str, path: str) -> None:
    """``tmp`` (complete) becomes the export at ``path``; the previous export survives as ``.prev-`` until
    then (renamed on a local file system, copied on an object store)."""
    prev = None
    if fs.exists(path):
        prev = f"{path}{PREV_TAG}{uuid.uuid4().hex[:8]}"
        _put(fs, path, prev, keep_src=True)
    _put(fs, tmp, path, keep_src=False)
    if prev is not None:
        fs.rm(prev, recursive=True)


def _put(fs, src: str, dst: str, *, keep_src: bool) -> None:
    """Make the complete export folder ``src`` the one at ``dst`` (absent or incomplete).

    A local file system renames the folder: one step, ``src`` is gone after it. An object store has no
    folders: ``dst``'s lineage goes first (the folder is then incomplete to readers), the files are copied
    (``keep_src``: ``src`` stays complete until the caller deletes it) or moved, lineage last."""
    if "file" in fs.protocol:
        if fs.exists(dst):
            fs.rm(dst, recursive=True)
        fs.mv(src, dst, recursive=True)
        return
    if fs.exists(f"{dst}/{LINEAGE_FILE}"):
        fs.rm(f"{dst}/{LINEAGE_FILE}")
    for name in FILES:
        (fs.copy if keep_src else fs.mv)(f"{src}/{name}", f"{dst}/{name}")
    if not keep_src and fs.exists(src):
        fs.rm(src, recursive=True)
