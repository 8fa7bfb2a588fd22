"""Civitai-compatible file hashes (SHA256, AutoV1, AutoV2, AutoV3) in one streamed pass.

Definitions follow the Civitai model scanner (see ``shared/reference/REGISTRY.md`` §2):

* SHA256 — the whole file;  AutoV2 — its first 10 hex digits.
* AutoV1 — SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex digits; ``None`` below 2 MiB.
* AutoV3 — SHA-256 of everything after the safetensors header (8-byte little-endian
  length N, then N bytes of JSON); when N ≥ 16 MiB the JSON is not skipped (hashing starts
  at byte 8). Civitai stores the first 12 hex digits. ``None`` when the file is shorter than
  8 bytes or the declared header runs past the end of the file.

The whole-file hash and the AutoV3 hash cover nearly the same bytes, so they run in two
threads (hashlib releases the GIL on large buffers) while the main thread reads ahead into
a second fixed-size buffer: wall time stays close to a single SHA-256 pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from loratool.errors import InputError
from loratool.io.safetensors import open_input

CHUNK = 8 * 1024 * 1024
AUTOV1_OFFSET = 0x100000
AUTOV1_LENGTH = 0x10000
AUTOV1_MIN_SIZE = 2 * 0x100000
AUTOV3_HEADER_CAP = 16 * 1024 * 1024  # N at or above this: the scanner hashes from byte 8
AUTOV3_STORED = 12


@dataclass(frozen=True)
class FileHashes:
    """Hashes of one file, uppercase hex as Civitai stores them."""

    sha256: str
    autov1: str | None
    autov2: str
    autov3: str | None
    autov3_full: str | None

    def as_dict(self) -> dict[str, str | None]:
        """The four registry hash fields (the ``--hashes`` JSON contract)."""
        return {"sha256": self.sha256, "autov1": self.autov1, "autov2": self.autov2,
                "autov3": self.autov3}


def autov3_start(prefix: bytes, size: int) -> int | None:
    """Offset where AutoV3 hashing starts, from the file's first 8 bytes; None if not computable."""
    if size < 8 or len(prefix) < 8:
        return None
    (n,) = struct.unpack("<Q", prefix[:8])
    if n >= AUTOV3_HEADER_CAP:
        return 8
    start = 8 + n
    return start if start <= size else None


class _Pipeline:
    """Feeds each chunk to the whole-file and AutoV3 hashers on two worker threads."""

    def __init__(self) -> None:
        self.whole = hashlib.sha256()
        self.tail = hashlib.sha256()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loratool-hash")
        self.pending: list[Future[Any]] = []

    def submit(self, view: memoryview, tail_from: int | None) -> None:
        self.pending = [self.pool.submit(self.whole.update, view)]
        if tail_from is not None and tail_from < len(view):
            self.pending.append(self.pool.submit(self.tail.update, view[tail_from:]))

    def wait(self) -> None:
        for fut in self.pending:
            fut.result()
        self.pending = []

    def close(self) -> None:
        self.wait()
        self.pool.shutdown()


def compute_hashes(
    path: str | os.PathLike[str], progress: Callable[[int], None] | None = None
) -> FileHashes:
    """Hash a file in one pass with bounded memory; ``progress(n)`` gets each chunk's size."""
    fh = open_input(path)
    pipe = _Pipeline()
    try:
        before = os.fstat(fh.fileno())
        size = before.st_size
        _posix_sequential(fh.fileno())
        bufs = [bytearray(CHUNK), bytearray(CHUNK)]
        autov1_block = bytearray()
        v3_start: int | None = None
        pos = 0
        turn = 0
        while True:
            view = memoryview(bufs[turn])
            n = fh.readinto(view)
            pipe.wait()  # the other buffer is free again
            if not n:
                break
            chunk = view[:n]
            if pos == 0:
                v3_start = autov3_start(bytes(chunk[:8]), size)
            autov1_block += _slice_overlap(chunk, pos, AUTOV1_OFFSET, AUTOV1_LENGTH)
            tail_from = None if v3_start is None else max(0, v3_start - pos)
            pipe.submit(chunk, tail_from)
            if progress is not None:
                progress(n)
            pos += n
            turn ^= 1
        pipe.wait()
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    finally:
        pipe.close()
        fh.close()
    after = os.stat(path)
    if pos != size or (after.st_size, after.st_mtime_ns) != (size, before.st_mtime_ns):
        raise InputError(path, "file changed while being hashed (still being written?)")
    sha = pipe.whole.hexdigest().upper()
    v3 = pipe.tail.hexdigest().upper() if v3_start is not None else None
    v1 = None
    if size >= AUTOV1_MIN_SIZE:
        v1 = hashlib.sha256(autov1_block).hexdigest()[:8].upper()
    return FileHashes(sha256=sha, autov1=v1, autov2=sha[:10],
                      autov3=v3[:AUTOV3_STORED] if v3 else None, autov3_full=v3)


def _slice_overlap(chunk: memoryview, pos: int, start: int, length: int) -> bytes:
    """Bytes of ``chunk`` (at file offset ``pos``) inside the range [start, start+length)."""
    lo = max(start, pos)
    hi = min(start + length, pos + len(chunk))
    return bytes(chunk[lo - pos : hi - pos]) if lo < hi else b""


def _posix_sequential(fd: int) -> None:
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):
            advise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def data_sha256(path: str | os.PathLike[str], data_start: int) -> str:
    """SHA-256 (lowercase hex) of a safetensors file from ``data_start`` to its end: kohya's
    ``sshs_model_hash``, the modelspec reference's ``hash_sha256`` (without "0x") and,
    for headers under 16 MiB, the full AutoV3."""
    digest = hashlib.sha256()
    with open_input(path) as fh:
        try:
            fh.seek(data_start)
            _posix_sequential(fh.fileno())
            buf = bytearray(CHUNK)
            while n := fh.readinto(buf):
                digest.update(memoryview(buf)[:n])
        except OSError as exc:
            raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    return digest.hexdigest()


def legacy_hash(window: bytes) -> str:
    """kohya's ``sshs_legacy_hash`` / A1111's old model hash of the bytes a file holds at
    [1 MiB, 1 MiB + 64 KiB) (fewer, or none, near the end): first 8 hex digits."""
    return hashlib.sha256(window[:AUTOV1_LENGTH]).hexdigest()[:8]
