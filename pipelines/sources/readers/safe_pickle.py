"""A restricted unpickler for the refer ``refs(unc).p`` / ``refs(umd).p`` files (docs/integrity.md).

Those files are Python-2 ``cPickle`` dumps of plain ``list[dict]``: lists, dicts, ``str``/``unicode``,
ints/longs, floats, bools and None. All of these are pickle *opcodes*; none needs a global. A pickle that
names a global (``GLOBAL``/``STACK_GLOBAL``/``INST``/``OBJ``/extension codes all go through ``find_class``)
is asking to build or call an arbitrary object, and is refused **before** anything it names is imported or
called; persistent ids are refused the same way. So nothing in a refused file runs.

The only globals allowed are the builtin containers and scalars that some pickler versions spell as a call:
``set``/``frozenset`` (protocol 2 writes ``set([...])``), ``complex``, and Python 3's protocol-2 form of
``bytes`` (``_codecs.encode(str, "latin1")``), each behind a wrapper that checks its arguments, so even those
calls cannot be steered into anything else (e.g. a huge ``bytes(n)`` allocation).
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from typing import Any

from pipelines.errors import MalformedPickle, UnsafePickleError


def _set(items=()) -> set:
    return set(_iterable(items, "set"))


def _frozenset(items=()) -> frozenset:
    return frozenset(_iterable(items, "frozenset"))


def _iterable(items: Any, what: str):
    if not isinstance(items, list | tuple | set | frozenset):
        raise pickle.UnpicklingError(f"{what}() from a {type(items).__name__}")
    return items


def _complex(real: float | int = 0, imag: float | int = 0) -> complex:
    if not all(isinstance(v, int | float) for v in (real, imag)):
        raise pickle.UnpicklingError("complex() from non-numbers")
    return complex(real, imag)


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Python 3 writes ``bytes`` at protocol <= 2 as ``_codecs.encode(text, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode only with (str, 'latin1')")
    return codecs.encode(text, "latin1")


def _bytes(*args) -> bytes:
    """``bytes()`` (Python 3 protocol-2 spelling of ``b''``) or ``bytes(list_of_ints)``; never
    ``bytes(n)``."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], list | tuple | bytes):
        return bytes(args[0])
    raise pickle.UnpicklingError("bytes() with arguments other than a list of ints")


_BUILTINS = {"set": _set, "frozenset": _frozenset, "complex": _complex, "bytes": _bytes}
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(mod, name): fn for mod in ("__builtin__", "builtins") for name, fn in _BUILTINS.items()},
    ("_codecs", "encode"): _codecs_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns the checked builtins of
    :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file, path: str, encoding: str = "utf-8"):
        # Python 2 ``str`` arrives as 8-bit strings; refer data is ASCII/UTF-8 text
        super().__init__(file, fix_imports=False, encoding=encoding, errors="strict")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        fn = ALLOWED_GLOBALS.get((module, name))
        if fn is None:
            raise UnsafePickleError(self.path, f"global {module}.{name}")
        return fn

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(self.path, f"persistent id {pid!r}")


def loads(data: bytes, path: str = "<bytes>") -> Any:
    """Unpickle ``data`` with the allow-list. Python-2 byte strings are decoded as UTF-8, or as Latin-1
    when they are not valid UTF-8 (cPickle stored them undecoded). :class:`UnsafePickleError` for a
    forbidden global; :class:`MalformedPickle` for anything else that stops unpickling."""
    last: Exception | None = None
    for encoding in ("utf-8", "latin-1"):
        try:
            return RestrictedUnpickler(io.BytesIO(data), path, encoding).load()
        except UnsafePickleError:
            raise
        except UnicodeDecodeError as e:
            last = e  # retry the whole file as Latin-1
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            KeyError,
            IndexError,
            MemoryError,
            RecursionError,
        ) as e:
            raise MalformedPickle(
                f"{path}: not a well-formed pickle of plain data: {type(e).__name__}: {e}"
            ) from None
    raise MalformedPickle(f"{path}: undecodable byte string: {last}")


def load_file(path: str | os.PathLike) -> Any:
    """Read and unpickle one file with the allow-list (see :func:`loads`)."""
    with open(path, "rb") as f:
        data = f.read()
    return loads(data, str(path))
