"""Small I/O helpers shared by every stage: atomic writes (files and directories), JSON files, digests."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from semvlp.errors import InputError


# Below this much free space on the output's file system, a failed write is reported as "disk full":
# some writers (torch.save's C++ stream) lose the errno and fail with an unrelated message.
LOW_SPACE_BYTES = 1 << 20
_PERMISSION_PROBLEMS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied (operation not permitted)",
    errno.EROFS: "read-only file system",
}
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# mkstemp creates 0600 files; outputs get the mode an ordinary open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _free_bytes(folder: Path) -> int | None:
    """Bytes still free for a non-root writer on `folder`'s file system (None when unknown)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _is_write_target(name: Path, path: Path) -> bool:
    """Whether an error about `name` is about writing `path`: the file, a temporary of it, a folder above it."""
    is_temporary = name.parent == path.parent and name.name.startswith(f".tmp-{path.name}-")
    return name == path or is_temporary or name in path.parents


def _write_error(err: Exception, path: Path) -> OSError | None:
    """A clear OSError naming `path` for a failed write of it (disk full, no permission), else None.

    An error about some other file (one the block was reading, say) is left alone. Called while the
    temporary file still exists, so the free space is what the writer saw.
    """
    code = getattr(err, "errno", None)
    filename = getattr(err, "filename", None)
    if filename is not None and not _is_write_target(Path(filename), path):
        return None
    if code in _PERMISSION_PROBLEMS:
        return OSError(code, f"cannot write into {path.parent}: {_PERMISSION_PROBLEMS[code]}", str(path))
    # writers signal I/O failures as OSError (Python, h5py) or RuntimeError (torch's C++ stream)
    free = _free_bytes(path.parent) if isinstance(err, (OSError, RuntimeError)) else None
    if code in _FULL_ERRNOS or (free is not None and free < LOW_SPACE_BYTES):
        space = "" if free is None else f" ({free} bytes free on its file system)"
        return OSError(errno.ENOSPC, f"disk full: no space left on device while writing this file{space}", str(path))
    return None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds.

    A job killed mid-write leaves a `.tmp-*` file that no rule names as output, never a truncated
    `path` that a rerun would trust. A write that fails for lack of space or permission raises an
    OSError naming `path` and the problem (errno ENOSPC, EACCES, EPERM or EROFS), chained to the
    writer's own error; the temporary file is removed and files already in the folder are untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    except OSError as err:
        clear = _write_error(err, path)
        if clear is None:
            raise
        raise clear from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except Exception as err:
        clear = _write_error(err, path)
        if clear is None:
            raise
        raise clear from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; it replaces `path` only if the block succeeds, so a
    reader never sees a half-written directory (a killed job leaves a `.tmp-*` folder no rule names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON ({err})", path) from None


def read_text_lines(path: str | Path) -> list[str]:
    """A UTF-8 text file's lines, without line ends."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text ({err})", path) from None


def config_digest(config: dict[str, Any]) -> str:
    """Short digest of a JSON-like config (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in blocks (weights files can be large)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
