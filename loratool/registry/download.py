"""Downloads that cannot lie: ``.part`` + Range resume, size and SHA256 checked before rename.

One file of one version is fetched into ``<name>.part`` beside its final name. Each attempt
asks the registry for a fresh signed storage URL, which is fetched with a separate session
that never carries the token. The part file is hashed as it is written (the hash runs on a
worker thread while the next bytes arrive and are written), renamed atomically only after the
size and the registry's SHA256 match, and deleted on a hash mismatch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import requests
import urllib3

from loratool.errors import RegistryError, UsageError
from loratool.io.hashing import compute_hashes
from loratool.io.safetensors import is_safetensors_prefix
from loratool.registry.client import USER_AGENT, RegistryClient, http_error
from loratool.registry.files import (
    FileChoice,
    filename_from_disposition,
    inside,
    is_pickle,
    sanitize_filename,
    scan_warnings,
    select_file,
)
from loratool.registry.retry import RETRY_STATUSES
from loratool.registry.sidecars import write_info, write_preview
from loratool.terminal import safe

CHUNK = 1024 * 1024
DEPTH = 4  # chunks in flight between the reader and the hash/write workers
WRITEBACK = 32 * 1024 * 1024
REFUSED_TYPES = ("text/html", "application/json", "application/xhtml", "text/plain")
WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".gguf", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".zip")
NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class Progress(Protocol):
    def start(self, name: str, total: int | None, completed: int) -> None: ...
    def advance(self, n: int) -> None: ...


class NullProgress:
    def start(self, name: str, total: int | None, completed: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass(frozen=True)
class FetchOptions:
    choice: FileChoice = field(default_factory=FileChoice)
    allow_pickle: bool = False
    force: bool = False
    preview: bool = False
    require_hash: bool = False
    retries: int | None = None  # None: the client's retry policy


@dataclass
class FetchResult:
    path: Path
    status: str  # "downloaded" | "skipped"
    sha256: str
    size: int
    version_id: int
    file_name: str
    transferred: int = 0
    warnings: list[str] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "status": self.status, "sha256": self.sha256,
                "size": self.size, "version_id": self.version_id, "file_name": self.file_name,
                "transferred": self.transferred, "warnings": self.warnings,
                "sidecars": [str(p) for p in self.sidecars]}


class _Restart(Exception):
    """The server ignored or could not honour our Range: start again from byte 0."""


class _Retry(Exception):
    def __init__(self, why: str, retry_after: str | None = None) -> None:
        super().__init__(why)
        self.retry_after = retry_after


def fetch_version(client: RegistryClient, version: dict[str, Any], dest: Path,
                  opts: FetchOptions, progress: Progress | None = None) -> FetchResult:
    """Download the chosen file of ``version`` into ``dest`` and write its sidecars."""
    file = select_file(version, opts.choice)
    name = sanitize_filename(str(file.get("name") or _disposition_name(client, version, file)))
    if is_pickle(file, name) and not opts.allow_pickle:  # the name it will be saved under counts
        raise RegistryError(name, "pickle format can run code when loaded; refusing without --allow-pickle")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RegistryError(dest, f"cannot create the output folder: {exc.strerror or exc}") from None
    final = inside(dest, name)
    expected = str((file.get("hashes") or {}).get("SHA256") or "").upper() or None
    warnings = scan_warnings(file)
    result = _existing(final, expected, opts.force, int(version["id"]), name)
    if result is None:
        result = _Download(client, version, file, final, expected, opts, progress or NullProgress()).run()
    result.warnings[:0] = warnings
    result.sidecars.append(write_info(final, version))
    if opts.preview:
        preview, warning = write_preview(_storage_session(), final, version, client.timeouts.pair())
        if preview:
            result.sidecars.append(preview)
        if warning:
            result.warnings.append(warning)
    return result


def _disposition_name(client: RegistryClient, version: dict[str, Any], file: dict[str, Any]) -> str:
    """When the API lists no file name: the storage response's Content-Disposition name."""
    url = client.download_location(int(version["id"]), _file_params(file))
    with _storage_session().get(url, stream=True, timeout=client.timeouts.pair()) as resp:
        name = filename_from_disposition(resp.headers.get("Content-Disposition"))
    if not name:
        raise RegistryError(f"version {version.get('id')}", "registry gives no file name for this file")
    return name


def _file_params(file: dict[str, Any]) -> dict[str, Any] | None:
    return {"fileId": file["id"]} if file.get("id") is not None else None


def _existing(final: Path, expected: str | None, force: bool, vid: int, name: str) -> FetchResult | None:
    """Skip a file already present with the right hash; refuse to clobber a different one."""
    if not final.exists() or force:
        return None
    if expected is None:
        raise UsageError(final, "already exists and the registry lists no SHA256 to compare; use --force")
    have = compute_hashes(final)
    if have.sha256 != expected:
        raise UsageError(final, f"already exists with SHA256 {have.sha256}, registry lists {expected}; "
                                "use --force to replace it")
    return FetchResult(final, "skipped", have.sha256, final.stat().st_size, vid, name)


def _storage_session() -> requests.Session:
    """A clean session for storage hosts: no token, ever."""
    s = requests.Session()
    s.headers["User-Agent"] = USER_AGENT
    s.headers["Accept-Encoding"] = "identity"
    return s


class _Download:
    """One download, across as many attempts (and signed URLs) as it takes."""

    def __init__(self, client: RegistryClient, version: dict[str, Any], file: dict[str, Any],
                 final: Path, expected: str | None, opts: FetchOptions, progress: Progress) -> None:
        self.client, self.version, self.file, self.final = client, version, file, final
        self.expected, self.opts, self.progress = expected, opts, progress
        self.part = final.with_name(final.name + ".part")
        self.retries = client.retry.attempts if opts.retries is None else opts.retries
        self.session = _storage_session()
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.total: int | None = None
        self.transferred = 0
        self.synced = 0  # bytes of the part file already handed to writeback
        self.warnings: list[str] = []
        self.check_header = final.name.lower().endswith((".safetensors", ".sft"))

    def run(self) -> FetchResult:
        try:
            fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise RegistryError(self.part, f"cannot open the part file: {exc.strerror or exc}") from None
        with os.fdopen(fd, "r+b") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RegistryError(self.part, "another download of this file is in progress") from None
            try:
                return self._run(fh)
            except BaseException:
                with contextlib.suppress(OSError):
                    ours = os.fstat(fh.fileno())
                    if ours.st_size == 0 and os.stat(self.part).st_ino == ours.st_ino:
                        self.part.unlink()  # nothing worth resuming (and it is still our file)
                raise

    def _run(self, fh: BinaryIO) -> FetchResult:
        self._load_part(fh)
        self._attempts(fh)
        fh.flush()
        os.fsync(fh.fileno())
        self._verify(fh)
        os.replace(self.part, self.final)
        _fsync_dir(self.final.parent)
        return FetchResult(self.final, "downloaded", self.hasher.hexdigest().upper(), self.offset,
                           int(self.version["id"]), self.final.name, self.transferred, self.warnings)

    def _load_part(self, fh: BinaryIO) -> None:
        """Hash what an earlier attempt left, so the resumed download verifies end to end."""
        fh.seek(0)
        head = fh.read(16)
        if head and self.check_header and len(head) >= 9 and not is_safetensors_prefix(head):
            head = b""
        if not head:
            fh.truncate(0)
            return
        fh.seek(0)
        while block := fh.read(8 * CHUNK):
            self.hasher.update(block)
            self.offset += len(block)

    def _attempts(self, fh: BinaryIO) -> None:
        failures = 0
        for _ in range(max(1, self.retries + 1) * 4):
            before = self.transferred
            try:
                if self._attempt(fh):
                    return
                why, retry_after = "download ended early", None
            except _Restart:
                self._truncate(fh)
                continue
            except _Retry as r:
                why, retry_after = str(r), r.retry_after
            except NETWORK_ERRORS as exc:
                why, retry_after = _network_reason(exc), None
            failures = 1 if self.transferred > before else failures + 1
            if failures > self.retries:
                raise RegistryError(self.final, f"{why}; gave up after {failures} attempts "
                                                f"(partial data kept in {self.part.name} for resume)")
            wait = self.client.retry.delay(failures, retry_after)
            if wait is None:
                raise RegistryError(self.final, f"{why}; server asks to wait {retry_after} s")
            self.client.retry.sleep(wait)
        raise RegistryError(self.final, f"download keeps failing; partial data kept in {self.part.name}")

    def _attempt(self, fh: BinaryIO) -> bool:
        """One request for the remaining bytes; True when the file is complete."""
        url = self.client.download_location(int(self.version["id"]), _file_params(self.file))
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        if self.client.is_own(url) and self.client.token:
            headers["Authorization"] = f"Bearer {self.client.token}"
        with self.session.get(url, headers=headers, stream=True,
                              timeout=self.client.timeouts.pair()) as resp:
            if not self._accept(resp):
                return True
            self.progress.start(self.final.name, self.total, self.offset)
            self._stream(resp, fh)
        return self.total is None or self.offset >= self.total

    def _accept(self, resp: requests.Response) -> bool:
        """Check status and type; returns False when there is nothing left to fetch (416)."""
        status = resp.status_code
        if status in RETRY_STATUSES or status == 403 and not self.client.is_own(resp.url):
            raise _Retry(f"storage answered HTTP {status}", resp.headers.get("Retry-After"))
        if status == 416:
            total = _content_range_total(resp.headers.get("Content-Range"))
            if total is not None and total == self.offset:
                self.total = total
                return False
            raise _Restart()
        if status not in (200, 206):
            raise http_error(self.final.name, resp)
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype.startswith(REFUSED_TYPES) and self.final.name.lower().endswith(WEIGHT_EXTENSIONS):
            raise RegistryError(self.final, f"server sent {safe(ctype)} instead of the model "
                                            "(a login or error page?); nothing saved")
        if status == 200:
            if self.offset:
                raise _Restart()  # Range ignored: start over rather than append a second copy
            length = resp.headers.get("Content-Length")
            self.total = int(length) if length and length.isdigit() else None
        else:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != self.offset:
                raise _Restart()
            self.total = total
        self._check_space()
        return True

    def _stream(self, resp: requests.Response, fh: BinaryIO) -> None:
        """Read the body and write each chunk; the hash runs on a worker thread while the
        next chunk arrives (at most ``DEPTH`` chunks in flight: bounded memory). Writing in
        the reading thread costs a page-cache copy; a second worker only added hand-offs."""
        fh.seek(self.offset)
        pending: list[Future[None]] = []
        first = b"" if self.offset == 0 and self.check_header else None
        with ThreadPoolExecutor(1, "loratool-sha") as hash_pool:
            try:
                for chunk in resp.raw.stream(CHUNK, decode_content=False):
                    if first is not None:
                        first += chunk
                        if len(first) < 16 and len(first) < (self.total or 16):
                            continue
                        self._check_prefix(first)
                        chunk, first = first, None
                    pending.append(hash_pool.submit(self.hasher.update, chunk))
                    self._write(fh, chunk)
                    if len(pending) > DEPTH:
                        pending.pop(0).result()
                    self.offset += len(chunk)
                    self.transferred += len(chunk)
                    self.progress.advance(len(chunk))
                if first is not None and first:
                    self._check_prefix(first)
            finally:
                for fut in pending:
                    fut.result()

    def _write(self, fh: BinaryIO, chunk: bytes) -> None:
        """Write a chunk; every ``WRITEBACK`` bytes, start the kernel's writeback of what is
        written so the final fsync has little left to do (and the page cache stays small)."""
        try:
            fh.write(chunk)
            end = fh.tell()
            if end - self.synced >= WRITEBACK:
                fh.flush()
                with contextlib.suppress(OSError, AttributeError):
                    os.posix_fadvise(fh.fileno(), self.synced, end - self.synced, os.POSIX_FADV_DONTNEED)
                self.synced = end
        except OSError as exc:
            raise RegistryError(self.final, f"cannot write: {exc.strerror or exc}; partial data kept in "
                                            f"{self.part.name}") from None

    def _check_prefix(self, first: bytes) -> None:
        if not is_safetensors_prefix(first, self.total):
            shown = first[:15].decode("latin-1", "replace")
            raise RegistryError(self.final, f"downloaded data is not a safetensors file (starts {shown!r}); "
                                            "nothing saved")

    def _check_space(self) -> None:
        if self.total is None:
            return
        free = shutil.disk_usage(self.part.parent).free
        need = self.total - self.offset
        if free < need:
            raise RegistryError(self.final, f"not enough disk space: need {need} bytes, {free} free")

    def _truncate(self, fh: BinaryIO) -> None:
        fh.seek(0)
        fh.truncate(0)
        self.hasher = hashlib.sha256()
        self.offset = 0

    def _verify(self, fh: BinaryIO) -> None:
        if self.total is not None and self.offset != self.total:
            raise RegistryError(self.final, f"size mismatch: got {self.offset} bytes, expected {self.total}")
        got = self.hasher.hexdigest().upper()
        if self.expected is not None:
            if got != self.expected:
                self._discard(fh)
                raise RegistryError(self.final, f"SHA256 mismatch: registry lists {self.expected}, "
                                                f"downloaded file has {got}; download deleted")
            return
        v3 = str((self.file.get("hashes") or {}).get("AutoV3") or "").upper()
        if v3:
            have = compute_hashes(self.part).autov3_full or ""
            if not have.startswith(v3):
                self._discard(fh)
                raise RegistryError(self.final, f"AutoV3 mismatch: registry lists {v3}, "
                                                f"downloaded file has {have[:len(v3)]}; download deleted")
            self.warnings.append("registry lists no SHA256; verified by AutoV3 instead")
            return
        if self.opts.require_hash:
            self._discard(fh)
            raise RegistryError(self.final, "registry lists no hash for this file and --require-hash "
                                            "is set; download deleted")
        self.warnings.append(f"registry lists no hash for this file; only its size was checked "
                             f"(SHA256 {got})")

    def _discard(self, fh: BinaryIO) -> None:
        fh.truncate(0)
        self.part.unlink(missing_ok=True)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    m = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", value or "")
    if not m:
        return None, None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _content_range_total(value: str | None) -> int | None:
    m = re.match(r"bytes\s+\*/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _network_reason(exc: BaseException) -> str:
    text = type(exc).__name__
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return "connection stalled (timed out)"
    if "IncompleteRead" in repr(exc) or "ProtocolError" in text or "ChunkedEncoding" in text:
        return "connection dropped mid-download"
    return "connection failed"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
