"""The shard store (docs/contracts.md#shards-and-manifests): a build's layout on disk, its typed manifests,
and the one tar reader.

Layout under a build's ``<out>`` (a local folder or any fsspec URI)::

    <source>/<split>/<source>-<split>-000000.tar  samples in key order: <key>.json [+ <key>.jpg|png]
    <source>/<split>/<source>-<split>-000000.tar.idx.json   its member index: offsets, sizes, sample digests
    <source>/<split>/manifest.json                :class:`Manifest`: shards, counts, skips, inputs, options
    <source>/<split>/skipped.jsonl                every skipped record and dropped annotation

Everything that reads a build goes through this module: the loader (:class:`ShardReader`: the shard's member
index — or, in builds older than the index, a header scan — then ranged reads, each sample's sha256 checked
against the index, whose own sha256 the manifest records), the mixture (:func:`list_manifests`-style
:meth:`Manifest.read` and the per-flag counts, never a tar scan), the preview gallery, dataset cards, the
summary, Hugging Face interop, the training previews and the tests (:func:`iter_samples`). The writer
(:mod:`pipelines.build.shards`) writes its manifest through :class:`Manifest` too, so the JSON keys are
defined once. Imports only the shared core (storage, schema, errors), the stdlib, fsspec and numpy: it runs in
conversion tasks, DataLoader workers and offline tools.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import IO, Any, NamedTuple

import numpy as np
from fsspec.core import url_to_fs

from pipelines import storage
from pipelines.errors import XsamError
from pipelines.schema import IMAGE_EXTS, Sample, from_wds

MANIFEST_FILE = "manifest.json"
SKIPPED_FILE = "skipped.jsonl"
# Sample flags (``meta[flag]`` true) whose sample count every manifest records under ``counts[flag]``, so the
# mixture can leave flagged samples out of N_d without reading a shard (gRefCOCO's no-target expressions).
COUNTED_FLAGS: tuple[str, ...] = ("no_target",)
# webdataset's key.ext split of a member name: keys hold no '.', so the first '.' of the last path component
# starts the extension ("refcoco/train/000000000009_00000.json" -> key "refcoco/train/000000000009_00000").
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")


class ShardStoreError(XsamError, ValueError):
    """A build's files are missing, malformed or older than this code expects (the message names the file)."""


class MissingManifestError(ShardStoreError):
    """``<out>/<source>/<split>/manifest.json`` does not exist: that split was not built (or not finished)."""


# ---------------------------------------------------------------------------------------------- layout
def split_dir(out_url: str, source: str, split: str) -> str:
    return storage.join(str(out_url), source, split)


def shard_name(source: str, split: str, index: int) -> str:
    return f"{source}-{split}-{index:06d}.tar"


def manifest_path(out_url: str, source: str, split: str) -> str:
    return storage.join(split_dir(out_url, source, split), MANIFEST_FILE)


# ---------------------------------------------------------------------------------------------- manifests
@dataclass(frozen=True)
class ShardEntry:
    """One shard of a split, as the manifest lists it (``file`` relative to the split's folder)."""

    file: str
    samples: int
    bytes: int
    sha256: str | None = None
    index_sha256: str | None = None
    """sha256 of the shard's member index (``<file>.idx.json``, :func:`member_index`); None in builds made
    before the index existed (the loader then scans the tar's headers)."""


_REQUIRED = ("schema", "source", "task", "split", "shards", "counts")
_IDENTITY_FIELDS = (
    "schema",
    "source",
    "task",
    "split",
    "counts",
    "skipped",
    "dropped",
    "category_counts",
    "options",
    "source_version",
    "fingerprint",
    "generation",
)
"""The manifest fields :meth:`Manifest.content_sha256` covers besides inputs and shards."""


@dataclass(frozen=True)
class Manifest:
    """``<out>/<source>/<split>/manifest.json``; :meth:`to_dict` is exactly the JSON the writer writes."""

    schema: int
    source: str
    task: str
    split: str
    shards: tuple[ShardEntry, ...]
    counts: dict[str, int]  # records_in, samples, skipped, dropped_annotations, masks, regions, turns, flags
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> records skipped
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> annotations dropped
    category_counts: dict[str, int] = field(default_factory=dict)  # category id (str) -> masks
    inputs: list[dict] = field(default_factory=list)  # {"role", "path", "bytes", "sha256", "kind"} per input
    dirs: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # what locating the source's files found
    options: dict = field(default_factory=dict)  # BuildOptions.to_dict()
    source_version: int | None = None
    code_version: dict = field(default_factory=dict)
    fingerprint: str | None = None
    generation: str | None = None
    """The build generation this manifest commits (:func:`generation_of`); None in a manifest written before
    generations existed."""
    wall_time_s: float | None = None
    extra: dict = field(default_factory=dict)  # keys a newer writer added: kept, written back unchanged
    url: str | None = field(default=None, compare=False, repr=False)  # where it was read from (not written)

    @property
    def name(self) -> str:
        """``"<source>/<split>"``: the dataset name the mixture and the loader use."""
        return f"{self.source}/{self.split}"

    @property
    def samples(self) -> int:
        return int(self.counts["samples"])

    def flag_count(self, flag: str) -> int:
        """Samples whose ``meta[flag]`` is true; an error naming the file when the writer did not count it."""
        if flag not in self.counts:
            raise ShardStoreError(
                f"{self.url or self.name}: counts has no {flag!r} (written before the writer counted sample "
                f"flags); rebuild {self.name} (the same build command re-converts it, with identical shards)"
            )
        return int(self.counts[flag])

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "url")}
        out["shards"] = [dict(s.__dict__) for s in self.shards]
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any], url: str | None = None) -> Manifest:
        where = url or "manifest"
        if not isinstance(d, dict):
            raise ShardStoreError(f"{where}: not a JSON object")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ShardStoreError(f"{where}: missing key(s) {missing}")
        if "samples" not in d["counts"]:
            raise ShardStoreError(f"{where}: counts has no 'samples'")
        known = {f.name for f in fields(cls)} - {"extra", "url"}
        try:
            shards = tuple(ShardEntry(**s) for s in d["shards"])
        except TypeError as e:
            raise ShardStoreError(f"{where}: a shard entry is malformed: {e}") from e
        kwargs = {k: v for k, v in d.items() if k in known and k != "shards"}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**kwargs, shards=shards, extra=extra, url=url)

    @classmethod
    def read(cls, out_url: str, source: str, split: str) -> Manifest:
        """The manifest of ``<out_url>/<source>/<split>``; :class:`MissingManifestError` if there is none."""
        fs, path = storage.fs_and_path(manifest_path(out_url, source, split))
        if not fs.exists(path):
            raise MissingManifestError(f"{path}: no manifest; build {source}/{split} first")
        return cls.read_file(fs, path)

    @classmethod
    def read_file(cls, fs, path: str) -> Manifest:
        try:
            d = storage.read_json(fs, path)
        except ValueError as e:
            raise ShardStoreError(f"{path}: not valid JSON: {e}") from e
        return cls.from_dict(d, url=path)

    def content_sha256(self) -> str:
        """sha256 of what identifies the split, not of when or where it was built: its schema, source,
        task, split, source version, options, fingerprint, generation, counts (samples, skips, drops,
        categories), every input's role, kind, size and sha256 (not its path) and every shard entry (file,
        size, sha256s). Two builds of the same inputs with the same options give the same digest; the
        manifest's wall time, code commit and input paths do not enter it."""
        inputs = [{k: i.get(k) for k in ("role", "kind", "bytes", "sha256")} for i in self.inputs]
        basis = {
            **{k: getattr(self, k) for k in _IDENTITY_FIELDS},
            "inputs": inputs,
            "shards": [dict(s.__dict__) for s in self.shards],
        }
        return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()

    def write(self, out_url: str) -> str:
        """Write ``manifest.json`` atomically (canonical JSON); returns its path."""
        fs, path = storage.fs_and_path(manifest_path(out_url, self.source, self.split))
        storage.write_json(fs, path, self.to_dict())
        return path


def generation_of(fingerprint: str | None, shards: Sequence[ShardEntry]) -> str:
    """A split's build generation: a digest of its build fingerprint and every shard's file, size and
    sha256s — what the loader trains on. The manifest, written last, names it; ``mixture.json`` pins it."""
    basis = {"fingerprint": fingerprint, "shards": [dict(s.__dict__) for s in shards]}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


def list_manifests(
    out_url: str, sources: Sequence[str] | None = None, splits: Sequence[str] | None = None
) -> list[Manifest]:
    """Every built split's manifest under ``out_url`` (optionally only some sources/splits), in path order."""
    fs, root = storage.fs_and_path(out_url)
    if not fs.exists(root):
        return []
    found = []
    for path in sorted(fs.glob(f"{root}/*/*/{MANIFEST_FILE}")):
        m = Manifest.read_file(fs, path)
        if (sources is None or m.source in sources) and (splits is None or m.split in splits):
            found.append(m)
    return found


def read_skipped(out_url: str, source: str, split: str) -> list[dict]:
    """The rows of ``skipped.jsonl`` (key, level, reason, detail), in the file's order."""
    fs, path = storage.fs_and_path(storage.join(split_dir(out_url, source, split), SKIPPED_FILE))
    with fs.open(path, "rb") as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- tar members
class TruncatedShardError(ShardStoreError):
    """A member's data runs past the end of the file: the shard was cut short."""


class TarMember(NamedTuple):  # a tuple, not a dataclass: one per member of every scanned shard
    """One ``<key>.<ext>`` member: where its data lies in the tar, and the data when it was read."""

    key: str
    ext: str
    offset: int
    size: int
    data: bytes | None = None


def iter_members(
    f: IO[bytes], *, read_data: bool = True, file_size: int | None = None
) -> Iterator[TarMember]:
    """The regular ``<key>.<ext>`` members of an open tar, in tar order (other members are passed over).

    ``read_data=False`` scans headers only and seeks over the data (``f`` must be seekable); otherwise the tar
    is streamed once. With ``file_size``, a member that ends past it raises :class:`TruncatedShardError` (a
    header scan alone would take a shard cut at a member boundary for a complete one).
    """
    entries = _streamed_members(f) if read_data else _header_members(f, file_size)
    for name, offset, size, read in entries:
        if file_size is not None and offset + size > file_size:
            raise TruncatedShardError(
                f"member {name} ends at byte {offset + size} of a {file_size}-byte file"
            )
        m = _MEMBER.match(name)
        if m is not None:
            yield TarMember(m.group(1), m.group(2), offset, size, read() if read else None)


_Entry = tuple[str, int, int, Callable[[], bytes] | None]  # name, data offset, size, reader of the data


def _streamed_members(f: IO[bytes]) -> Iterator[_Entry]:
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for ti in tar:
            if ti.isfile():
                yield ti.name, ti.offset_data, ti.size, tar.extractfile(ti).read


def _header_members(f: IO[bytes], file_size: int | None) -> Iterator[_Entry]:
    """Regular members from the headers alone. What our writer writes — a pax header holding only times (the
    float mtime) before a ustar header of a regular file — is parsed here, much faster than ``tarfile`` does
    it (a 1000-sample shard's index: ~40 ms instead of ~145 ms); at the first header that is anything else
    (the end of the archive, other pax records, GNU extensions, a bad checksum, a short read) ``tarfile``
    takes over from that byte, so what is found and what is raised are ``tarfile``'s own (the tests compare
    the two on every truncation and on corrupted headers)."""
    pos, checked = 0, set()
    while True:
        if pos and (pos > file_size if file_size is not None else _past_end(f, pos)):
            raise tarfile.ReadError("unexpected end of data")  # tarfile's check: the previous member is whole
        f.seek(pos)
        member = _simple_member(f, pos, checked)
        if member is None:
            break
        name, offset, size = member
        yield name, offset, size, None
        pos = offset + _blocks(size)
    f.seek(pos)
    with tarfile.open(fileobj=f, mode="r:") as tar:  # starts at f.tell(): offsets stay absolute
        for ti in tar:
            if ti.isfile():
                yield ti.name, ti.offset_data, ti.size, None


_BLOCK = 512
# mode, uid, gid, mtime, device major/minor: the numbers of a header besides size and checksum
_OTHER_NUMBERS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))
_PAX_TIME = re.compile(rb"(\d+) (?:mtime|atime|ctime)=[^\n]*\n")  # records that change no name or offset


def _blocks(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _past_end(f: IO[bytes], pos: int) -> bool:
    f.seek(pos - 1)
    return not f.read(1)


def _simple_member(f: IO[bytes], pos: int, checked: set[bytes]) -> tuple[str, int, int] | None:
    """``(name, data offset, size)`` of the member whose header starts at ``pos`` (``f`` is there), when its
    headers are [pax times] + ustar regular file; None otherwise."""
    head = f.read(_BLOCK)
    header = _ustar(head, checked)
    if header is not None and header[0] == b"x":
        pax = f.read(_blocks(header[2]) + _BLOCK)
        if len(pax) != _blocks(header[2]) + _BLOCK or not _only_times(pax[:-_BLOCK]):
            return None
        pos, header = pos + len(head) + len(pax) - _BLOCK, _ustar(pax[-_BLOCK:], checked)
    if header is None or header[0] not in (b"0", b"\0") or header[1].endswith("/"):  # "/": maybe a directory
        return None
    return header[1], pos + _BLOCK, header[2]


def _ustar(buf: bytes, checked: set[bytes]) -> tuple[bytes, str, int] | None:
    """``(type flag, name, size)`` of a header block, by tarfile's rules (every number plain octal, the
    checksum, the ustar prefix, names in tarfile's encoding with surrogateescape); None when tarfile would
    see an end, an error or a number this does not parse. ``checked``: the bytes of the numbers besides
    size and checksum already found to parse (a writer repeats them in every header)."""
    if len(buf) != _BLOCK:
        return None
    try:
        others = buf[100:124] + buf[136:148] + buf[329:345]
        if others not in checked:
            for a, b in _OTHER_NUMBERS:  # tarfile parses each: one it cannot ends its scan
                _octal(buf[a:b])
            checked.add(others)
        size, checksum = _octal(buf[124:136]), _octal(buf[148:156])
    except ValueError:
        return None
    if checksum != 256 + sum(buf[:148]) + sum(buf[156:]):  # all zeros (the end) fails here too
        return None
    name = buf[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    prefix = buf[345:500].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    return buf[156:157], (f"{prefix}/{name}" if prefix else name), size


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # base-256: left to tarfile
        raise ValueError(field)
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _only_times(data: bytes) -> bool:
    """Whether a pax header's (padded) data holds only well-framed time records, as tarfile reads them."""
    pos = 0
    while pos < len(data) and data[pos] != 0:
        m = _PAX_TIME.match(data, pos)
        if m is None or int(m.group(1)) != m.end() - pos:
            return False
        pos = m.end()
    return True


def group_samples(members: Iterator[TarMember]) -> Iterator[tuple[str, dict[str, TarMember]]]:
    """``(key, {ext: member})`` per run of consecutive members with one key. A sample still open when
    ``members`` raises is not yielded (it may be incomplete)."""
    key, group = None, {}
    for m in members:
        if m.key != key:
            if key is not None:
                yield key, group
            key, group = m.key, {}
        group[m.ext] = m
    if key is not None:
        yield key, group


def iter_shard_samples(fs, path: str) -> Iterator[tuple[Sample, bytes | None]]:
    """``(Sample, image bytes or None)`` of one shard, in key order (streamed: one pass, nothing seeked)."""
    with fs.open(path, "rb") as f:
        for key, group in group_samples(iter_members(f, read_data=True)):
            if "json" not in group:
                raise ShardStoreError(f"{path}: sample {key} has no .json member")
            yield from_wds({"__key__": key, **{ext: m.data for ext, m in group.items()}})


def iter_samples(
    out_url: str, source: str, split: str, manifest: Manifest | None = None
) -> Iterator[tuple[Sample, bytes | None]]:
    """``(Sample, image bytes or None)`` of a built split, in shard and key order (its manifest's shards)."""
    manifest = manifest or Manifest.read(out_url, source, split)
    fs, sdir = storage.fs_and_path(split_dir(out_url, source, split))
    for shard in manifest.shards:
        yield from iter_shard_samples(fs, storage.join(sdir, shard.file))


# ---------------------------------------------------------------------------------------------- random access
@dataclass
class ShardIndex:
    """Where each complete sample's members lie in one tar (arrays of length ``n``; image -1 when absent)."""

    n: int
    keys: list[str]
    json_off: np.ndarray
    json_len: np.ndarray
    img_off: np.ndarray
    img_len: np.ndarray
    img_ext: list[str | None]
    error: str | None = None  # why the scan ended early
    reason: str = "truncated_shard"
    digests: list[str] | None = None  # sha256 of json + image bytes per sample (from the member index)


def index_shard(fs, path: str, expected: int | None = None) -> ShardIndex:
    """Scan a tar's headers (data is seeked over, not read) into a :class:`ShardIndex`.

    A scan that stops early (truncated file, bad header) keeps the samples completed before it; with
    ``expected`` from the manifest, fewer samples than expected is reported as truncation too.
    """
    keys, rows, exts = [], [], []
    error, reason = None, "truncated_shard"
    try:
        size = fs.size(path)
        with fs.open(path, "rb") as f:
            for key, group in group_samples(iter_members(f, read_data=False, file_size=size)):
                if "json" not in group:
                    continue
                j, img = group["json"], next((group[e] for e in IMAGE_EXTS if e in group), None)
                keys.append(key)
                rows.append((j.offset, j.size, *((img.offset, img.size) if img else (-1, -1))))
                exts.append(img.ext if img else None)
    except TruncatedShardError as e:
        error = str(e)
    except FileNotFoundError as e:
        error, reason = f"{type(e).__name__}: {e}", "unreadable_shard"
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
        reason = "truncated_shard" if keys else "unreadable_shard"
    if error is None and expected is not None and len(keys) < expected:
        error = f"{len(keys)} complete samples, the manifest lists {expected}"
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    return ShardIndex(len(keys), keys, arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], exts, error, reason)


INDEX_SUFFIX = ".idx.json"
INDEX_VERSION = 1


def sample_digest(json_bytes: bytes, image: bytes | None) -> str:
    """sha256 of a sample's bytes as stored: its JSON member, then its image member (if any)."""
    h = hashlib.sha256(json_bytes)
    if image:
        h.update(image)
    return h.hexdigest()


def member_index(idx: ShardIndex, file: str, size: int, sha256: str, digests: Sequence[str]) -> bytes:
    """The canonical JSON bytes of a shard's member index (``<file>.idx.json``): per sample its key, the
    offset and size of its JSON and image members and :func:`sample_digest`; plus the shard's size and
    sha256, so a tar swapped or grown behind the index is found by one ``stat``."""
    if len(digests) != idx.n:
        raise ShardStoreError(f"{file}: {idx.n} samples in the tar, {len(digests)} digests written")
    doc = {
        "version": INDEX_VERSION,
        "file": file,
        "bytes": int(size),
        "sha256": sha256,
        "samples": idx.n,
        "keys": idx.keys,
        "json": np.stack([idx.json_off, idx.json_len], 1).tolist(),
        "image": [
            None if e is None else [e, int(o), int(n)]
            for e, o, n in zip(idx.img_ext, idx.img_off, idx.img_len, strict=True)
        ],
        "digest": list(digests),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def read_member_index(raw: bytes, where: str) -> tuple[ShardIndex, int]:
    """``(ShardIndex with digests, the tar's size)`` from the bytes of a member index."""
    try:
        d = json.loads(raw)
        if d.get("version") != INDEX_VERSION:
            raise ValueError(f"version {d.get('version')!r}, this code reads {INDEX_VERSION}")
        n = int(d["samples"])
        js = np.asarray(d["json"], dtype=np.int64).reshape(-1, 2)
        img = [
            (e, o, k) if e is not None else (None, -1, -1)
            for e, o, k in (x or (None, -1, -1) for x in d["image"])
        ]
        keys, digests = list(d["keys"]), list(d["digest"])
        if not (len(keys) == len(js) == len(img) == len(digests) == n):
            raise ValueError(f"{n} samples but lists of {len(keys)}, {len(js)}, {len(img)}, {len(digests)}")
    # RecursionError: a nesting too deep for the parser, possible only where no manifest records the index's
    # sha256 (builds from before it did; otherwise the bytes are checked before they get here)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise ShardStoreError(f"{where}: not a member index: {e}") from None
    offs = np.asarray([o for _, o, _ in img], dtype=np.int64)
    lens = np.asarray([k for _, _, k in img], dtype=np.int64)
    idx = ShardIndex(n, keys, js[:, 0], js[:, 1], offs, lens, [e for e, _, _ in img], digests=digests)
    return idx, int(d["bytes"])


@dataclass
class RawSample:
    """One sample's undecoded bytes from a ranged read, or why there are none (``reason``)."""

    key: str | None
    json: bytes | None = None
    image: bytes | None = None
    reason: str | None = None
    detail: str = ""


class ShardReader:
    """Per-process random access to a build's shards: cached indexes (bounded LRU) and ranged reads, with a
    few retries. ``counters`` (the loader's stats) gets ``shards_indexed`` and ``bytes_read`` added to.

    A shard with a member index (``<shard>.idx.json``) is read through it: the index's sha256 must be the one
    its manifest (via ``mixture.json``) records, its sample count the manifest's, and the tar's size the one
    the index records — else every sample of the shard is a ``shard_mismatch`` (a swapped, grown or cut
    shard). ``verify``: each sample's sha256 is checked as it is read; a changed byte is a
    ``digest_mismatch``. Builds without an index are read through a header scan (no per-sample digest)."""

    def __init__(
        self,
        root: str,
        storage_options: dict | None,
        max_indexes: int,
        counters: dict,
        verify: bool = True,
    ):
        self.fs, self.root = url_to_fs(root, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.indexes: OrderedDict[str, ShardIndex] = OrderedDict()
        self.max_indexes = max_indexes
        self.stats = counters
        self.verify = verify

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def index(
        self, rel: str, expected: int, size: int | None = None, index_sha256: str | None = None
    ) -> ShardIndex:
        if rel in self.indexes:
            self.indexes.move_to_end(rel)
            return self.indexes[rel]
        idx = self._load_index(rel, expected, size, index_sha256)  # a failed one is kept: counted per sample
        self.stats["shards_indexed"] += 1
        self.indexes[rel] = idx
        while len(self.indexes) > self.max_indexes:
            self.indexes.popitem(last=False)
        return idx

    def _load_index(self, rel: str, expected: int, size: int | None, index_sha256: str | None) -> ShardIndex:
        """The member index when there is one (checked against the manifest), else a header scan."""
        path = self.path(rel)
        try:
            raw = _retry(lambda: self.fs.cat_file(path + INDEX_SUFFIX))
        except FileNotFoundError:
            raw = None
        except OSError as e:
            return _failed(f"{rel}{INDEX_SUFFIX}: {e}", "unreadable_shard")
        if raw is None:
            if index_sha256 is not None:
                return _failed(f"{rel}{INDEX_SUFFIX} is missing (its manifest lists one)", "shard_mismatch")
            idx = index_shard(self.fs, path, expected)
            if idx.error is None and idx.n > expected:
                return _failed(f"{rel}: {idx.n} samples, the manifest lists {expected}", "shard_mismatch")
            return idx
        got = hashlib.sha256(raw).hexdigest()
        if index_sha256 is not None and got != index_sha256:
            return _failed(
                f"{rel}{INDEX_SUFFIX}: sha256 {got[:12]}…, the manifest records {index_sha256[:12]}… "
                f"(a shard of another build?)",
                "shard_mismatch",
            )
        try:
            idx, tar_size = read_member_index(raw, rel + INDEX_SUFFIX)
            actual = _retry(lambda: self.fs.size(path))
        except ShardStoreError as e:
            return _failed(str(e), "shard_mismatch")
        except OSError as e:
            return _failed(f"{rel}: {type(e).__name__}: {e}", "unreadable_shard")
        problems = []
        if idx.n != expected:
            problems.append(f"its index lists {idx.n} samples, the manifest {expected}")
        if actual != tar_size or (size is not None and actual != size):
            problems.append(
                f"{actual} bytes, its index records {tar_size}"
                + (f", the manifest {size}" if size is not None else "")
            )
        if problems:
            return _failed(f"{rel}: " + "; ".join(problems), "shard_mismatch")
        return idx

    def read(
        self,
        rel: str,
        expected: int,
        lo: int,
        hi: int,
        *,
        size: int | None = None,
        index_sha256: str | None = None,
    ) -> list[RawSample]:
        """Samples ``lo..hi-1`` of shard ``rel`` (relative to the root), read with one ranged request."""
        idx = self.index(rel, expected, size, index_sha256)
        out: list[RawSample] = []
        have = range(lo, min(hi, idx.n))
        if len(have):
            offs = np.concatenate([idx.json_off[lo : have.stop], idx.img_off[lo : have.stop]])
            ends = np.concatenate(
                [
                    idx.json_off[lo : have.stop] + idx.json_len[lo : have.stop],
                    idx.img_off[lo : have.stop] + idx.img_len[lo : have.stop],
                ]
            )
            start, stop = int(offs[offs >= 0].min()), int(ends.max())
            try:
                blob = _retry(lambda: self.fs.cat_file(self.path(rel), start=start, end=stop))
            except OSError as e:
                return [
                    RawSample(None, reason="unreadable_shard", detail=f"{rel}: {e}") for _ in range(lo, hi)
                ]
            self.stats["bytes_read"] += len(blob)
            check = self.verify and idx.digests is not None
            for j in have:
                jo, jl = int(idx.json_off[j]) - start, int(idx.json_len[j])
                image = None
                if idx.img_off[j] >= 0:
                    io_, il = int(idx.img_off[j]) - start, int(idx.img_len[j])
                    image = blob[io_ : io_ + il]
                raw = RawSample(idx.keys[j], blob[jo : jo + jl], image)
                if check and sample_digest(raw.json, image) != idx.digests[j]:
                    raw = RawSample(
                        idx.keys[j],
                        reason="digest_mismatch",
                        detail=f"{rel} sample {j}: its bytes do not match the sha256 in {rel}{INDEX_SUFFIX}",
                    )
                out.append(raw)
        for j in range(max(lo, idx.n), hi):
            out.append(RawSample(None, reason=idx.reason, detail=f"{rel} sample {j}: {idx.error}"))
        return out


class VerificationError(ShardStoreError):
    """A shard's bytes are not the ones its build recorded (a changed sample, a shard cut, grown or swapped,
    a manifest whose counts disagree); the message names the shard and the sample."""


def iter_verified_samples(
    split_url: str,
    entry: ShardEntry,
    *,
    storage_options: dict | None = None,
    chunk: int = 64,
) -> Iterator[tuple[Sample, bytes | None]]:
    """``(Sample, image bytes or None)`` of one shard in key order, read through the checks the training
    loader applies (:class:`ShardReader`): the member index's sha256 against the manifest's, its sample count
    against the manifest's, the tar's size against both, each sample's sha256 as it is read. For readers
    that must use every sample and nothing else (evaluation): the first sample that fails a check raises
    :class:`VerificationError` naming the shard and the sample, where the loader counts a skip."""
    reader = ShardReader(split_url, storage_options, 1, {"shards_indexed": 0, "bytes_read": 0})
    where = reader.path(entry.file)
    for lo in range(0, entry.samples, chunk):
        hi = min(lo + chunk, entry.samples)
        raws = reader.read(
            entry.file, entry.samples, lo, hi, size=entry.bytes, index_sha256=entry.index_sha256
        )
        for j, raw in enumerate(raws, start=lo):
            if raw.reason is not None:
                sample = raw.key if raw.key is not None else f"sample {j} of {entry.samples}"
                raise VerificationError(f"{where}: {sample}: {raw.reason}: {raw.detail}")
            try:
                sample = Sample.from_dict(json.loads(raw.json))
            except (ValueError, TypeError, KeyError, RecursionError) as e:
                raise VerificationError(
                    f"{where}: {raw.key}: not a sample: {type(e).__name__}: {e}"
                ) from None
            if sample.key != raw.key:
                raise VerificationError(f"{where}: {raw.key}: its JSON holds key {sample.key!r}")
            yield sample, raw.image


def check_counts(manifest: Manifest) -> None:
    """The manifest's sample count is the sum of its shards' (else :class:`VerificationError`): a reader
    of every shard then sees every sample the build wrote."""
    listed = sum(int(s.samples) for s in manifest.shards)
    if listed != manifest.samples:
        raise VerificationError(
            f"{manifest.url or manifest.name}: counts.samples is {manifest.samples}, its shards list {listed}"
        )


def _failed(error: str, reason: str) -> ShardIndex:
    """An index with no usable sample: every sample of the shard is skipped with ``reason``."""
    empty = np.zeros(0, dtype=np.int64)
    return ShardIndex(0, [], empty, empty, empty, empty, [], error, reason)


def _retry(fn: Callable[[], Any], attempts: int = 3, retry_on: tuple = (OSError,)) -> Any:
    """Call ``fn``; retry transient storage errors (not a missing file) with a short back-off."""
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except retry_on:
            if i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)
