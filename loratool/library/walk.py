"""Walk files and folders the way a librarian means them: every adapter once, nothing skipped silently.

:func:`walk` turns the paths a user gave into a stream of :class:`WalkEntry` — one per
adapter file, adapter folder (PEFT, diffusers or per-component layout: one entry, never
walked into), file that is not an adapter, or thing that could not be walked (unreadable
folder, broken symlink, symlink loop). Folders are walked recursively in name order;
symlinks are followed, each folder is entered once (a second path to it is a
``duplicate`` entry, a path back to one of its own ancestors an ``error``: a loop).

Entries are plain data (path, kind, reason, size, mtime, inode), so the work done per
entry can be a pure function of it — run in this process or mapped by a pool. Nothing
here opens a file: reading decides whether an ``adapter-file`` really holds an adapter.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratool.io.sources import is_adapter_dir, not_regular, stat_failure

ADAPTER_FILE = "adapter-file"  # a file to read as an adapter (a model extension, or named by the user)
ADAPTER_DIR = "adapter-dir"  # a folder that is one adapter
NOT_ADAPTER = "not-adapter"  # a file found in a folder that is not a model file loratool reads
DUPLICATE = "duplicate"  # a second path (through a symlink) to a folder already walked
ERROR = "error"  # could not be walked: unreadable, broken symlink, symlink loop
KINDS = (ADAPTER_FILE, ADAPTER_DIR, NOT_ADAPTER, DUPLICATE, ERROR)

# Extensions of files that may hold an adapter (safetensors, and pickles read weights-only).
ADAPTER_SUFFIXES = (".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt")
# Model files loratool does not read: listed one by one, never lumped in with sidecars.
OTHER_MODEL_SUFFIXES = (".gguf", ".onnx", ".pkl", ".npz", ".h5", ".msgpack")
NOT_A_MODEL = "not a model file"
UNREAD_MODEL = "a model format loratool does not read"


@dataclass(frozen=True)
class WalkEntry:
    """One thing found: ``path`` as reached from its ``root`` (symlinks not resolved)."""

    path: str
    kind: str
    root: str
    reason: str = ""  # why, for not-adapter / duplicate / error entries
    size: int | None = None  # files: st_size (symlinks followed)
    mtime_ns: int | None = None
    inode: tuple[int, int] | None = None  # (st_dev, st_ino)

    @property
    def is_adapter(self) -> bool:
        """An entry to read as an adapter (file or folder)."""
        return self.kind in (ADAPTER_FILE, ADAPTER_DIR)

    @property
    def suffix(self) -> str:
        return Path(self.path).suffix.lower()

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "root": self.root, "reason": self.reason,
                "size": self.size, "mtime_ns": self.mtime_ns}


def walk(paths: Iterable[str | os.PathLike[str]]) -> Iterator[WalkEntry]:
    """Entries for ``paths``, in order; folders recursively, each folder entered once.

    A path given explicitly that is a file is always an ``adapter-file`` (reading it tells
    what it is); inside folders, files are sorted by extension into adapters and others.
    """
    visited: dict[tuple[int, int], str] = {}
    for root in paths:
        yield from _walk_root(os.fspath(root), visited)


def _walk_root(root: str, visited: dict[tuple[int, int], str]) -> Iterator[WalkEntry]:
    try:
        st = os.stat(root)
    except OSError as exc:
        yield _stat_error(root, root, exc)
        return
    if not stat.S_ISDIR(st.st_mode):
        yield _file(root, root, st, explicit=True)
        return
    first = _folder(root, root, st, visited, ancestors=set())
    if isinstance(first, WalkEntry):
        yield first
        return
    # Depth-first with an explicit stack (no recursion limit on deep trees):
    # each frame is (folder identity, iterator over its children's paths).
    stack: list[tuple[tuple[int, int], Iterator[str]]] = [first]
    while stack:
        child = next(stack[-1][1], None)
        if child is None:
            stack.pop()
            continue
        try:
            st = os.stat(child)
        except OSError as exc:
            yield _stat_error(child, root, exc)
            continue
        if stat.S_ISDIR(st.st_mode):
            frame = _folder(child, root, st, visited, ancestors={key for key, _ in stack})
            if isinstance(frame, WalkEntry):
                yield frame
            else:
                stack.append(frame)
        else:
            yield _file(child, root, st, explicit=False)


def _folder(
    path: str, root: str, st: os.stat_result, visited: dict[tuple[int, int], str], ancestors: set[tuple[int, int]]
) -> WalkEntry | tuple[tuple[int, int], Iterator[str]]:
    """An entry for a folder that is not walked into, or a frame to walk it."""
    key = (st.st_dev, st.st_ino)
    if key in ancestors:
        return WalkEntry(path, ERROR, root, f"symlink loop: leads back to {visited[key]}")
    if key in visited:
        return WalkEntry(path, DUPLICATE, root, f"same folder as {visited[key]} (walked once)")
    visited[key] = path
    try:
        if is_adapter_dir(Path(path)):
            return WalkEntry(path, ADAPTER_DIR, root, mtime_ns=st.st_mtime_ns, inode=key)
        names = sorted(os.listdir(path))
    except OSError as exc:
        return WalkEntry(path, ERROR, root, f"cannot list folder: {_reason(exc)}")
    return key, (os.path.join(path, n) for n in names)


def _file(path: str, root: str, st: os.stat_result, *, explicit: bool) -> WalkEntry:
    kind, reason = ADAPTER_FILE, ""
    suffix = Path(path).suffix.lower()
    if not stat.S_ISREG(st.st_mode):
        kind, reason = (ERROR if explicit or suffix in ADAPTER_SUFFIXES else NOT_ADAPTER), not_regular(st)
    elif explicit:
        pass
    elif suffix in OTHER_MODEL_SUFFIXES:
        kind, reason = NOT_ADAPTER, UNREAD_MODEL
    elif suffix not in ADAPTER_SUFFIXES:
        kind, reason = NOT_ADAPTER, NOT_A_MODEL
    return WalkEntry(path, kind, root, reason, st.st_size, st.st_mtime_ns, (st.st_dev, st.st_ino))


def _stat_error(path: str, root: str, exc: OSError) -> WalkEntry:
    return WalkEntry(path, ERROR, root, stat_failure(path, exc))


def _reason(exc: OSError) -> str:
    reasons = {FileNotFoundError: "no such file or directory", PermissionError: "permission denied"}
    return reasons.get(type(exc)) or (exc.strerror or str(exc)).lower()
