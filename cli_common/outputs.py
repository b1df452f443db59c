"""Output files every command shares: judged before any work, written whole or not at all.

`check_output` and `check_free_space` run before a command loads a model or takes a step, so
a path that cannot be written (a file where a folder should be, a read-only folder, an
existing file without --overwrite) or a disk too small for the expected size fails in the
first second, not after the work. `write_atomic` writes small outputs (JSON, CSV) through a
temporary file and a rename, so a crash leaves the old file or the new one, never half of one.

`sha256_file` names a file by its content, for results that must be refused on another input.
They need only the standard library.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

from .errors import OutputError


def nearest_folder(path: str | os.PathLike) -> Path:
    """The deepest existing ancestor of `path` (where its missing folders would be created)."""
    p = Path(os.path.abspath(path)).parent
    while not p.exists():
        p = p.parent
    return p


def check_output(path: str | os.PathLike | None, overwrite: bool = False, flag: str = "--out",
                 folder: bool = False, inputs: Mapping[str, str | os.PathLike | None] | None = None) -> None:
    """Refuse an output path that cannot be written: it is one of the command's `inputs` (a flag ->
    path mapping; compared after resolving symlinks, and refused even with `overwrite`, which
    replaces outputs, never inputs), it exists (without `overwrite`), is a folder where a file is
    meant (or a file where a folder is meant), or lies under a file or a folder that this process
    cannot write to (checked by creating and removing a probe file there)."""
    if path is None:
        return
    path = Path(path)
    for in_flag, given in (inputs or {}).items():
        if given is not None and same_file(path, given):
            raise OutputError(f"{flag} {path} is the command's input {in_flag} {given}: writing it would destroy "
                              f"the input; write {flag} elsewhere")
    if path.is_dir() and not folder:
        raise OutputError(f"{flag} {path} is a folder; give a file path")
    if path.exists() and folder and not path.is_dir():
        raise OutputError(f"{flag} {path} exists and is not a folder")
    if path.exists() and not folder and not overwrite:
        raise OutputError(f"{flag} {path} exists; pass --overwrite to replace it")
    parent = path if folder and path.is_dir() else nearest_folder(path)
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write in {parent} ({e.strerror or type(e).__name__})") from None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same inode where both exist (hard links, symlinks,
    `./x` and `x`), else the same path once symlinks and `..` are resolved."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that would hold `path` (for this user)."""
    return shutil.disk_usage(nearest_folder(path)).free


def check_free_space(path: str | os.PathLike, need: int, what: str = "the output") -> None:
    """Refuse before writing when `need` bytes (an estimate) do not fit beside `path`."""
    free = free_bytes(path)
    if need > free:
        raise OutputError(f"{what} needs about {_size(need)} but {nearest_folder(path)} has only {_size(free)} free; "
                          f"free some space or write elsewhere")


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Write `text` (or bytes) to `path` through a temporary file beside it and a rename; OutputError if it fails."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or type(e).__name__}") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it; mkstemp's files are private
        binary = isinstance(text, bytes)
        with os.fdopen(fd, "wb" if binary else "w", newline=None if binary else "") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror or type(e).__name__}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def os_error_reason(e: BaseException) -> str:
    """A short cause of a failed file operation, also for HDF5's long messages (which carry
    the system's error text inside, e.g. "... error message = 'No space left on device' ...")."""
    if getattr(e, "strerror", None):
        return e.strerror
    m = re.search(r"error message = '([^']+)'", str(e))
    if m:
        return m.group(1)
    if getattr(e, "errno", None):
        return os.strerror(e.errno)
    return " ".join(str(e).split("(")[0].split()) or type(e).__name__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoints are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
