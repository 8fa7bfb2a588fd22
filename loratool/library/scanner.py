"""``scan``: keep a catalog of whole model libraries, reading only what changed.

1. Walk the roots (:func:`loratool.library.walk`): adapter files and folders, the other
   files (sidecars are paired by name, :mod:`loratool.library.sidecars`), what could not
   be walked.
2. Compare each adapter's stat signature (size, mtime_ns, device, inode) with the
   catalog's: unchanged files are not opened; a path that is new but whose signature
   belongs to a row that vanished is a rename (the row moves, nothing is read).
3. Read the rest with :func:`loratool.library.record.read_record` — in a process pool
   for ``jobs`` > 1, in this process for ``jobs`` = 1 — and store each record as it comes,
   committing in batches (a killed scan keeps what it committed; the next one goes on
   from there). A new file with the AutoV3 of a vanished one of the same size is a rename
   too (it is hashed for that check).
4. Rows under the roots that were not found again leave the catalog (not those below a
   folder that could not be listed, nor a root that could not be reached).
5. Report on everything under the roots: counts by family, format and network type,
   duplicates, sidecars without a model, models without sidecars, what could not be read.
"""

from __future__ import annotations

import os
import stat
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from loratool.errors import UsageError
from loratool.io.sources import COMPONENT_DIRS
from loratool.library.catalog import Catalog, Stored, open_catalog, under
from loratool.library.record import READ_FIELDS, ReadTask, autov3_of, read_record
from loratool.library.sidecars import pair
from loratool.library.walk import (
    ADAPTER_DIR,
    DUPLICATE,
    ERROR,
    NOT_A_MODEL,
    NOT_ADAPTER,
    WalkEntry,
    walk,
)

COMMIT_EVERY = 64  # records…
COMMIT_SECONDS = 1.0  # …or seconds, whichever comes first
# Fewer files to read than this: read here, since starting a pool costs more than it saves
# (header-only reads take milliseconds; hashing and validation read every byte).
POOL_MIN_TASKS = {"header": 48, "data": 8}
COUNTS = ("new", "changed", "unchanged", "renamed", "removed", "errors", "read")
# Order of a record's fields: what the walk knows, then what reading found.

Progress = Callable[[int, int], None]
Signature = tuple[int | None, int | None, int | None, int | None]  # size, mtime_ns, dev, ino


@dataclass
class LibraryReport:
    """The state of everything under the scanned roots (unchanged files included)."""

    files: int = 0
    by_family: dict[str, int] = field(default_factory=dict)
    by_format: dict[str, int] = field(default_factory=dict)
    by_network: dict[str, int] = field(default_factory=dict)
    # Groups of paths with the same AutoV3 (links to one file are not duplicates);
    # None when no file under the roots has been hashed (scan with hashes=True).
    duplicates: list[list[str]] | None = None
    unhashed: int = 0  # files without hashes, left out of the duplicate check
    orphan_sidecars: list[str] = field(default_factory=list)  # .civitai.info/.preview.* without a model
    without_sidecars: list[str] = field(default_factory=list)  # readable models with no sidecar at all
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, message): unreadable, truncated, not walkable
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why): model files not read, second paths


@dataclass
class ScanResult:
    """What :func:`scan` did (``counts``) and found (``report``)."""

    db: str
    roots: list[str]
    counts: dict[str, int]
    report: LibraryReport
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (old path, new path)
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed: float = 0.0


@dataclass
class _Found:
    """The walk, sorted out."""

    adapters: dict[str, WalkEntry] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # folders (or roots) whose contents are unknown


def scan(
    paths: Iterable[str | os.PathLike[str]],
    *,
    db: str | os.PathLike[str] | None = None,
    hashes: bool = False,
    validate: bool = False,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> ScanResult:
    """Scan library folders (or files) into the catalog at ``db`` (default: the user's
    data folder, see :func:`loratool.library.catalog.default_db_path`).

    ``hashes`` adds sha256/AutoV1/V2/V3 (reads each new or changed file in full; unchanged
    files keep the hashes stored earlier, changed ones that had hashes are hashed again),
    ``validate`` a validation summary (reads the tensor data; kept the same way).
    ``jobs`` worker processes read files (default: one per CPU; 1 reads in this process).
    ``progress(done, total)`` is called as files are read."""
    t0 = time.perf_counter()
    roots = list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in paths))
    if not roots:
        raise UsageError(None, "scan needs at least one folder or file")
    jobs = jobs if jobs is not None else (os.cpu_count() or 1)
    if jobs < 1:
        raise UsageError(None, f"jobs must be at least 1, not {jobs}")
    found = _sort_walk(walk(roots))
    sidecars, orphans = pair(((p, e.kind == ADAPTER_DIR) for p, e in found.adapters.items()), found.others)
    counts = dict.fromkeys(COUNTS, 0)
    result = ScanResult("", roots, counts, LibraryReport())
    with open_catalog(db, create=True) as catalog:
        result.db = catalog.path
        catalog.begin_scan(roots)
        result.notes += catalog.notes
        try:
            _update(catalog, found, sidecars, result, hashes, validate, jobs, progress)
        finally:
            catalog.commit()
        catalog.end_scan()
        result.report = _report(catalog.records(roots), found, orphans)
    counts["errors"] = len(result.report.errors)
    result.elapsed = time.perf_counter() - t0
    return result


def _sort_walk(entries: Iterable[WalkEntry]) -> _Found:
    found = _Found()
    for e in entries:
        if e.is_adapter:
            found.adapters.setdefault(e.path, e)
        elif e.kind == NOT_ADAPTER and e.reason == NOT_A_MODEL:
            found.others.append(e.path)
        elif e.kind == ERROR:
            found.errors.append((e.path, e.reason))
            if e.path == e.root or e.reason.startswith("cannot list folder"):
                found.unlisted.append(e.path)
        elif e.kind in (NOT_ADAPTER, DUPLICATE):
            found.skipped.append((e.path, e.reason))
    return found


def _signature(entry: WalkEntry) -> Signature:
    """A file's stat signature from the walk; a folder's from the files an adapter folder
    is made of (its weights and config, and those of its component subfolders), so that
    rewriting one of them counts as a change."""
    dev, ino = entry.inode or (None, None)
    if entry.kind != ADAPTER_DIR:
        return (entry.size, entry.mtime_ns, dev, ino)
    size, mtime = 0, entry.mtime_ns or 0
    for folder in (entry.path, *(os.path.join(entry.path, c) for c in COMPONENT_DIRS)):
        try:
            with os.scandir(folder) as it:
                for item in it:
                    st = item.stat()
                    if stat.S_ISREG(st.st_mode):
                        size += st.st_size
                        mtime = max(mtime, st.st_mtime_ns)
        except OSError:
            continue
    return (size, mtime, dev, ino)


def _update(
    catalog: Catalog, found: _Found, sidecars: dict[str, list[str]], result: ScanResult,
    hashes: bool, validate: bool, jobs: int, progress: Progress | None,
) -> None:
    counts = result.counts
    stored = catalog.stored_under(result.roots)
    vanished = {p: s for p, s in stored.items()
                if p not in found.adapters and not any(under(p, u) for u in found.unlisted)}
    by_signature = {s.signature: p for p, s in vanished.items() if s.ino is not None}
    sizes_with_autov3 = {s.size for s in vanished.values() if s.autov3}
    signatures = {p: _signature(e) for p, e in found.adapters.items()}
    tasks: list[tuple[ReadTask, str]] = []  # (task, what it is: new / changed / unchanged)
    batch = _Batch(catalog)
    for path, entry in found.adapters.items():
        sig, old = signatures[path], stored.get(path)
        what = "new" if old is None else "changed" if old.signature != sig else "unchanged"
        if what == "new" and (src := by_signature.get(sig)) in vanished:
            _move(catalog, vanished.pop(src), entry, sig, sidecars[path])
            result.renamed.append((src, path))
            old, what = stored[src], "unchanged"
            counts["renamed"] += 1
        counts[what] += 1
        if what == "unchanged" and not old.retry and (old.hashed or not hashes) and (old.validated or not validate):
            if old.path == path and old.sidecars != _json_list(sidecars[path]):
                catalog.set_sidecars(path, sidecars[path])
                batch.added()
            continue
        # Read with what was asked, and what the old record had (the catalog never loses
        # detail); a new file the size of a vanished hashed one is hashed: a move?
        want_hashes = hashes or (old.hashed if old else sig[0] in sizes_with_autov3)
        want_validation = validate or (old is not None and old.validated)
        tasks.append((ReadTask(path, entry.kind == ADAPTER_DIR, want_hashes, want_validation), what))
    batch.flush()
    if progress is not None and tasks:
        progress(0, len(tasks))
    records = _read_all([t for t, _ in tasks], jobs)
    for done, ((task, what), record) in enumerate(zip(tasks, records), start=1):
        entry = found.adapters[task.path]
        full = _assemble(entry, signatures[task.path], record, sidecars[task.path])
        src = _renamed_by_content(full, vanished) if what == "new" else None
        # a file the system would not let us read (permissions) is retried next time
        retry = full["error"] is not None and full["format"] is None and not os.access(task.path, os.R_OK)
        if src is not None:
            catalog.move(src, full, retry)
            del vanished[src]
            result.renamed.append((src, task.path))
            counts["renamed"] += 1
            counts["new"] -= 1
            counts["changed"] += 1  # a moved copy: known content, read again
        else:
            catalog.put(full, retry)
        counts["read"] += 1
        batch.added()
        if progress is not None:
            progress(done, len(tasks))
    catalog.delete(vanished)
    result.removed = sorted(vanished)
    counts["removed"] = len(vanished)


class _Batch:
    """Commits every :data:`COMMIT_EVERY` writes or :data:`COMMIT_SECONDS` seconds."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog, self.pending, self.since = catalog, 0, time.monotonic()

    def added(self) -> None:
        self.pending += 1
        if self.pending >= COMMIT_EVERY or time.monotonic() - self.since >= COMMIT_SECONDS:
            self.flush()

    def flush(self) -> None:
        self.catalog.commit()
        self.pending, self.since = 0, time.monotonic()


def _json_list(items: list[str]) -> str:
    import json

    return json.dumps(items, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _move(catalog: Catalog, old: Stored, entry: WalkEntry, sig: Signature, sidecars: list[str]) -> None:
    """A renamed file whose signature is unchanged: its record moves, nothing is read."""
    record = catalog.get(old.path)
    assert record is not None
    record.update(_walk_fields(entry, sig), sidecars=sidecars)
    catalog.move(old.path, record)


def _renamed_by_content(record: dict[str, Any], vanished: dict[str, Stored]) -> str | None:
    """A vanished row with this new file's AutoV3 and size: the file was moved (copied
    across file systems, or touched on the way)."""
    v3 = autov3_of(record)
    if v3 is None:
        return None
    return next((p for p, s in vanished.items() if s.autov3 == v3 and s.size == record["size"]), None)


def _walk_fields(entry: WalkEntry, sig: Signature) -> dict[str, Any]:
    size, mtime_ns, dev, ino = sig
    mtime = None if mtime_ns is None else datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc).isoformat(timespec="seconds")
    return {"path": entry.path, "name": os.path.basename(entry.path), "root": entry.root,
            "kind": "folder" if entry.kind == ADAPTER_DIR else "file",
            "size": size, "mtime": mtime, "mtime_ns": mtime_ns, "device": dev, "inode": ino}


def _assemble(entry: WalkEntry, sig: Signature, record: dict[str, Any], sidecars: list[str]) -> dict[str, Any]:
    """The stored record: walk fields, what reading found, sidecars, when it was read."""
    out = _walk_fields(entry, sig)
    out.update((k, record.get(k, default)) for k, default in READ_FIELDS.items() if k != "error")
    out["sidecars"] = sidecars
    out["error"] = record.get("error")
    out["scanned_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return out


def _read_all(tasks: list[ReadTask], jobs: int) -> Iterator[dict[str, Any]]:
    """Records for ``tasks`` in order: here for one job or a few files, else in a pool."""
    heavy = any(t.hashes or t.validate for t in tasks)
    if jobs == 1 or len(tasks) < POOL_MIN_TASKS["data" if heavy else "header"]:
        yield from map(read_record, tasks)
        return
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    import loratool.ops.inspect  # noqa: F401  (imported once here, inherited by forked workers)

    ctx = multiprocessing.get_context(_start_method(threading.active_count()))
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["loratool.library.record", "loratool.ops.inspect"])
    workers = min(jobs, len(tasks))
    chunk = max(1, min(16, len(tasks) // (workers * 8)))
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
    try:
        yield from pool.map(read_record, tasks, chunksize=chunk)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _start_method(threads: int) -> str:
    """``fork`` on Linux when this process runs no other thread (workers start at once and
    inherit the imports); else ``forkserver`` or ``spawn``, which import ``__main__``
    again in each worker (guard a script's scan() with ``if __name__ == "__main__":``)."""
    import multiprocessing
    import sys

    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and threads == 1 and "fork" in methods:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def _worker_init() -> None:
    """Workers leave Ctrl-C to the main process, which stops the pool and keeps what is stored."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _report(records: Iterable[dict[str, Any]], found: _Found, orphans: list[str]) -> LibraryReport:
    report = LibraryReport(orphan_sidecars=orphans, skipped=list(found.skipped))
    families: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    networks: Counter[str] = Counter()
    by_v3: dict[str, list[dict[str, Any]]] = defaultdict(list)
    hashed = False
    for r in records:
        report.files += 1
        if r["error"] is not None:
            report.errors.append((r["path"], r["error"]))
        if r["format"] is None:
            continue
        families[r["family"]] += 1
        formats[r["format"]] += 1
        networks.update(r["network_types"])
        if not r["sidecars"] and r["error"] is None:
            report.without_sidecars.append(r["path"])
        hashed = hashed or r["hashes"] is not None
        v3 = autov3_of(r)
        if v3 is None:
            report.unhashed += 1
        else:
            by_v3[v3].append(r)
    report.errors += found.errors
    report.by_family, report.by_format, report.by_network = (
        dict(c.most_common()) for c in (families, formats, networks))
    if hashed:
        report.duplicates = [
            [r["path"] for r in group] for group in by_v3.values()
            if len({(r["device"], r["inode"]) for r in group}) > 1
        ]
    return report

