"""Reading a base/tuned checkpoint pair for ``extract``: module weights in a given order,
on a reader thread per checkpoint, with each safetensors file hashed in the same pass.

:class:`HashingReader` reads stored tensors with ``pread``. Each safetensors file has a
hash cursor that walks its data area front to back: a tensor at or past the cursor is
read together with the bytes before it (streamed through one reused chunk, hashed, not
kept); one behind it (read out of order) is a plain ``pread``. Reading a checkpoint in
storage order is therefore one sequential pass that also yields the file's AutoV3, and
:meth:`HashingReader.finish` hashes whatever the walk did not reach.

:class:`Prefetch` runs a reader over a list of items on its own thread, a bounded number
of items ahead of the consumer (``pread`` and ``hashlib`` release the GIL, so reading and
hashing overlap the consumer's torch work).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from math import prod
from typing import TYPE_CHECKING, Generic, TypeVar

from loratool.checkpoint import Checkpoint, StoredTensor, WeightRef
from loratool.errors import InputError
from loratool.io.hashing import AUTOV3_STORED, CHUNK, autov3_start
from loratool.io.safetensors import TORCH_DTYPES

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
R = TypeVar("R")


class _Cursor:
    """The hash walk of one safetensors file: next unhashed offset and the digest so far."""

    def __init__(self, path: str, fd: int, start: int | None, size: int) -> None:
        self.path = path
        self.fd = fd
        self.pos = start if start is not None else size
        self.size = size
        self.digest = hashlib.sha256() if start is not None else None


class HashingReader:
    """Stored tensors of one checkpoint, read one at a time; AutoV3 of its files on the way.

    Not thread-safe: one thread reads at a time (a :class:`Prefetch` thread, or the caller
    once that thread has finished)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self._cursors: dict[str, _Cursor] = {}
        self._chunk: bytearray | None = None
        self._last: tuple[tuple[str, str], torch.Tensor] | None = None
        self.bytes_read = 0

    # ------------------------------------------------------------------ reading

    def tensor(self, t: StoredTensor) -> torch.Tensor:
        """A stored tensor in its own dtype and shape (the last one is kept, so the q/k/v
        rows of a fused tensor read it once)."""
        slot = (t.file, t.key)
        if self._last is not None and self._last[0] == slot:
            return self._last[1]
        self._last = None
        value = self._read(t)
        self._last = (slot, value)
        return value

    def weight(self, ref: WeightRef, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A module's weight as a matrix ``[out, in·kh·kw]`` (rows of a fused tensor cut,
        a stored transpose undone), in ``dtype`` (default: as stored; then possibly a view
        of the kept tensor)."""
        w = self.tensor(ref.tensor)
        if ref.rows is not None:
            w = w[ref.rows[0] : ref.rows[1]]
        if ref.transposed:
            w = w.T
        w = w.reshape(ref.spec.shape[0], prod(ref.spec.shape[1:]))
        return w if dtype is None else w.to(dtype)

    def _read(self, t: StoredTensor) -> torch.Tensor:
        import torch

        torch_dtype = getattr(torch, TORCH_DTYPES[t.dtype])
        if t.offset is None:  # pickled checkpoint: in memory already, nothing to hash
            return self.ckpt.read(t)
        buf = bytearray(t.nbytes)
        cur = self._cursor(t.file)
        if cur.digest is not None and cur.pos <= t.offset:
            self._hash_to(cur, t.offset)
            self._pread(cur.fd, t, memoryview(buf), t.offset)
            cur.digest.update(buf)
            cur.pos = t.offset + t.nbytes
        else:
            self._pread(cur.fd, t, memoryview(buf), t.offset)
        self.bytes_read += t.nbytes
        if not buf:
            return torch.empty(t.shape, dtype=torch_dtype)
        return torch.frombuffer(buf, dtype=torch_dtype).reshape(t.shape)

    def _cursor(self, path: str) -> _Cursor:
        cur = self._cursors.get(path)
        if cur is None:
            fd = os.open(path, os.O_RDONLY)
            size = os.fstat(fd).st_size
            head = os.pread(fd, 8, 0)
            cur = self._cursors[path] = _Cursor(path, fd, autov3_start(head, size), size)
        return cur

    def _hash_to(self, cur: _Cursor, end: int) -> None:
        """Read and hash ``[cur.pos, end)`` through the reused chunk."""
        assert cur.digest is not None
        if self._chunk is None:
            self._chunk = bytearray(CHUNK)
        view = memoryview(self._chunk)
        while cur.pos < end:
            n = os.preadv(cur.fd, [view[: min(CHUNK, end - cur.pos)]], cur.pos)
            if n == 0:
                raise InputError(cur.path, "file ended early (truncated while being read?)")
            cur.digest.update(view[:n])
            cur.pos += n

    def _pread(self, fd: int, t: StoredTensor, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                raise InputError(t.file, f"truncated while reading tensor {t.key!r}")
            done += n

    # ------------------------------------------------------------------ hashing

    def finish(self) -> dict[str, str | None]:
        """AutoV3 (12 hex digits, as Civitai shows it) of every weights file read for this
        checkpoint, by path relative to the checkpoint (the file name for a single file);
        None for pickled files. Hashes the parts the reads did not reach."""
        out: dict[str, str | None] = {}
        for f in self.ckpt.files:
            if not f.safetensors:
                out[f.relpath] = None
                continue
            cur = self._cursor(f.path)
            if cur.digest is None:
                out[f.relpath] = None
                continue
            self._hash_to(cur, cur.size)
            out[f.relpath] = cur.digest.hexdigest()[:AUTOV3_STORED].upper()
        self._chunk = None
        return out

    def close(self) -> None:
        self._last = None
        for cur in self._cursors.values():
            os.close(cur.fd)
        self._cursors.clear()


class Prefetch(Generic[T, R]):
    """``fn(item)`` for each item, computed on a thread at most ``depth`` items ahead and
    yielded in order; then ``after()`` runs on the thread (:meth:`wait` returns its
    result). An exception on the thread is raised in the consumer. :meth:`close` (also
    when the consumer stops early) stops the thread after its current item."""

    def __init__(self, fn: Callable[[T], R], items: Sequence[T], depth: int = 3,
                 after: Callable[[], object] | None = None) -> None:
        self._fn, self._items, self._after = fn, items, after
        self._queue: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loratool-extract-read", daemon=True)
        self._thread.start()

    def _put(self, value: tuple[str, object]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set() or not self._put(("item", self._fn(item))):
                    return
            self._put(("end", self._after() if self._after is not None else None))
        except BaseException as exc:  # handed to the consumer
            self._put(("error", exc))

    def _get(self) -> object:
        while True:
            try:
                kind, value = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("reader thread ended without a result") from None
                continue
            if kind == "error":
                raise value  # type: ignore[misc]
            return value

    def __iter__(self) -> Iterator[R]:
        for _ in range(len(self._items)):
            yield self._get()  # type: ignore[misc]

    def wait(self) -> object:
        """After every item was taken: wait for ``after()`` and return its result."""
        value = self._get()
        self._thread.join()
        return value

    def close(self) -> None:
        """Stop the thread (after its current item) and wait for it."""
        self._stop.set()
        self._thread.join()
