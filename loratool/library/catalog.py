"""The library catalog: one SQLite file (stdlib ``sqlite3``, no server) of scan records.

One row per adapter file or folder: the stat signature that decides whether it must be
read again (size, mtime_ns, device, inode), a few indexed columns, and the record itself
as JSON (the ``--json`` contract, see :mod:`loratool.library.record`). A ``meta`` table
holds the schema version and when the last scan started and finished.

Writes go through transactions in WAL mode: a scan killed at any moment leaves every row
either as it was or as the scan wrote it, never half of one. Rows are keyed by absolute
path as reached from the scanned root (symlinks are not resolved).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratool.errors import InputError, UsageError

SCHEMA_VERSION = 1
APPLICATION = "loratool-catalog"
DB_NAME = "catalog.sqlite3"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (
    path      TEXT PRIMARY KEY,
    root      TEXT NOT NULL,
    size      INTEGER,
    mtime_ns  INTEGER,
    dev       INTEGER,
    ino       INTEGER,
    autov3    TEXT,
    hashed    INTEGER NOT NULL,
    validated INTEGER NOT NULL,
    retry     INTEGER NOT NULL,
    sidecars  TEXT NOT NULL,
    record    TEXT NOT NULL
);
CREATE INDEX files_autov3 ON files (autov3);
CREATE INDEX files_inode ON files (dev, ino);
"""


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/loratool/catalog.sqlite3``, else ``~/.local/share/loratool/…``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "loratool" / DB_NAME


@dataclass(frozen=True)
class Stored:
    """What the scanner needs to know about a row without parsing its record."""

    path: str
    size: int | None
    mtime_ns: int | None
    dev: int | None
    ino: int | None
    autov3: str | None
    hashed: bool
    validated: bool
    retry: bool  # the last read was refused by the system (permissions): read again next time
    sidecars: str  # JSON list, compared as text

    @property
    def signature(self) -> tuple[int | None, int | None, int | None, int | None]:
        return (self.size, self.mtime_ns, self.dev, self.ino)


def under(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies below it (plain string paths)."""
    prefix = root if root.endswith(os.sep) else root + os.sep
    return path == root or path.startswith(prefix)


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


class Catalog:
    """An open catalog. Use :func:`open_catalog`; close it (or use ``with``) when done."""

    def __init__(self, conn: sqlite3.Connection, path: str, notes: list[str]) -> None:
        self.conn = conn
        self.path = path
        self.notes = notes  # what opening it did or found (a rebuilt schema, an unfinished scan)

    # ------------------------------------------------------------------ reading
    def _where_under(self, roots: Iterable[str] | None) -> tuple[str, list[str]]:
        if roots is None:
            return "", []
        clauses, args = [], []
        for root in roots:
            prefix = root if root.endswith(os.sep) else root + os.sep
            clauses.append("(path = ? OR (path >= ? AND path < ?))")
            args += [root, prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)]
        return " WHERE " + (" OR ".join(clauses) or "0"), args

    def stored_under(self, roots: Iterable[str]) -> dict[str, Stored]:
        where, args = self._where_under(roots)
        rows = self.conn.execute(
            "SELECT path, size, mtime_ns, dev, ino, autov3, hashed, validated, retry, sidecars FROM files" + where, args)
        return {r[0]: Stored(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), bool(r[7]), bool(r[8]), r[9]) for r in rows}

    def records(self, roots: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every record (under ``roots`` when given), sorted by path."""
        where, args = self._where_under(roots)
        for (text,) in self.conn.execute("SELECT record FROM files" + where + " ORDER BY path", args):
            yield json.loads(text)

    def get(self, path: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT record FROM files WHERE path = ?", (path,)).fetchone()
        return None if row is None else json.loads(row[0])

    def query(self, expr: str, roots: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Records matching a filter expression (see :mod:`loratool.library.query`);
        a malformed expression is a :class:`~loratool.errors.UsageError`."""
        from loratool.library.query import parse

        match = parse(expr)
        return [r for r in self.records(roots) if match(r)]

    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    # ------------------------------------------------------------------ writing
    def put(self, record: dict[str, Any], retry: bool = False) -> None:
        """Insert or replace one record (its path is the key); ``retry``: read it again
        next time even if unchanged."""
        hashes = record.get("hashes")
        autov3 = hashes.get("autov3") if isinstance(hashes, dict) and isinstance(hashes.get("autov3"), str) else None
        self.conn.execute(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record["path"], record["root"], record["size"], record["mtime_ns"], record["device"], record["inode"], autov3,
             hashes is not None, record.get("validation") is not None, retry,
             _dumps(record["sidecars"]), _dumps(record)),
        )

    def move(self, old: str, record: dict[str, Any], retry: bool = False) -> None:
        """A renamed file: the row at ``old`` becomes ``record`` (in the same transaction)."""
        self.conn.execute("DELETE FROM files WHERE path = ?", (old,))
        self.put(record, retry)

    def set_sidecars(self, path: str, sidecars: list[str]) -> None:
        record = self.get(path)
        if record is not None:
            record["sidecars"] = sidecars
            self.conn.execute("UPDATE files SET sidecars = ?, record = ? WHERE path = ?",
                              (_dumps(sidecars), _dumps(record), path))

    def delete(self, paths: Iterable[str]) -> None:
        self.conn.executemany("DELETE FROM files WHERE path = ?", ((p,) for p in paths))

    def begin_scan(self, roots: list[str]) -> None:
        """Mark a scan as started (committed), noting a previous one that never finished."""
        meta = self.meta()
        started, finished = meta.get("scan_started"), meta.get("scan_finished")
        if started and (not finished or float(finished) < float(started)):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started)))
            self.notes.append(f"the previous scan (started {when}) did not finish; this one completes the catalog")
        self._set_meta({"scan_started": repr(time.time()), "scan_roots": _dumps(roots)})
        self.commit()

    def end_scan(self) -> None:
        self._set_meta({"scan_finished": repr(time.time())})
        self.commit()

    def _set_meta(self, values: dict[str, str]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    def commit(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_catalog(db: str | os.PathLike[str] | None = None, *, create: bool = False) -> Catalog:
    """Open the catalog at ``db`` (default :func:`default_db_path`).

    ``create`` makes a missing one (and its folder) and rebuilds one of an older schema
    (a catalog is a cache of what is on disk: the next scan reads everything again).
    A newer schema, a file that is not SQLite, or a SQLite file of someone else's is
    refused with an :class:`~loratool.errors.InputError`; a missing catalog without
    ``create`` too."""
    path = Path(db) if db is not None else default_db_path()
    if not path.exists():
        if not create:
            raise InputError(path, "no catalog here yet (run `loratool scan DIR --db PATH` first)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(path.parent, f"cannot create the catalog's folder: {exc.strerror or exc}") from None
    elif path.is_dir():
        raise UsageError(path, "is a folder; --db names the catalog file")
    try:
        conn = sqlite3.connect(path, timeout=60)
    except sqlite3.Error as exc:
        raise InputError(path, f"cannot open the catalog: {exc}") from None
    try:
        notes = _check_schema(conn, path, create)
        if create:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return Catalog(conn, str(path), notes)


def _check_schema(conn: sqlite3.Connection, path: Path, create: bool) -> list[str]:
    """Create, accept, rebuild or refuse the schema; returns notes on what was done."""
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError:
        raise InputError(path, "not a loratool catalog (not a SQLite database)") from None
    if not tables:
        if create:
            _create(conn)
        return []
    if "meta" not in tables or "files" not in tables:
        raise InputError(path, "not a loratool catalog (a SQLite database with other tables); choose another --db")
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    if meta.get("application") != APPLICATION:
        raise InputError(path, "not a loratool catalog (a SQLite database with other tables); choose another --db")
    try:
        version = int(meta.get("schema_version", "0"))
    except ValueError:
        version = 0
    if version > SCHEMA_VERSION:
        raise InputError(path, f"catalog schema version {version} is newer than this loratool reads ({SCHEMA_VERSION}); "
                               "upgrade loratool or use another --db")
    if version == SCHEMA_VERSION:
        return []
    if not create:
        raise InputError(path, f"catalog schema version {version} is older than this loratool's ({SCHEMA_VERSION}); "
                               "run `loratool scan` once to rebuild it")
    _create(conn, drop=tables)
    return [f"catalog schema version {version} rebuilt as version {SCHEMA_VERSION} (every file is read again)"]


def _create(conn: sqlite3.Connection, drop: Iterable[str] = ()) -> None:
    """The schema and its meta rows in one transaction (dropping ``drop`` tables first)."""
    rows = {"application": APPLICATION, "schema_version": str(SCHEMA_VERSION), "created": repr(time.time())}
    drops = "".join(f'DROP TABLE "{t}";' for t in drop)
    inserts = "".join(f"INSERT INTO meta VALUES ('{k}', '{v}');" for k, v in rows.items())
    conn.executescript("BEGIN;" + drops + SCHEMA + inserts + "COMMIT;")
