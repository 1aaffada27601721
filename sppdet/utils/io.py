"""Atomic file writes, disk-full reporting, stale temp files, path-safety checks, content hashing."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import DiskFullError, SppdetError

log = logging.getLogger(__name__)

#: errno values that mean "the disk (or the user's quota) is full".
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

#: When this process started (approximately: when sppdet was imported); a temp file last
#: written before it by a process that no longer exists is a leftover of a killed run.
_PROCESS_START = time.time()

#: Temp names written by :func:`atomic_path`: ``.<name>.tmp<pid>.<random><suffix>``.
_TEMP_RE = re.compile(r"^\..+\.tmp(\d+)\.[A-Za-z0-9_]{8}(\.[^.]*)?$")
#: Temp names written before the owner's pid was part of them: ``.<name>.<random><suffix>``.
_LEGACY_TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.(pt|npz|npy|json|txt|yaml|jpg|png|html|tmp)$")
#: Legacy temp files (no pid to check) are removed only when at least this old (seconds).
LEGACY_TEMP_AGE = 24 * 3600

_cleaned: set[str] = set()
_cleaned_lock = threading.Lock()


def disk_full_cause(e: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT ``OSError`` in ``e``'s chain (``__cause__``/``__context__``), if any.

    torch's writer wraps the ``OSError`` of a Python file object in a ``RuntimeError``
    (``inline_container.cc``) whose text never says "no space"; the original is its context.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return e
        e = e.__cause__ or e.__context__
    return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True                   # not a pid we can judge: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True                   # exists (another user's), or cannot tell
    return True


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temp files a killed sppdet process left in ``folder`` (not recursive).

    A file named like :func:`atomic_path`'s temp files is stale when its owner process
    (the pid in its name) no longer exists and it was last written before this process
    started; a temp file of the older, pid-less form when it is over a day old.  Temp
    files of live processes, and every other file, are left alone.

    Returns:
        the files removed (each logged at INFO).
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not name.startswith(".") or not entry.is_file(follow_symlinks=False):
            continue
        m = _TEMP_RE.match(name)
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if m is not None:
            stale = not _pid_alive(int(m.group(1))) and mtime < _PROCESS_START
        else:
            stale = _LEGACY_TEMP_RE.match(name) is not None and now - mtime > LEGACY_TEMP_AGE
        if stale:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
                log.info("%s: removed a temp file left by an interrupted run", entry.path)
    return removed


def _clean_once(folder: Path) -> None:
    """:func:`remove_stale_temp_files` on ``folder``, the first time this process writes there."""
    key = str(folder)
    with _cleaned_lock:
        if key in _cleaned:
            return
        _cleaned.add(key)
    remove_stale_temp_files(folder)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto ``path`` on success.

    A crash or Ctrl-C inside the block leaves ``path`` untouched (the temporary
    file is removed), so a reader never sees a half-written file.  The temp name
    carries this process's id; the first write into a folder also removes temp
    files that killed processes left there (:func:`remove_stale_temp_files`).

    Raises:
        DiskFullError: the disk or quota filled up while writing (one line naming ``path``);
            ``path`` keeps its previous content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_once(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp{os.getpid()}.",
                                   suffix=suffix or path.suffix or ".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        if e.errno in _FULL:
            raise DiskFullError(f"{path}: no space left on device (cannot create the file)") from None
        raise
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as e:
        if not isinstance(e, SppdetError) and disk_full_cause(e) is not None:
            raise DiskFullError(f"{path}: no space left on device while writing it "
                                "(its previous content, if any, is unchanged)") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_npz(path: str | Path, compressed: bool = False, **arrays: np.ndarray) -> None:
    """Write arrays to ``path`` (.npz) atomically.  Load with ``np.load(path, allow_pickle=False)``."""
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, through a Python file object (so that a full
    disk surfaces as :class:`~sppdet.errors.DiskFullError`, not torch's ``inline_container.cc``)."""
    import torch

    path = Path(path)
    with atomic_path(path, suffix=path.suffix or ".pt") as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return path


def file_sha1(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-1 of a file's bytes (hex)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short, stable hash of a JSON-serialisable object (dict keys sorted)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:length]


def default_cache_dir() -> Path:
    """``$SPPDET_CACHE``, else ``$XDG_CACHE_HOME/sppdet``, else ``~/.cache/sppdet``."""
    env = os.environ.get("SPPDET_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sppdet"


# ---------------------------------------------------------------------------
# Path safety (docs/SAFETY.md)


def unsafe_name_reason(name: str) -> str | None:
    """Why ``name`` cannot be used as a single file name inside a folder (``None``: it can).

    Refused: empty, ``.`` / ``..``, a path separator (``/`` or ``\\``), an absolute or
    drive path, a NUL or other control character.  Such a name, joined to a folder,
    would point outside it (or at the folder itself).
    """
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if re.match(r"^[A-Za-z]:", name):
        return "is a drive path"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "contains a control character" if "\0" not in name else "contains a NUL character"
    return None


def unsafe_relative_reason(rel: str) -> str | None:
    """Why ``rel`` cannot be a relative path that stays inside its folder (``None``: it can).

    Sub-folders are fine (``train2017/a.jpg``); absolute paths, drive paths, ``..``
    components and NUL/control characters are not.
    """
    if not rel:
        return "is empty"
    if rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel) or os.path.isabs(rel):
        return "is an absolute path"
    if any(part == ".." for part in re.split(r"[/\\]", rel)):
        return "contains a '..' component"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in rel):
        return "contains a NUL or control character"
    return None


def refuse_output_over_inputs(out_dir: str | Path, inputs: Iterable[str | Path], option: str = "--out") -> None:
    """Refuse an output folder that holds one of the input files.

    Writing drawn copies (``<stem>.jpg``) next to the inputs would replace a user's
    photos, so the folder of every input file must differ from ``out_dir``.

    Raises:
        SppdetError: one line naming the option, the folder and the first such input.
    """
    out = Path(out_dir).expanduser().resolve()
    for p in inputs:
        try:
            parent = Path(p).expanduser().resolve().parent
        except OSError:
            continue
        if parent == out:
            raise SppdetError(f"{option} {out_dir}: is the folder of the input {p}; sppdet never writes "
                              "next to its inputs (it could replace them): choose another output folder")
