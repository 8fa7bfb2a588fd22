"""Atomic, streaming safetensors output.

Tensors are produced one at a time (each read lazily from its source, converted, written
and released), so memory stays bounded by the largest tensor. Output goes to a temp file
in the destination folder and is renamed over the final name only when complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from loratool.errors import InputError, OutputError
from loratool.io.safetensors import DTYPE_BITS, TORCH_DTYPES, tensor_memory

if TYPE_CHECKING:
    import torch

HASH_PLACEHOLDER = "0" * 64
MAX_RUN = 256 * 1024 * 1024  # a copied run stops growing here (progress, early flush)


@dataclass
class OutTensor:
    """One tensor to write: its key, output dtype/shape, and how to produce it."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor | bytes | bytearray | memoryview]
    copy_from: tuple[str, int] | None = None  # (file, offset) holding exactly these bytes

    @property
    def nbytes(self) -> int:
        n = DTYPE_BITS[self.dtype]  # sub-byte dtypes (F4, F6) fill whole bytes, or the header is refused
        for d in self.shape:
            n *= d
        return n // 8


def st_dtype(t: torch.Tensor) -> str:
    """safetensors dtype name of a torch tensor."""
    name = str(t.dtype).removeprefix("torch.")
    return next(k for k, v in TORCH_DTYPES.items() if v == name)


def header_bytes(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)  # align the data area to 8 bytes


@contextlib.contextmanager
def atomic_path(final: Path, *, directory: bool = False, mode: int | None = None) -> Iterator[Path]:
    """A temp file (or folder) beside ``final``, moved over it only if the block succeeds.

    The result gets the mode a plain ``open()`` would give, or ``mode`` when given (set
    before the rename, so a private file is never visible with wider permissions). An
    existing ``final`` (file, folder or symlink) is replaced as an entry: a symlink is
    replaced by the output, never written through. An OS error while creating, writing
    or renaming is an :class:`OutputError` naming ``final``; the temp is always removed."""
    final = Path(final)
    with _writing(final):
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file where a folder should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(final.parent)) from None
        prefix = f".{final.name[:200]}."
        if directory:
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix, suffix=".tmp"))
        else:
            fd, name = tempfile.mkstemp(dir=final.parent, prefix=prefix, suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
    try:
        with _writing(final):
            yield tmp
            if mode is None:
                _default_mode(tmp)
            else:
                os.chmod(tmp, mode)
            sync_tree(tmp)
            if directory:
                _replace_dir(tmp, final)
            else:
                os.replace(tmp, final)
    finally:
        with contextlib.suppress(OSError):  # never hide the error that got us here
            _remove(tmp)


@contextlib.contextmanager
def _writing(final: Path) -> Iterator[None]:
    """Turn an OS error into one line about the output."""
    try:
        yield
    except OSError as exc:
        raise OutputError(final, f"cannot write: {exc.strerror or exc}") from exc


def _remove(path: Path) -> None:
    """Delete a file, link or folder if present (a link itself, never its target)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_mode(path: Path) -> None:
    """Give a temp file/folder the mode a plain open()/mkdir() would (mkstemp makes 0600)."""
    mask = _umask()
    if path.is_dir():
        for child in [path, *path.rglob("*")]:
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
    """Write a small file atomically (temp beside it, fsync, rename); ``mode`` overrides."""
    final = Path(path)
    with atomic_path(final, mode=mode) as tmp:
        tmp.write_bytes(data)
    return final


def sync_tree(path: Path) -> None:
    """fsync a file, or every file in a folder and the folder itself (durable before rename).

    Pages already flushed by :func:`start_sync` cost nothing here."""
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                _fsync(child)
        _fsync(path, directory=True)
    else:
        _fsync(path)


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_sync(path: Path) -> threading.Thread:
    """Begin flushing ``path`` to disk in the background (overlaps with verification)."""
    thread = threading.Thread(target=sync_tree, args=(Path(path),), daemon=True)
    thread.start()
    return thread


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the folder ``tmp`` to ``final``, replacing whatever entry is there (a folder,
    a file or a symlink; a rename cannot put a folder over a non-empty folder or a file)."""
    if not os.path.lexists(final):
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name[:200]}.{secrets.token_hex(6)}.old")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(old, final)
        raise
    _remove(old)


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: list[OutTensor],
    metadata: dict[str, str] | None = None,
    *,
    hash_key: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> str:
    """Stream ``tensors`` into a new safetensors file at ``path`` (wrap in :func:`atomic_path`).

    With ``hash_key``, that metadata field receives the SHA-256 of the data area (kohya's
    ``sshs_model_hash`` = Civitai AutoV3), computed while writing. Returns that digest.
    ``progress(n)`` is told the byte count of each tensor (or copied run) once written.
    """
    meta = dict(metadata or {})
    hash_at = 0
    if hash_key:  # first in the header, so its value sits at a known offset (_hash_offset)
        meta = {hash_key: HASH_PLACEHOLDER, **{k: v for k, v in meta.items() if k != hash_key}}
    header = header_bytes(tensors, meta)
    if hash_key:
        hash_at = _hash_offset(header, hash_key)
    digest = hashlib.sha256() if hash_key else None
    sources: dict[str, int] = {}
    try:
        # "r+b" on the (new, empty) temp file: truncating with "w" would make ext4 start
        # writeback on close (its auto_da_alloc heuristic), stalling here for nothing.
        mode = "r+b" if os.path.exists(path) and os.path.getsize(path) == 0 else "wb+"
        with open(path, mode) as fh, _EarlyFlush(fh.fileno()) as early:
            fh.write(len(header).to_bytes(8, "little"))
            fh.write(header)
            pos = 8 + len(header)
            for run in _runs(tensors, copyable=digest is None):
                early.written(pos)
                if isinstance(run, tuple):  # (file, offset, n): contiguous stored bytes
                    fh.flush()
                    copy_range(sources, run, fh.fileno(), pos)
                    pos += run[2]
                    fh.seek(pos)
                    if progress is not None:
                        progress(run[2])
                    continue
                data = _bytes_of(run)
                if digest is not None:
                    digest.update(data)
                fh.write(data)
                pos += run.nbytes
                del data
                if progress is not None:
                    progress(run.nbytes)
            _finish(fh, hash_at, digest)
    finally:
        for fd in sources.values():
            os.close(fd)
    return digest.hexdigest() if digest is not None else ""


class _EarlyFlush:
    """Flush what is already written to disk in a background thread while the rest is
    still being written, so the fsync before the rename has only the tail left."""

    EVERY = 128 * 1024 * 1024

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.flushed = 0
        self.wake = threading.Event()
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _EarlyFlush:
        self.thread.start()
        return self

    def written(self, pos: int) -> None:
        if pos - self.flushed >= self.EVERY:
            self.flushed = pos
            self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.done:
                return
            with contextlib.suppress(OSError):
                os.fdatasync(self.fd)

    def __exit__(self, *exc: object) -> None:
        self.done = True
        self.wake.set()
        self.thread.join()


def _runs(tensors: list[OutTensor], copyable: bool) -> Iterator[OutTensor | tuple[str, int, int]]:
    """Tensors to produce one by one, with neighbours whose stored bytes lie back to back
    in one source file merged into a single ``(file, offset, length)`` copy."""
    pending: list[Any] | None = None
    for t in tensors:
        if not copyable or t.copy_from is None:
            if pending:
                yield tuple(pending)
                pending = None
            yield t
            continue
        path, offset = t.copy_from
        if pending and pending[0] == path and pending[1] + pending[2] == offset and pending[2] < MAX_RUN:
            pending[2] += t.nbytes
        else:
            if pending:
                yield tuple(pending)
            pending = [path, offset, t.nbytes]
    if pending:
        yield tuple(pending)


def copy_range(sources: dict[str, int], origin: tuple[str, int, int], out_fd: int, out_pos: int) -> None:
    """Copy stored bytes into the output inside the kernel (as ``cp`` does), falling back
    to read/write where the filesystem cannot."""
    path, offset, n = origin
    src = sources.get(path)
    if src is None:
        src = sources[path] = os.open(path, os.O_RDONLY)
    done = 0
    while done < n:
        try:
            copied = os.copy_file_range(src, out_fd, n - done, offset + done, out_pos + done)
        except OSError:
            copied = 0
        if copied == 0:  # unsupported here, or EOF: plain copy of the rest
            data = os.pread(src, n - done, offset + done)
            if len(data) != n - done:
                raise InputError(path, "truncated while copying tensor data")
            os.pwrite(out_fd, data, out_pos + done)
            copied = len(data)
        done += copied


def _hash_offset(header: bytes, key: str) -> int:
    """Offset in ``header`` of the placeholder value of the metadata field ``key``, written
    first in ``__metadata__`` (a search for the placeholder could hit a user's value)."""
    lead = ('{"__metadata__":{' + json.dumps(key, ensure_ascii=False, allow_nan=False) + ':"').encode("utf-8")
    if not header.startswith(lead + HASH_PLACEHOLDER.encode()):
        raise InputError(None, f"internal: {key} is not the first header field")
    return len(lead)


def _finish(fh: BinaryIO, hash_at: int, digest: Any) -> None:
    """Write the real data hash over the placeholder at ``hash_at`` in the header."""
    if digest is not None:
        fh.seek(8 + hash_at)
        fh.write(digest.hexdigest().encode())


def _bytes_of(t: OutTensor) -> memoryview | bytes:
    tensor = t.produce()
    if isinstance(tensor, (bytes, bytearray, memoryview)):  # stored bytes passed through
        if len(tensor) != t.nbytes:
            raise InputError(None, f"internal: {t.key} produced {len(tensor)} bytes, expected {t.nbytes}")
        return tensor
    if st_dtype(tensor) != t.dtype or tuple(tensor.shape) != t.shape:
        raise InputError(
            None, f"internal: {t.key} produced {st_dtype(tensor)}{tuple(tensor.shape)}, expected {t.dtype}{t.shape}"
        )
    return tensor_memory(tensor.detach().cpu().contiguous()).toreadonly()


def write_json(path: Path, obj: object) -> None:
    """Write JSON (inside an :func:`atomic_path` folder or file)."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
